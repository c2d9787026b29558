"""Saved-for-backward bytes (DESIGN.md sections 3 and 9): each op saves exactly the kept rows it
needs, nothing of a frozen weight's GEMM, and one gathered copy per tensor within a step.

saved.bytes_excluding(params) leaves out what lives anyway (weights); the keep set the op saves is
its private copy of keep_idx (int64, 8 bytes a position)."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import keep_set
from sbp_kernels.memory import saved_bytes

F32 = 4


def _ratio(dense_fn, sbp_fn, *inputs):
    inputs = [t.requires_grad_() for t in inputs]
    with saved_bytes() as dense:
        dense_fn(*inputs)
    with saved_bytes() as sbp:
        sbp_fn(*inputs)
    return sbp.bytes / dense.bytes


@pytest.mark.parametrize("r, limit", [(0.5, 0.55), (0.25, 0.3)])
def test_linear_saves_kept_rows_only(r, limit):
    keep = sbp_kernels.sample_keep_indices((196,), r)
    ratio = _ratio(F.linear, lambda x, w: sbp_kernels.linear(x, w, None, keep), torch.randn(8, 196, 64), torch.randn(64, 64))
    assert ratio <= limit


# (x, weight) requires_grad -> saved activation rows
@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("op", ["linear", "pointwise_conv"])
def test_linear_and_conv_save_exactly_what_the_backward_reads(op, x_grad, w_grad):
    """x's kept rows only when the weight takes a gradient: a frozen (LoRA base) layer saves no
    activation at all, only its weight (which lives anyway) and the keep set."""
    batch, c_in, c_out = 4, 24, 16
    keep = keep_set(48, 0.5)
    if op == "linear":
        x, w = torch.randn(batch, 48, c_in), torch.randn(c_out, c_in)
        fn = sbp_kernels.linear
    else:
        x, w = torch.randn(batch, c_in, 6, 8).to(memory_format=torch.channels_last), torch.randn(c_out, c_in, 1, 1)
        fn = sbp_kernels.pointwise_conv
    x.requires_grad_(x_grad)
    w.requires_grad_(w_grad)
    with saved_bytes() as saved:
        fn(x, w, torch.zeros(c_out, requires_grad=True), keep)
    x_kept = batch * keep.numel() * c_in * F32 if w_grad else 0
    assert saved.bytes_excluding([w]) == x_kept + keep.numel() * 8


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_saves_kept_pixels_only(channels_last):
    keep = sbp_kernels.sample_keep_indices((16, 16), 0.5)
    x = torch.randn(4, 32, 16, 16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ratio = _ratio(F.conv2d, lambda x, w: sbp_kernels.pointwise_conv(x, w, None, keep), x, torch.randn(32, 32, 1, 1))
    assert ratio <= 0.55


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("frozen", [False, True])
def test_mlp_saves_x_and_hidden_of_kept_rows(dropout_p, frozen):
    """x_K (only for the first weight's gradient), the kept rows of fc1's output and, with
    dropout, the kept rows of its mask as bool."""
    batch, n, c, hidden = 4, 64, 16, 64
    keep = keep_set(n, 0.25)
    k = keep.numel()
    x = torch.randn(batch, n, c, requires_grad=True)
    weights = [torch.randn(hidden, c), torch.randn(hidden), torch.randn(c, hidden), torch.randn(c)]
    for w in weights:
        w.requires_grad_(not frozen)
    with saved_bytes() as saved:
        sbp_kernels.mlp(x, *weights, keep, "gelu", 1.0, dropout_p)
    expected = batch * k * hidden * F32 + k * 8
    expected += 0 if frozen else batch * k * c * F32
    expected += batch * k * hidden if dropout_p else 0
    assert saved.bytes_excluding(weights) == expected


@pytest.mark.parametrize("frozen", [False, True])
def test_gated_mlp_saves_x_gate_and_up_of_kept_rows_only(frozen):
    batch, n, c, hidden = 2, 64, 16, 48
    keep = keep_set(n, 0.5)
    k = keep.numel()
    x = torch.randn(batch, n, c, requires_grad=True)
    weights = [torch.randn(hidden, c), torch.randn(hidden, c), torch.randn(c, hidden)]
    for w in weights:
        w.requires_grad_(not frozen)
    with saved_bytes() as saved:
        sbp_kernels.gated_mlp(x, weights[0], None, weights[1], None, weights[2], None, keep)
    g_and_u = 2 * batch * k * hidden * F32
    x_kept = 0 if frozen else batch * k * c * F32  # a frozen (LoRA base) MLP needs no x_K
    assert saved.bytes_excluding(weights) == x_kept + g_and_u + k * 8


def _attention_inputs(batch=2, heads=4, kv_heads=2, n=64, d=16):
    q = torch.randn(batch, heads, n, d, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, d, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, d, requires_grad=True)
    return q, k, v


def test_attention_mode_qkv_saves_kept_rows_of_q_k_v_o_and_lse():
    q, k, v = _attention_inputs()
    keep = keep_set(64, 0.5)
    with saved_bytes() as saved:
        out = sbp_kernels.attention(q, k, v, keep)
    rows = keep.numel()
    expected = (2 * 4 * rows * 16 * F32) * 2  # q_K and o_K
    expected += (2 * 2 * rows * 16 * F32) * 2  # k_K and v_K (h_kv heads, no repeated copy)
    expected += 2 * 4 * rows * F32 + rows * 8  # lse_K (float32) and the keep set
    assert saved.bytes == expected
    out.sum().backward()


def test_attention_mode_q_keeps_k_v_whole():
    q, k, v = _attention_inputs()
    keep = keep_set(64, 0.5)
    with saved_bytes() as saved:
        sbp_kernels.attention(q, k, v, keep, mode="q")
    rows = keep.numel()
    expected = (2 * 4 * rows * 16 * F32) * 2 + 2 * (2 * 2 * 64 * 16 * F32) + 2 * 4 * rows * F32 + rows * 8
    assert saved.bytes == expected


def test_attention_bias_padding_and_dropout_save_kept_blocks():
    q, k, v = _attention_inputs()
    keep = keep_set(64, 0.25)
    rows = keep.numel()
    bias = torch.randn(4, 64, 64, requires_grad=True)
    mask = torch.ones(2, 64, dtype=torch.bool)
    with saved_bytes() as plain:
        sbp_kernels.attention(q, k, v, keep)
    with saved_bytes() as saved:
        sbp_kernels.attention(q, k, v, keep, key_padding_mask=mask, attn_bias=bias, dropout_p=0.1)
    # the kept block of the bias (float32), of the dropout mask (bool), and the padding mask itself
    assert saved.bytes - plain.bytes == 4 * rows * rows * F32 + 2 * 4 * rows * rows + 2 * 64


def test_attention_output_and_projection_share_o_kept_in_a_step():
    """The output projection reads the attention output's [B, n, h * d] view: inside a step the
    two ops save ONE copy of its kept rows (keepset.Step.gather), and one copy of the keep set."""
    batch, heads, n, d = 2, 4, 64, 16
    q, k, v = _attention_inputs(batch, heads, 2, n, d)
    w_out = torch.randn(heads * d, heads * d, requires_grad=True)
    keep = keep_set(n, 0.5)
    rows = keep.numel()

    def block():
        out = sbp_kernels.attention(q, k, v, keep)
        return sbp_kernels.linear(out.transpose(1, 2).reshape(batch, n, heads * d), w_out, None, keep)

    with saved_bytes() as alone:
        block()
    with sbp_kernels.step():
        with saved_bytes() as shared:
            block()
    o_kept = batch * rows * heads * d * F32
    assert alone.bytes_excluding([w_out]) - shared.bytes_excluding([w_out]) == o_kept + rows * 8
    expected = (batch * heads * rows * d * F32) * 2 + (batch * 2 * rows * d * F32) * 2 + batch * heads * rows * F32
    assert shared.bytes_excluding([w_out]) == expected + rows * 8


def test_norms_save_kept_rows_of_x():
    x = torch.randn(4, 64, 32, requires_grad=True)
    weight, bias = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    keep = keep_set(64, 0.25)
    x_kept = 4 * keep.numel() * 32 * F32
    with saved_bytes() as saved:
        sbp_kernels.layer_norm(x, weight, bias, keep)
    assert saved.bytes_excluding([weight, bias]) == x_kept + keep.numel() * 8
    with saved_bytes() as saved:
        sbp_kernels.rms_norm(x, weight, keep)
    assert saved.bytes_excluding([weight]) == x_kept + keep.numel() * 8


def test_linear_cross_entropy_saves_kept_rows_and_their_lse():
    """h_K, the kept rows' targets and float32 lse: the [rows, vocab] logits are never saved."""
    h = torch.randn(2, 64, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=True)
    target = torch.randint(0, 1000, (2, 64))
    keep = keep_set(64, 0.25)
    rows = 2 * keep.numel()
    with saved_bytes() as saved:
        sbp_kernels.linear_cross_entropy(h, weight, target, keep)
    # h_K, targets (int64) and lse (float32) of kept rows, the keep set, the mean's divisor
    assert saved.bytes_excluding([weight]) == rows * 32 * F32 + rows * 8 + rows * F32 + keep.numel() * 8 + 8


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(10, 10, requires_grad=True)
    with saved_bytes() as saved:
        (x * x).sum()  # mul saves x twice (self and other): one storage
    assert saved.bytes == 400


def test_bytes_excluding_parameters():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with saved_bytes() as saved:
        lin(x)
    assert saved.bytes == 3 * 8 * 4 + 4 * 8 * 4  # x and the weight
    assert saved.bytes_excluding(lin.parameters()) == 3 * 8 * 4
