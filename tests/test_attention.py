"""sbp.attention with the torch backend (DESIGN.md 3.3).

Oracles: the formulas of DESIGN 3.3 written out on the full score matrix (independent of the
reference's blocking), and float64 dense autograd of softmax attention with the output gradient
zeroed on dropped queries (helpers.masked_dense_grads); for mode "qkv" the dense graph also stops
at dropped keys and values (their scores and values detached), which is exactly the kept-tokens
backward: P_ij keeps the full softmax normaliser and D_i = dO_i . o_i the full output.
Covered: multi-head and grouped-query attention, key padding (left, right, rows with no key at
all), additive bias with its gradient, dropout with PyTorch's mask, causal, modes "qkv" and "q",
r = 1 vs SDPA autograd, the forward vs SDPA, the [B, n, h, d] output layout.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import R1_TOL, TOL, dropped, keep_set, masked_dense_grads
from sbp_kernels import backend as _backend
from sbp_kernels import reference
from sbp_kernels.ops.attention import _limits, attention


def _qkv(shape, dtype=torch.float32, kv_heads=None):
    batch, heads, n, d = shape
    kv_shape = (batch, kv_heads or heads, n, d)
    return torch.randn(shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)


def _keep(n, r, seed=0):
    return keep_set(n, r, seed)


def padding_mask(kind, batch, n):
    """[B, n] bool (True = a real token): None, left / right padding, or a sample without any
    real token beside one with left padding ("empty")."""
    if kind is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.bool)
    if kind == "left":
        mask[0, :3] = False
    elif kind == "right":
        mask[-1, n - 4:] = False
    elif kind == "empty":
        mask[0, :] = False
        mask[-1, :2] = False
    return mask


def dense_attention(q, k, v, attn_bias=None, *, keep, causal, scale, mode, key_padding_mask=None, drop_mask=None,
                    dropout_p=0.0):
    """Dense softmax attention whose autograd gives SBP's gradients once dO is zeroed on dropped
    queries (see the module docstring). Rows without any key give 0 (and no NaN)."""
    batch, heads, n, _ = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)
    if attn_bias is not None:
        s = s + attn_bias
    masked = torch.zeros(batch, 1, n, n, dtype=torch.bool)
    if causal:
        masked = masked | torch.ones(n, n, dtype=torch.bool).triu(1)
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask[:, None, None, :]
    has_key = ~masked.all(-1, keepdim=True)
    s = s.masked_fill(masked, float("-inf")).masked_fill(~has_key, 0.0)
    if mode == "qkv":
        kept = ~dropped(keep, n)
        s = torch.where(kept, s, s.detach())
        v = torch.where(kept[:, None], v, v.detach())
    p = torch.softmax(s, -1) * has_key
    if drop_mask is not None:
        p = p * drop_mask / (1 - dropout_p)
    return p @ v


def dense_formula_grads(q, k, v, dout, keep, causal, scale, mode, grad_scale):
    """DESIGN 3.3 from the full score matrix, in float64, with plain matrix ops."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    n = q.shape[2]
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p_full = torch.exp(s - lse)
    o = p_full @ v
    cols = keep if mode == "qkv" else torch.arange(n)
    p = p_full[:, :, keep][:, :, :, cols]  # rows: kept queries, cols: kept (or all) keys
    do_k, o_k, q_k = dout[:, :, keep], o[:, :, keep], q[:, :, keep]
    k_c, v_c = k[:, :, cols], v[:, :, cols]
    dv_c = p.transpose(-1, -2) @ do_k
    dp = do_k @ v_c.transpose(-1, -2)
    d_row = (do_k * o_k).sum(-1, keepdim=True)
    ds = p * (dp - d_row)
    dq_k = scale * ds @ k_c
    dk_c = scale * ds.transpose(-1, -2) @ q_k
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[:, :, keep] = dq_k
    dk[:, :, cols] = dk_c
    dv[:, :, cols] = dv_c
    return o, [g * grad_scale for g in (dq, dk, dv)]


