"""sbp.attention with the torch backend (DESIGN.md 3.3): reference backward vs an independent dense
implementation of the formulas, r = 1 vs SDPA autograd, forward vs SDPA, saved bytes, opcheck,
torch.compile, bad input."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sbp_kernels import backend as _backend
from sbp_kernels import reference
from sbp_kernels.memory import saved_bytes
from sbp_kernels.ops.attention import _limits, attention
from sbp_kernels.sampling import sample_keep_indices


def _qkv(shape, dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _keep(n, r, seed=0):
    return sample_keep_indices((n,), r, "random", torch.Generator().manual_seed(seed))


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


def sbp_attention_grads(q, k, v, dout, keep, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, keep, **kwargs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, r", [(37, 1.0), (37, 0.5), (37, 0.25), (37, 0.01), (1, 1.0), (16, 0.5)])
def test_backward_matches_dense_formulas(dtype, tol, mode, causal, n, r):
    q, k, v = _qkv((2, 3, n, 8), dtype)
    dout = torch.randn(2, 3, n, 8, dtype=dtype)
    keep = _keep(n, r, seed=n)
    if r == 0.01:
        assert keep.numel() == 1
    out, grads = sbp_attention_grads(q, k, v, dout, keep, causal=causal, scale=0.4, mode=mode, grad_scale=1.5,
                                     backend="torch")
    ref_out, ref_grads = dense_formula_grads(q, k, v, dout, keep, causal, 0.4, mode, 1.5)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), ref, atol=tol, rtol=tol)
    dropped = torch.ones(n, dtype=torch.bool).index_fill(0, keep, False)
    assert not grads[0][:, :, dropped].any()
    if mode == "qkv":
        assert not grads[1][:, :, dropped].any() and not grads[2][:, :, dropped].any()


def test_reference_backward_query_blocks(monkeypatch):
    """The reference's query-row blocking (memory bound) gives the unblocked numbers."""
    q, k, v = _qkv((1, 2, 29, 8), torch.float64)
    dout = torch.randn(1, 2, 29, 8, dtype=torch.float64)
    keep = _keep(29, 0.5)
    for mode in ("qkv", "q"):
        full = sbp_attention_grads(q, k, v, dout, keep, causal=True, mode=mode, backend="torch")[1]
        monkeypatch.setattr(reference, "_ATTENTION_BLOCK_ELEMENTS", 40)  # blocks of one query row
        blocked = sbp_attention_grads(q, k, v, dout, keep, causal=True, mode=mode, backend="torch")[1]
        monkeypatch.undo()
        for a, b in zip(full, blocked):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
def test_r1_equals_sdpa_autograd(dtype, tol, mode, causal):
    q, k, v = _qkv((2, 2, 23, 16), dtype)
    dout = torch.randn(2, 2, 23, 16, dtype=dtype)
    out, grads = sbp_attention_grads(q, k, v, dout, torch.arange(23), causal=causal, mode=mode, backend="torch")
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*ref, is_causal=causal)
    ref_out.backward(dout)
    torch.testing.assert_close(out, ref_out.detach(), atol=tol, rtol=tol)
    for g, t in zip(grads, ref):
        torch.testing.assert_close(g, t.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_forward_equals_sdpa(dtype, causal, scale):
    q, k, v = _qkv((2, 3, 21, 16), dtype)
    out = attention(q, k, v, _keep(21, 0.5), causal=causal, scale=scale, backend="torch")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_lse_is_full_softmax_lse(causal):
    q, k, v = _qkv((1, 2, 19, 8), torch.float64)
    out, lse = torch.ops.sbp.attention_forward(q, k, v, _keep(19, 0.5), causal, 0.5, "qkv", 1.0, "torch")
    s = 0.5 * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)
    q32 = q.float()
    lse32 = torch.ops.sbp.attention_forward(q32, q32, q32, _keep(19, 0.5), causal, None, "q", 1.0, "torch")[1]
    assert lse32.dtype == torch.float32 and lse32.shape == (1, 2, 19)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_forward_equals_sdpa(dtype, causal, monkeypatch):
    """reference.attention_forward (the torch backend off CPU), with and without query blocks."""
    q, k, v = _qkv((2, 2, 27, 16), dtype)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.25)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for block in (None, 60):
        if block:
            monkeypatch.setattr(reference, "_ATTENTION_BLOCK_ELEMENTS", block)
        out, lse = reference.attention_forward(q, k, v, causal, 0.25)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_saved_bytes_mode_qkv():
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2, 512, 64)))
    keep = _keep(512, 0.5)
    with saved_bytes() as saved:
        out = attention(q, k, v, keep, backend="torch")
    qkvo = 4 * q.numel() * q.element_size()
    assert saved.bytes <= 0.55 * qkvo
    assert saved.bytes >= 0.5 * qkvo  # the kept rows of q, k, v, o are all there
    out.sum().backward()


def test_saved_bytes_mode_q_keeps_k_v_whole():
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2, 512, 64)))
    keep = _keep(512, 0.5)
    with saved_bytes() as saved:
        attention(q, k, v, keep, mode="q", backend="torch")
    one = q.numel() * q.element_size()
    # k and v whole (2 x one), q and o kept rows (2 x one / 2), lse and keep_idx (tiny).
    assert 3 * one <= saved.bytes <= 3.05 * one


