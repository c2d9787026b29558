"""sbp.linear and sbp.pointwise_conv on the CPU backends vs dense autograd (DESIGN.md 3.1, 3.2)."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import (
    CPU_BACKENDS, R1_TOL, assert_close, assert_grads_close, backward_flops, dropped, keep_set, masked_dense_grads,
    sbp_grads,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _keep(n, r):
    return keep_set(n, r, seed=n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead, n, c_in, c_out, r",
    [((2,), 37, 16, 24, 0.5), ((2, 3), 10, 8, 5, 0.25), ((), 7, 3, 4, 0.5), ((1,), 1, 4, 4, 1.0), ((3,), 33, 5, 7, 0.01)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_masked_dense(backend, dtype, lead, n, c_in, c_out, r, with_bias):
    x = torch.randn(*lead, n, c_in, dtype=dtype)
    w = torch.randn(c_out, c_in, dtype=dtype) / c_in**0.5
    b = torch.randn(c_out, dtype=dtype) if with_bias else None
    dy = torch.randn(*lead, n, c_out, dtype=dtype)
    keep = _keep(n, r)
    if r == 0.01:
        assert keep.numel() == 1
    out, grads = sbp_grads(lambda *t: sbp_kernels.linear(*t, keep, 0.7, backend=backend), [x, w, b], dy)
    _, ref_grads = masked_dense_grads(F.linear, [x, w, b], dy, keep, -2, 0.7)
    assert torch.equal(out, F.linear(x, w, b))  # forward is the dense op, same numbers
    assert_grads_close(grads, ref_grads, dtype)
    assert grads[0].dtype == dtype
    assert not grads[0][..., dropped(keep, n), :].any()  # dropped rows get exactly zero


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_r1_equals_dense_autograd_float64(backend):
    x = torch.randn(4, 19, 12, dtype=torch.float64)
    w, b = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    dy = torch.randn(4, 19, 9, dtype=torch.float64)
    out, grads = sbp_grads(lambda *t: sbp_kernels.linear(*t, torch.arange(19), backend=backend), [x, w, b], dy)
    ref_out, ref_grads = sbp_grads(F.linear, [x, w, b], dy)
    assert torch.equal(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        assert torch.equal(g, ref)  # the same GEMMs on the same rows


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape, c_out, r, weight_2d",
    [((2, 6, 5, 7), 4, 0.5, False), ((1, 3, 4, 4), 5, 0.25, True), ((2, 4, 1, 1), 3, 1.0, True)],
)
def test_pointwise_conv_matches_masked_dense(backend, dtype, channels_last, shape, c_out, r, weight_2d):
    batch, c_in, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).to(memory_format=fmt)
    weight = torch.randn(c_out, c_in, 1, 1, dtype=dtype) / c_in**0.5
    weight = weight.flatten(1) if weight_2d else weight
    b = torch.randn(c_out, dtype=dtype)
    dy = torch.randn(batch, c_out, h, w, dtype=dtype).to(memory_format=fmt)
    keep = sbp_kernels.sample_keep_indices((h, w), r, "grid", torch.Generator().manual_seed(1))
    out, grads = sbp_grads(lambda *t: sbp_kernels.pointwise_conv(*t, keep, 1.3, backend=backend), [x, weight, b], dy)

    def dense(x, weight, b):
        return F.conv2d(x, weight.view(c_out, c_in, 1, 1), b).flatten(2)

    _, ref_grads = masked_dense_grads(dense, [x, weight, b], dy.flatten(2), keep, -1, 1.3)
    assert torch.equal(out, F.conv2d(x, weight.view(c_out, c_in, 1, 1), b))
    assert_grads_close(grads, ref_grads, dtype)
    assert grads[1].shape == weight.shape
    assert not grads[0].flatten(2)[..., dropped(keep, h * w)].any()
    # grad_x keeps x's memory format (no full-size permute on the way back).
    if channels_last and h * w > 1:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    else:
        assert grads[0].is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_r1_equals_dense_autograd_float64(backend, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64).to(memory_format=fmt)
    w, b = torch.randn(4, 6, 1, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    dy = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(memory_format=fmt)
    out, grads = sbp_grads(lambda *t: sbp_kernels.pointwise_conv(*t, torch.arange(15), backend=backend), [x, w, b], dy)
    ref_out, ref_grads = sbp_grads(F.conv2d, [x, w, b], dy)
    assert torch.equal(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **R1_TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_float64_gradcheck(backend):
    """gradcheck at r=1 in float64: the analytic backward is the true derivative."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    keep = torch.arange(5)
    assert torch.autograd.gradcheck(lambda *t: sbp_kernels.linear(*t, keep, backend=backend), (x, w, b))