def sbp_attention_grads(inputs, dout, keep, **kwargs):
    """(out, grads) of attention(q, k, v, keep, attn_bias=inputs[3] if given, **kwargs)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    bias = leaves[3] if len(leaves) > 3 else None
    out = attention(*leaves[:3], keep, attn_bias=bias, **kwargs)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _check(out, grads, ref_out, ref_grads, dtype):
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref.shape
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, r", [(37, 1.0), (37, 0.5), (37, 0.01), (1, 1.0), (16, 0.25)])
def test_backward_matches_dense_formulas(dtype, tol, mode, causal, n, r):
    q, k, v = _qkv((2, 3, n, 8), dtype)
    dout = torch.randn(2, 3, n, 8, dtype=dtype)
    keep = _keep(n, r, seed=n)
    if r == 0.01:
        assert keep.numel() == 1
    out, grads = sbp_attention_grads([q, k, v], dout, keep, causal=causal, scale=0.4, mode=mode, grad_scale=1.5,
                                     backend="torch")
    ref_out, ref_grads = dense_formula_grads(q, k, v, dout, keep, causal, 0.4, mode, 1.5)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), ref, atol=tol, rtol=tol)
    off = dropped(keep, n)
    assert not grads[0][:, :, off].any()
    if mode == "qkv":
        assert not grads[1][:, :, off].any() and not grads[2][:, :, off].any()


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "heads, kv_heads, dtype",
    [(3, 3, torch.float64), (4, 2, torch.float64), (4, 1, torch.float32), (4, 2, torch.float16)],
    ids=str,
)
def test_gqa_and_key_padding_match_masked_dense(mode, causal, heads, kv_heads, dtype):
    """Multi-head and grouped-query attention (k, v gradients summed over the query heads of their
    group) with key padding on the left, on the right and with rows that have no key at all (out
    0, no NaN); float16 within the looser tolerance of helpers.TOL."""
    n = 11
    keep = _keep(n, 0.5, seed=heads + kv_heads)
    for kind in (None, "left", "right", "empty"):
        q, k, v = _qkv((2, heads, n, 8), dtype, kv_heads)
        dout = torch.randn(2, heads, n, 8, dtype=dtype)
        mask = padding_mask(kind, 2, n)
        kwargs = dict(causal=causal, scale=0.3, mode=mode)
        out, grads = sbp_attention_grads([q, k, v], dout, keep, key_padding_mask=mask, grad_scale=1.5, **kwargs)
        ref_out, ref_grads = masked_dense_grads(
            lambda *t: dense_attention(*t, keep=keep, key_padding_mask=mask, **kwargs), [q, k, v], dout, keep, 2, 1.5
        )
        _check(out, grads, ref_out, ref_grads, dtype)
        assert not grads[0][:, :, dropped(keep, n)].any()
        if kind == "empty":  # the sample without a real token
            assert not out[0].any() and not grads[0][0].any()


@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_rows_without_keys(mode):
    """Causal attention with left padding: the first query rows see only padding. Their output is
    exactly 0, their lse +inf, and every gradient is finite."""
    q, k, v = _qkv((2, 2, 9, 4), torch.float64)
    mask = padding_mask("left", 2, 9)
    keep = torch.tensor([0, 1, 4, 8])
    out, lse, _ = torch.ops.sbp.attention_forward(q, k, v, keep, True, None, mode, 1.0, mask, None, 0.0, "torch")
    assert not out[0, :, :3].any() and torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] > 0).all()
    assert torch.isfinite(lse[0, :, 3:]).all() and torch.isfinite(lse[1]).all()
    dout = torch.randn_like(q)
    out, grads = sbp_attention_grads([q, k, v], dout, keep, causal=True, mode=mode, key_padding_mask=mask)
    for g in grads:
        assert torch.isfinite(g).all()
    assert not grads[0][0, :, :3].any()


BIAS_SHAPES = [(3, 9, 9), (2, 3, 9, 9), (2, 1, 9, 9), (1, 3, 1, 9), (9, 9), (1, 1, 9, 1)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES)
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
def test_attn_bias_and_its_gradient(bias_shape, mode, causal):
    """An additive bias broadcastable to [B, h, n, n] (relative position bias) gets the gradient
    of the scores, summed over its broadcast dims, on kept queries (and kept keys in mode qkv)."""
    q, k, v = _qkv((2, 3, 9, 8), torch.float64)
    bias = torch.randn(bias_shape, dtype=torch.float64)
    dout = torch.randn_like(q)
    keep = _keep(9, 0.5, seed=len(bias_shape))
    mask = padding_mask("right", 2, 9)
    kwargs = dict(causal=causal, scale=0.35, mode=mode)
    out, grads = sbp_attention_grads([q, k, v, bias], dout, keep, key_padding_mask=mask, grad_scale=0.5, **kwargs)
    ref_out, ref_grads = masked_dense_grads(
        lambda *t: dense_attention(*t, keep=keep, key_padding_mask=mask, **kwargs), [q, k, v, bias], dout, keep, 2, 0.5
    )
    _check(out, grads, ref_out, ref_grads, torch.float64)
    assert grads[3].shape == bias.shape


def test_frozen_bias_and_inputs_get_no_gradient():
    q, k, v = _qkv((1, 2, 7, 4))
    bias = torch.randn(2, 7, 7)
    keep = torch.tensor([0, 3, 6])
    dout = torch.randn_like(q)
    q_leaf, k_leaf = q.clone().requires_grad_(), k.clone().requires_grad_()
    attention(q_leaf, k_leaf, v, keep, attn_bias=bias).backward(dout)
    _, ref = masked_dense_grads(
        lambda *t: dense_attention(*t, keep=keep, causal=False, scale=0.5, mode="qkv"), [q, k, v, bias], dout, keep, 2
    )
    torch.testing.assert_close(q_leaf.grad.double(), ref[0], **TOL[torch.float32])
    torch.testing.assert_close(k_leaf.grad.double(), ref[1], **TOL[torch.float32])
    assert v.grad is None and bias.grad is None
    bias_leaf = bias.clone().requires_grad_()
    attention(q, k, v, keep, attn_bias=bias_leaf).backward(dout)  # only the bias trains
    torch.testing.assert_close(bias_leaf.grad.double(), ref[3], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_draws_sdpa_mask(dtype, mode, causal):
    """dropout_p: with the same seed the output is F.scaled_dot_product_attention(dropout_p=...)'s
    on CPU (the same mask), and the gradients use that mask on the kept block."""
    p = 0.3
    q, k, v = _qkv((2, 4, 10, 8), dtype, kv_heads=2)
    mask = padding_mask("left", 2, 10)
    keep = _keep(10, 0.5, seed=7)
    dout = torch.randn_like(q)
    torch.manual_seed(21)
    out, grads = sbp_attention_grads([q, k, v], dout, keep, causal=causal, mode=mode, key_padding_mask=mask,
                                     dropout_p=p)
    torch.manual_seed(21)
    additive = torch.zeros(2, 1, 1, 10, dtype=dtype).masked_fill(~mask[:, None, None], float("-inf"))
    if causal:
        additive = additive.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=p, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, **TOL[dtype])
    torch.manual_seed(21)
    drop_mask = F.dropout(torch.ones(2, 4, 10, 10, dtype=dtype), p) != 0
    assert 0 < drop_mask.sum() < drop_mask.numel()
    torch.manual_seed(21)
    _, _, kept_mask = torch.ops.sbp.attention_forward(
        q.requires_grad_(), k, v, keep, causal, None, mode, 1.0, mask, None, p, "torch"
    )
    rows = drop_mask[:, :, keep]
    assert torch.equal(kept_mask, rows[..., keep] if mode == "qkv" else rows)
    ref_out, ref_grads = masked_dense_grads(
        lambda *t: dense_attention(*t, keep=keep, causal=causal, scale=8**-0.5, mode=mode, key_padding_mask=mask,
                                   drop_mask=drop_mask, dropout_p=p),
        [q, k, v], dout, keep, 2,
    )
    _check(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_matches_masked_dense(mode, causal):
    """reference.attention_backward itself (the torch backend off CPU; on CPU mode "qkv" may run
    PyTorch's fused kernel instead), with GQA and key padding including rows without keys."""
    n = 10
    q, k, v = _qkv((2, 4, n, 8), torch.float64, kv_heads=2)
    dout = torch.randn_like(q)
    keep = _keep(n, 0.5, seed=3)
    mask = padding_mask("empty", 2, n)
    out, lse = reference.attention_forward(q, k, v, causal, 0.3, mask)
    cols = keep if mode == "qkv" else torch.arange(n)
    grads = reference.attention_backward(
        dout[:, :, keep], q[:, :, keep], k[:, :, cols], v[:, :, cols], out[:, :, keep], lse[:, :, keep], keep, n,
        causal, 0.3, mode, 1.5, mask,
    )
    ref_out, ref = masked_dense_grads(
        lambda *t: dense_attention(*t, keep=keep, causal=causal, scale=0.3, mode=mode, key_padding_mask=mask),
        [q, k, v], dout, keep, 2, 1.5,
    )
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    assert grads[3] is None
    for g, r in zip(grads[:3], ref):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_reference_backward_query_blocks(monkeypatch):
    """The reference's query-row blocking (memory bound) gives the unblocked numbers, also with
    GQA, padding and a bias."""
    q, k, v = _qkv((2, 4, 29, 8), torch.float64, kv_heads=2)
    bias = torch.randn(4, 29, 29, dtype=torch.float64)
    dout = torch.randn_like(q)
    keep = _keep(29, 0.5)
    mask = padding_mask("right", 2, 29)
    for mode in ("qkv", "q"):
        kwargs = dict(causal=True, mode=mode, key_padding_mask=mask, backend="torch")
        full = sbp_attention_grads([q, k, v, bias], dout, keep, **kwargs)[1]
        monkeypatch.setattr(reference, "_ATTENTION_BLOCK_ELEMENTS", 40)  # blocks of one query row
        blocked = sbp_attention_grads([q, k, v, bias], dout, keep, **kwargs)[1]
        monkeypatch.undo()
        for a, b in zip(full, blocked):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, R1_TOL), (torch.float32, dict(atol=1e-5, rtol=1e-5))])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extras", ["plain", "gqa_padding_bias"])