@pytest.mark.parametrize("mode, causal", [("qkv", False), ("q", True)])
def test_opcheck_attention_forward(mode, causal):
    q, k, v = _qkv((2, 2, 11, 8))
    keep = _keep(11, 0.5)
    torch.library.opcheck(torch.ops.sbp.attention_forward.default, (q, k, v, keep, causal, None, mode, 2.0, "torch"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sbp.attention_forward.default, (q, k, v, keep, causal, 0.3, mode, 2.0, "torch"))


@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_compile_fullgraph_same_grads(mode):
    q, k, v = _qkv((2, 2, 13, 8))
    keep = _keep(13, 0.5)

    def f(q, k, v):
        return (attention(q, k, v, keep, causal=True, mode=mode, grad_scale=2.0, backend="torch") ** 2).sum()

    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager).backward()
    compiled = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_autocast_casts_inputs():
    q, k, v = _qkv((1, 2, 9, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, torch.arange(9), backend="torch")
    assert out.dtype == torch.bfloat16


def test_auto_falls_back_to_torch_once_for_unsupported_head_dim(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    q = torch.empty(1, 2, 4, 8)
    cuda = torch.device("cuda")  # resolve() only decides; nothing runs on the device
    with pytest.warns(UserWarning, match="head dim d=8"):
        assert _backend.resolve("auto", "attention", cuda, limits=_limits(q)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("auto", "attention", cuda, limits=_limits(q)) == "torch"
    with pytest.raises(ValueError, match="head dim d=8"):
        _backend.resolve("triton", "attention", cuda, limits=_limits(q))
    assert _limits(torch.empty(1, 2, 4, 64))("triton") is None
    assert "dtype" in _limits(torch.empty(1, 2, 4, 64, dtype=torch.float64))("triton")


def _bad_calls():
    q, k, v = _qkv((1, 2, 6, 8))
    keep = torch.tensor([0, 2, 5])
    return [
        (lambda: attention(q[0], k[0], v[0], keep), ValueError, "q must be 4-D"),
        (lambda: attention(q, k[..., :4], v, keep), ValueError, "k must have the shape of q"),
        (lambda: attention(q, k, v[..., :4], keep), ValueError, "v must have the shape of q"),
        (lambda: attention(q, k[:, :, :5], v, keep), ValueError, "k must have the shape of q"),
        (lambda: attention(q, k, v[:, :1], keep), ValueError, "v must have the shape of q"),
        (lambda: attention(q, k.double(), v, keep), TypeError, "k must have the dtype of q"),
        (lambda: attention(q, k, v.half(), keep), TypeError, "v must have the dtype of q"),
        (lambda: attention(q.long(), k.long(), v.long(), keep), TypeError, "q must have dtype"),
        (lambda: attention(q, k, [1.0], keep), TypeError, "v must be a torch.Tensor"),
        (lambda: attention(q, k, v, keep, mode="kv"), ValueError, "mode must be one of"),
        (lambda: attention(q, k, v, keep, mode=None), ValueError, "mode must be one of"),
        (lambda: attention(q, k, v, torch.tensor([0, 6])), ValueError, "keep_idx values must lie in"),
        (lambda: attention(q, k, v, torch.tensor([-1, 2])), ValueError, "keep_idx values must lie in"),
        (lambda: attention(q, k, v, torch.tensor([2, 1])), ValueError, "keep_idx must be sorted"),
        (lambda: attention(q, k, v, torch.tensor([1, 1])), ValueError, "keep_idx must be sorted"),
        (lambda: attention(q, k, v, torch.tensor([0.0, 1.0])), TypeError, "keep_idx must have dtype"),
        (lambda: attention(q, k, v, torch.tensor([[0, 1]])), ValueError, "keep_idx must be 1-D"),
        (lambda: attention(q, k, v, torch.tensor([], dtype=torch.long)), ValueError, "keep_idx must hold"),
        (lambda: attention(q, k, v, [0, 1]), TypeError, "keep_idx must be a torch.Tensor"),
        (lambda: attention(q, k, v, keep, scale=0.0), ValueError, "scale must be a positive finite"),
        (lambda: attention(q, k, v, keep, scale=-1.0), ValueError, "scale must be a positive finite"),
        (lambda: attention(q, k, v, keep, scale=math.nan), ValueError, "scale must be a positive finite"),
        (lambda: attention(q, k, v, keep, scale=math.inf), ValueError, "scale must be a positive finite"),
        (lambda: attention(q, k, v, keep, scale="1"), TypeError, "scale must be a positive real"),
        (lambda: attention(q, k, v, keep, scale=True), TypeError, "scale must be a positive real"),
        (lambda: attention(q, k, v, keep, causal=1), TypeError, "causal must be a bool"),
        (lambda: attention(q, k, v, keep, grad_scale=math.nan), ValueError, "grad_scale must be finite"),
        (lambda: attention(q, k, v, keep, grad_scale="2"), TypeError, "grad_scale must be a real"),
        (lambda: attention(q, k, v, keep, backend="numpy"), ValueError, "backend must be one of"),
        (lambda: torch.ops.sbp.attention(q, k[..., :4], v, keep), ValueError, "k must have the shape of q"),
        (lambda: torch.ops.sbp.attention(q, k, v, keep, False, -2.0), ValueError, "scale must be a positive"),
        (lambda: torch.ops.sbp.attention(q, k, v, keep, False, None, "x"), ValueError, "mode must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input(case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()


def test_int_scale_and_int32_keep_idx_are_accepted():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 6, 8)))
    out = attention(q, k, v, torch.tensor([1, 4], dtype=torch.int32), scale=1)
    out.sum().backward()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=1.0))
    assert q.grad[:, :, [0, 2, 3, 5]].abs().sum() == 0