# (x, weight, bias) requires_grad flags -> which GEMMs the backward may run
FROZEN_CASES = [
    (True, False, False), (False, True, False), (False, False, True), (True, False, True), (True, True, True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("flags", FROZEN_CASES)
@pytest.mark.parametrize("op", ["linear", "pointwise_conv"])
def test_frozen_weight_and_input_without_grad(backend, flags, op):
    """What needs no gradient gets None, and (torch backend, where FLOPs are observable) its GEMM
    is not run: a frozen LoRA base weight costs no dW GEMM, an input without grad no dx GEMM."""
    batch, n, c_in, c_out = 2, 12, 6, 5
    keep = _keep(n, 0.5)
    if op == "linear":
        x, w = torch.randn(batch, n, c_in), torch.randn(c_out, c_in)
        fn, dense = sbp_kernels.linear, F.linear
    else:
        x, w = torch.randn(batch, c_in, 3, 4), torch.randn(c_out, c_in, 1, 1)
        fn, dense = sbp_kernels.pointwise_conv, F.conv2d
    b = torch.randn(c_out)
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip((x, w, b), flags)]
    out = fn(*leaves, keep, backend=backend)
    dy = torch.randn_like(out)
    flops = backward_flops(out, dy)  # counted for the torch backend's GEMMs only
    rows = dy if op == "linear" else dy.flatten(2).transpose(1, 2)
    _, ref = masked_dense_grads(
        dense if op == "linear" else lambda *t: F.conv2d(*t).flatten(2).transpose(1, 2), [x, w, b], rows, keep, -2
    )
    for leaf, flag, expected in zip(leaves, flags, ref):
        if flag:
            assert_close(leaf.grad, expected, torch.float32)
        else:
            assert leaf.grad is None
    if backend == "torch":
        gemm = 2 * batch * keep.numel() * c_in * c_out
        assert sum(flops.values()) == gemm * (flags[0] + flags[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["linear", "pointwise_conv"])
@pytest.mark.parametrize("c_in, c_out", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_zero_width_features_behave_like_nn_linear(backend, op, c_in, c_out, with_bias):
    """c_in = 0 or c_out = 0: forward and backward as nn.Linear's (on every pixel for the 1x1
    conv, where F.conv2d itself refuses c_out = 0 and drops the bias for c_in = 0)."""
    keep = torch.tensor([0, 2, 5])
    if op == "linear":
        x, w = torch.randn(2, 6, c_in), torch.randn(c_out, c_in)
        fn, rows, unrows = sbp_kernels.linear, (lambda t: t), (lambda t: t)
    else:
        x, w = torch.randn(2, c_in, 2, 3), torch.randn(c_out, c_in, 1, 1)
        fn = sbp_kernels.pointwise_conv

        def rows(t):
            return t.flatten(2).transpose(1, 2)

        def unrows(t):
            return t.transpose(1, 2).reshape(2, -1, 2, 3)

    b = torch.randn(c_out) if with_bias else None
    dense = torch.nn.Linear(c_in, c_out, bias=with_bias)
    with torch.no_grad():
        dense.weight.copy_(w.reshape(c_out, c_in))
        if with_bias:
            dense.bias.copy_(b)
    dy = torch.randn(2, 6, c_out)
    out, grads = sbp_grads(lambda *t: fn(*t, keep, 2.0, backend=backend), [x, w, b], unrows(dy))
    x_rows = rows(x).clone().requires_grad_()
    ref_out = dense(x_rows)
    ref_out.backward(dy * torch.zeros(6, 1).index_fill(0, keep, 2.0))
    torch.testing.assert_close(rows(out), ref_out.detach())
    assert out.shape == unrows(ref_out).shape
    torch.testing.assert_close(rows(grads[0]), x_rows.grad)
    torch.testing.assert_close(grads[1], dense.weight.grad.view(w.shape))
    if with_bias:
        torch.testing.assert_close(grads[2], dense.bias.grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_outputs(requires_grad):
    def meta(*shape):
        return torch.empty(*shape, device="meta", requires_grad=requires_grad)

    keep = torch.tensor([0, 2, 3], device="meta")
    out = sbp_kernels.linear(meta(2, 5, 4), meta(3, 4), meta(3), keep)
    assert out.device.type == "meta" and out.shape == (2, 5, 3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.empty(2, 4, 2, 3, device="meta").to(memory_format=fmt).requires_grad_(requires_grad)
        out = sbp_kernels.pointwise_conv(x, meta(7, 4, 1, 1), None, keep)
        assert out.device.type == "meta" and out.shape == (2, 7, 2, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("keep_dtype", [torch.int64, torch.int32])
def test_keep_idx_from_inference_mode_and_int32(backend, keep_dtype):
    with torch.inference_mode():
        keep = torch.tensor([1, 4, 8], dtype=keep_dtype)
    x = torch.randn(2, 9, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    sbp_kernels.linear(x, w, None, keep, backend=backend).sum().backward()
    assert torch.equal(x.grad[:, [1, 4, 8]], w.sum(0).expand(2, 3, 4))
    assert not x.grad[:, dropped(keep, 9)].any()
    torch.testing.assert_close(w.grad, x.detach()[:, [1, 4, 8]].sum((0, 1)).expand(3, 4))
    img = torch.randn(2, 4, 3, 3, requires_grad=True)
    sbp_kernels.pointwise_conv(img, w, None, keep, backend=backend).sum().backward()
    assert not img.grad.flatten(2)[..., dropped(keep, 9)].any()
    assert img.grad.flatten(2)[..., [1, 4, 8]].abs().min() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_on_a_transposed_view(backend):
    """x [B, n, c] as a view of a position-first [n, B, c] tensor (nn.MultiheadAttention's layout)."""
    x = torch.randn(9, 2, 6).transpose(0, 1)
    w, b = torch.randn(5, 6), torch.randn(5)
    dy = torch.randn(2, 9, 5)
    keep = _keep(9, 0.5)
    out, grads = sbp_grads(lambda *t: sbp_kernels.linear(*t, keep, backend=backend), [x, w, b], dy)
    _, ref_grads = masked_dense_grads(F.linear, [x, w, b], dy, keep, -2)
    torch.testing.assert_close(out, F.linear(x, w, b))
    assert_grads_close(grads, ref_grads, torch.float32)