def test_r1_equals_sdpa_autograd(dtype, tol, mode, causal, extras):
    kv_heads = 2 if extras != "plain" else 4
    q, k, v = _qkv((2, 4, 23, 16), dtype, kv_heads)
    dout = torch.randn_like(q)
    inputs, mask, sdpa_mask = [q, k, v], None, None
    if extras != "plain":
        mask = padding_mask("right", 2, 23)
        bias = torch.randn(4, 23, 23, dtype=dtype)
        inputs.append(bias)
    out, grads = sbp_attention_grads(inputs, dout, torch.arange(23), causal=causal, mode=mode, key_padding_mask=mask,
                                     backend="torch")
    ref = [t.clone().requires_grad_() for t in inputs]
    if extras != "plain":
        sdpa_mask = ref[3] + torch.zeros(2, 1, 1, 23, dtype=dtype).masked_fill(~mask[:, None, None], float("-inf"))
        if causal:
            sdpa_mask = sdpa_mask.masked_fill(torch.ones(23, 23, dtype=torch.bool).triu(1), float("-inf"))
    ref_out = F.scaled_dot_product_attention(
        *ref[:3], attn_mask=sdpa_mask, is_causal=causal and sdpa_mask is None, enable_gqa=True
    )
    ref_out.backward(dout)
    torch.testing.assert_close(out, ref_out.detach(), **tol)
    for g, t in zip(grads, ref):
        torch.testing.assert_close(g, t.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_forward_equals_sdpa(dtype, causal, scale, kv_heads):
    q, k, v = _qkv((2, 3, 21, 16), dtype, kv_heads)
    out = attention(q, k, v, _keep(21, 0.5), causal=causal, scale=scale, backend="torch")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_output_is_laid_out_b_n_h_d(requires_grad, dropout_p):
    """The output is the [B, h, n, d] view of a [B, n, h, d] buffer: the models' reshape to
    [B, n, h * d] is a view."""
    q, k, v = (t.requires_grad_(requires_grad) for t in _qkv((2, 3, 5, 4)))
    out = attention(q, k, v, torch.tensor([1, 3]), dropout_p=dropout_p)
    assert out.shape == (2, 3, 5, 4) and out.transpose(1, 2).is_contiguous()
    assert out.transpose(1, 2).view(2, 5, 12).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_forward_lse_is_full_softmax_lse(causal, kv_heads):
    q, k, v = _qkv((1, 2, 19, 8), torch.float64, kv_heads)
    keep = _keep(19, 0.5)
    out, lse, drop = torch.ops.sbp.attention_forward(q, k, v, keep, causal, 0.5, "qkv", 1.0, None, None, 0.0, "torch")
    s = 0.5 * q @ k.repeat_interleave(2 // kv_heads, 1).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)
    assert drop.numel() == 0 and drop.dtype == torch.bool
    q32 = q.float()
    lse32 = torch.ops.sbp.attention_forward(q32, q32, q32, keep, causal, None, "q", 1.0, None, None, 0.0, "torch")[1]
    assert lse32.dtype == torch.float32 and lse32.shape == (1, 2, 19)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_forward_equals_sdpa(dtype, causal, monkeypatch):
    """reference.attention_forward (the torch backend off CPU), with and without query blocks,
    with GQA, key padding and a bias."""
    q, k, v = _qkv((2, 4, 27, 16), dtype, kv_heads=2)
    mask = padding_mask("left", 2, 27)
    bias = torch.randn(4, 27, 27, dtype=dtype)
    additive = bias + torch.zeros(2, 1, 1, 27, dtype=dtype).masked_fill(~mask[:, None, None], float("-inf"))
    if causal:
        additive = additive.masked_fill(torch.ones(27, 27, dtype=torch.bool).triu(1), float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.25, enable_gqa=True)
    ref = ref.nan_to_num(0.0)  # causal rows whose keys are all padding: SDPA gives NaN, the op 0
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for block in (None, 60):
        if block:
            monkeypatch.setattr(reference, "_ATTENTION_BLOCK_ELEMENTS", block)
        out, lse = reference.attention_forward(q, k, v, causal, 0.25, mask, bias)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_outputs(requires_grad):
    q = torch.empty(2, 4, 5, 8, device="meta", requires_grad=requires_grad)
    kv = torch.empty(2, 2, 5, 8, device="meta")
    keep = torch.tensor([0, 2, 3], device="meta")
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    bias = torch.empty(4, 5, 5, device="meta", requires_grad=requires_grad)
    for kwargs in ({}, dict(mode="q", causal=True), dict(key_padding_mask=mask, attn_bias=bias, dropout_p=0.1)):
        out = attention(q, kv, kv, keep, **kwargs)
        assert out.device.type == "meta" and out.shape == (2, 4, 5, 8)


@pytest.mark.parametrize("keep_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_keep_idx_from_inference_mode_and_int32(keep_dtype, mode):
    with torch.inference_mode():
        keep = torch.tensor([1, 4, 5], dtype=keep_dtype)
    q, k, v = _qkv((1, 2, 6, 8), torch.float64)
    bias = torch.randn(2, 6, 6, dtype=torch.float64)
    dout = torch.randn_like(q)
    out, grads = sbp_attention_grads([q, k, v, bias], dout, keep, mode=mode, scale=1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0))
    long_keep = torch.tensor([1, 4, 5])
    _, ref = masked_dense_grads(
        lambda *t: dense_attention(*t, keep=long_keep, causal=False, scale=1.0, mode=mode), [q, k, v, bias], dout,
        long_keep, 2,
    )
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_autocast_casts_inputs():
    q, k, v = _qkv((1, 2, 9, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, torch.arange(9), backend="torch")
    assert out.dtype == torch.bfloat16


def test_auto_falls_back_to_torch_once_for_what_triton_lacks(monkeypatch):
    """A bias or attention dropout: "auto" runs the torch backend on a GPU with one warning, an
    explicit "triton" refuses with the reason (resolve() only decides: nothing runs)."""
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_triton_error", None)
    q = torch.empty(1, 2, 4, 64)
    cuda = torch.device("cuda")
    for limits, reason in ((_limits(q, q, None, torch.empty(4, 4), 0.0), "additive bias"),
                           (_limits(q, q, None, None, 0.1), "dropout"),
                           (_limits(q[..., :8], q[..., :8], None, None, 0.0), "head dim d=8")):
        with pytest.warns(UserWarning, match=reason):
            assert _backend.resolve("auto", "attention", cuda, limits=limits) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.resolve("auto", "attention", cuda, limits=limits) == "torch"
        with pytest.raises(ValueError, match=reason):
            _backend.resolve("triton", "attention", cuda, limits=limits)
        assert limits("torch") is None


def test_int_scale_is_accepted():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 6, 8)))
    out = attention(q, k, v, torch.tensor([1, 4]), scale=1)
    out.sum().backward()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=1.0))
    assert q.grad[:, :, [0, 2, 3, 5]].abs().sum() == 0


def test_public_name():
    assert sbp_kernels.attention is attention
