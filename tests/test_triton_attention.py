"""sbp.attention with the triton backend vs the torch backend (the oracle).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), which is slow and has
no bfloat16: small shapes, fp32 and fp16 here; bfloat16 and realistic shapes on GPU only.
Every test fills the kernels' output buffers with NaN first, so a row the kernels forget to write
(a dropped row's zero included) fails the comparison.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, requires_cuda
from sbp_kernels import reference
from sbp_kernels.ops.attention import attention
from sbp_kernels.sampling import sample_keep_indices

triton = pytest.importorskip("triton")
from sbp_kernels.triton import attention as triton_attention  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp32: both backends accumulate in fp32, only the summation order differs. fp16: the kernels
# round P and dS to fp16 for the tensor-core products (as flash attention does), the torch
# backend keeps them in fp32.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_output(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(triton_attention, "_new_output", nan_output)


def _keep(n, r, seed=0):
    return sample_keep_indices((n,), r, "random", torch.Generator().manual_seed(seed), device=DEVICE)


def _grads(backend, q, k, v, dout, keep, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, keep, backend=backend, **kwargs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


def _check_against_torch(shape, dtype, r, mode, causal, grad_scale=1.0, seed=0):
    q, k, v, dout = (torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(4))
    keep = _keep(shape[2], r, seed)
    out, grads = _grads("triton", q, k, v, dout, keep, causal=causal, mode=mode, grad_scale=grad_scale)
    ref_out, ref_grads = _grads("torch", q, k, v, dout, keep, causal=causal, mode=mode, grad_scale=grad_scale)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref.shape
        torch.testing.assert_close(g, ref, **TOL[dtype], msg=lambda m: f"d{name}: {m}")
    if dtype != torch.float32:
        # As FlashAttention's tests: the kernels' error vs a float64 oracle is at most about twice
        # that of the same-precision torch backend.
        exact = _grads("torch", q.double(), k.double(), v.double(), dout.double(), keep, causal=causal, mode=mode,
                       grad_scale=grad_scale)[1]
        for g, ref, e in zip(grads, ref_grads, exact):
            slack = 1e-3 if dtype == torch.float16 else 1e-2
            assert (g.double() - e).abs().max() <= 2 * (ref.double() - e).abs().max() + slack
    dropped = torch.ones(shape[2], dtype=torch.bool, device=DEVICE).index_fill(0, keep, False)
    assert torch.equal(grads[0][:, :, dropped], torch.zeros_like(grads[0][:, :, dropped]))
    if mode == "qkv":
        assert not grads[1][:, :, dropped].any() and not grads[2][:, :, dropped].any()


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("shape", [(1, 2, 19, 16), (2, 2, 40, 32)])
def test_triton_matches_torch_fp32(shape, r, causal, mode):
    _check_against_torch(shape, torch.float32, r, mode, causal, grad_scale=1.5)


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, r", [((1, 2, 1, 16), 1.0), ((1, 2, 40, 16), 0.01)])
def test_triton_single_kept_token(shape, r, causal, mode):
    """n = 1, and n_keep = 1 out of 40."""
    _check_against_torch(shape, torch.float32, r, mode, causal)


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, r", [((1, 2, 40, 32), 0.5), ((1, 2, 19, 16), 1.0)])
def test_triton_matches_torch_fp16(shape, r, causal, mode):
    _check_against_torch(shape, torch.float16, r, mode, causal)


def test_triton_padded_head_dim():
    """d = 48 runs in 64-wide tiles with masked loads and stores."""
    _check_against_torch((1, 2, 19, 48), torch.float32, 0.5, "qkv", True)


@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_triton_strided_inputs_and_int32_keep_idx(mode):
    """q, k, v as views of a packed qkv projection, dout transposed, keep_idx int32."""
    b, n, h, d = 2, 21, 2, 16
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dout = torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2)
    keep = _keep(n, 0.5).int()
    out, grads = _grads("triton", q, k, v, dout, keep, causal=True, mode=mode)
    ref_out, ref_grads = _grads("torch", q, k, v, dout, keep.long(), causal=True, mode=mode)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[torch.float32])


@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_triton_non_contiguous_keep_idx(mode):
    """keep_idx as a strided view: the kernels read its values, not its storage."""
    q, k, v, dout = (torch.randn(1, 2, 23, 16, device=DEVICE) for _ in range(4))
    keep = torch.arange(23, device=DEVICE)[::3]
    assert not keep.is_contiguous()
    out, grads = _grads("triton", q, k, v, dout, keep, causal=True, mode=mode)
    ref_out, ref_grads = _grads("torch", q, k, v, dout, keep.contiguous(), causal=True, mode=mode)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_triton_forward_matches_sdpa_and_lse(causal):
    q, k, v = (torch.randn(2, 2, 37, 32, device=DEVICE) for _ in range(3))
    out, lse = triton_attention.attention_forward(q, k, v, causal, 0.2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.2),
                               **TOL[torch.float32])
    s = 0.2 * q.double() @ k.double().transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_opcheck_triton_ops():
    q, k, v = (torch.randn(1, 1, 5, 16, device=DEVICE) for _ in range(3))
    keep = torch.tensor([1, 3, 4], device=DEVICE)
    torch.library.opcheck(torch.ops.sbp.attention_forward_triton.default, (q, k, v, True, 0.25))
    out, lse = triton_attention.attention_forward(q, k, v, True, 0.25)
    dout = torch.randn_like(out)
    args = (dout, q[:, :, keep], k[:, :, keep], v[:, :, keep], out[:, :, keep], lse[:, :, keep], keep, True, 0.25,
            "qkv", 2.0)
    torch.library.opcheck(torch.ops.sbp.attention_backward_triton.default, args)
    args = (dout, q[:, :, keep], k, v, out[:, :, keep], lse[:, :, keep], keep, False, 0.25, "q", 1.0)
    torch.library.opcheck(torch.ops.sbp.attention_backward_triton.default, args)


def test_compile_fullgraph_triton_backend():
    q, k, v = (torch.randn(1, 2, 11, 16, device=DEVICE) for _ in range(3))
    keep = _keep(11, 0.5)

    def f(q, k, v):
        return (attention(q, k, v, keep, causal=True, backend="triton") ** 2).sum()

    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager).backward()
    compiled = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((1, 1, 4, 8), torch.float32, "head dim d=8"),
        ((1, 1, 4, 256), torch.float32, "head dim d=256"),
        ((1, 1, 4, 15), torch.float32, "head dim d=15"),
        ((1, 1, 4, 32), torch.float64, "dtype torch.float64"),
    ],
)
def test_triton_refuses_unsupported(shape, dtype, match):
    q = torch.randn(shape, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, torch.tensor([0, 2], device=DEVICE), backend="triton")
    attention(q, q, q, torch.tensor([0, 2], device=DEVICE), backend="torch")  # the torch backend runs it


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check: the interpreter has no bfloat16")
def test_triton_refuses_bf16_under_interpreter():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        attention(q, q, q, torch.tensor([0, 2]), backend="triton")


def _dense_oracle(q, k, v, dout, keep, causal, scale, mode, grad_scale, key_padding_mask):
    """float64 autograd of dense attention, turned into SBP's gradients (DESIGN.md 3.3): (out, lse,
    dq, dk, dv). k, v [B, h_kv, n, d] are repeated over the query heads of their group; dO is
    zeroed on dropped queries, and dS, dV on dropped keys in mode "qkv", which is exactly SBP's
    restriction to kept (query, key) pairs; dk, dv are summed over each group. A row without a
    valid key has out = 0 and lse = +inf."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    q64 = q.double()
    k_rep, v_rep = (t.double().repeat_interleave(group, 1) for t in (k, v))
    v_rep.requires_grad_()
    scores = (scale * q64 @ k_rep.transpose(-1, -2)).requires_grad_()
    valid = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        valid = valid.tril()
    if key_padding_mask is not None:
        valid = valid & key_padding_mask[:, None, None, :]
    has_keys = valid.any(-1, keepdim=True)
    # A finite fill: a row without keys gives uniform (not NaN) weights, zeroed by has_keys.
    p = torch.softmax(scores.masked_fill(~valid, torch.finfo(torch.float64).min), -1) * has_keys
    out = p @ v_rep
    lse = torch.logsumexp(scores.masked_fill(~valid, float("-inf")), -1).masked_fill(~has_keys[..., 0], float("inf"))
    kept = torch.zeros(n, dtype=torch.float64, device=q.device).index_fill(0, keep, 1.0)
    d_scores, dv_rep = torch.autograd.grad(out, (scores, v_rep), dout.double() * kept[:, None] * grad_scale)
    if mode == "qkv":
        d_scores, dv_rep = d_scores * kept, dv_rep * kept[:, None]
    dq = scale * d_scores @ k_rep
    dk_rep = scale * d_scores.transpose(-1, -2) @ q64
    dk, dv = (t.view(batch, heads // group, group, n, d).sum(2) for t in (dk_rep, dv_rep))
    return out.detach(), lse.detach(), dq, dk, dv


def _triton_sbp(q, k, v, dout, keep, causal, scale, mode, grad_scale, key_padding_mask):
    out, lse = triton_attention.attention_forward(q, k, v, causal, scale, key_padding_mask)
    k_saved, v_saved = (k[:, :, keep], v[:, :, keep]) if mode == "qkv" else (k, v)
    grads = triton_attention.attention_backward(
        dout, q[:, :, keep], k_saved, v_saved, out[:, :, keep], lse[:, :, keep], keep, causal, scale, mode,
        grad_scale, key_padding_mask,
    )
    return (out, lse, *grads)


def _padding(kind, batch, n):
    """None, or a [B, n] bool mask: "random" (sample 0 right-padded, sample 1 random holes),
    "left" (left padding: under causal the first queries see no key), "empty" (sample 1 all pad)."""
    if kind is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    if kind == "random":
        mask[0, n - 5:] = False
        mask[-1] = torch.rand(n, device=DEVICE) > 0.3
    elif kind == "left":
        mask[:, :4] = False
    else:
        mask[-1] = False
    return mask


@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape, padding",
    [((2, 4, 2, 19, 16), "random"), ((2, 3, 1, 23, 32), "left"), ((2, 2, 2, 17, 16), "empty"),
     ((1, 4, 2, 21, 16), None)],
    ids=["gqa-random", "mqa-left", "mha-empty-sample", "gqa-unpadded"],
)
def test_gqa_and_key_padding_match_dense_float64(shape, padding, causal, mode):
    """Grouped-query heads and key padding masks (with causal, in original positions) against a
    dense float64 autograd oracle; rows without keys: out = 0, lse = +inf, no NaN anywhere."""
    batch, heads, kv_heads, n, d = shape
    q = torch.randn(batch, heads, n, d, device=DEVICE)
    k, v = (torch.randn(batch, kv_heads, n, d, device=DEVICE) for _ in range(2))
    dout = torch.randn(batch, n, heads, d, device=DEVICE).transpose(1, 2)  # strided dO
    keep = _keep(n, 0.5, seed=n)
    args = (q, k, v, dout, keep, causal, 0.3, mode, 1.5, _padding(padding, batch, n))
    actual = _triton_sbp(*args)
    expected = _dense_oracle(*args)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), actual, expected):
        assert got.shape == want.shape and not got.isnan().any(), name
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
    if padding == "empty" or (padding == "left" and causal):
        assert (actual[1] == float("inf")).any()  # the case really has rows without keys


def test_gqa_fp16_matches_dense_float64():
    batch, heads, kv_heads, n, d = 1, 4, 2, 40, 32
    q = torch.randn(batch, heads, n, d, device=DEVICE, dtype=torch.float16)
    k, v, = (torch.randn(batch, kv_heads, n, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
    dout = torch.randn_like(q)
    args = (q, k, v, dout, _keep(n, 0.5), True, d**-0.5, "qkv", 1.0, _padding("random", batch, n))
    for got, want in zip(_triton_sbp(*args), _dense_oracle(*args)):
        torch.testing.assert_close(got.double(), want, **TOL[torch.float16])


def test_forward_out_is_stored_token_major():
    """out [B, h, n, d] is stored [B, n, h, d]: the output projection's [B, n, h * d] input is a view."""
    q, k, v = (torch.randn(2, 4, 9, 16, device=DEVICE) for _ in range(3))
    out, _ = triton_attention.attention_forward(q, k[:, :2], v[:, :2], False, 0.25)
    assert out.shape == (2, 4, 9, 16) and out.transpose(1, 2).is_contiguous()
    assert out.transpose(1, 2).reshape(2, 9, 64).data_ptr() == out.data_ptr()


@pytest.mark.skipif(
    "key_padding_mask" not in inspect.signature(reference.attention_backward).parameters,
    reason="reference.attention_backward has no key_padding_mask yet",
)
@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_gqa_and_key_padding_match_reference(mode):
    batch, heads, kv_heads, n, d = 2, 4, 2, 19, 16
    q = torch.randn(batch, heads, n, d, device=DEVICE)
    k, v = (torch.randn(batch, kv_heads, n, d, device=DEVICE) for _ in range(2))
    dout, keep, mask = torch.randn_like(q), _keep(n, 0.5), _padding("left", batch, n)
    out, lse = reference.attention_forward(q, k, v, True, 0.3, key_padding_mask=mask)
    k_saved, v_saved = (k[:, :, keep], v[:, :, keep]) if mode == "qkv" else (k, v)
    expected = reference.attention_backward(
        dout[:, :, keep], q[:, :, keep], k_saved, v_saved, out[:, :, keep], lse[:, :, keep], keep, n, True, 0.3, mode,
        1.5, key_padding_mask=mask,
    )
    actual = _triton_sbp(q, k, v, dout, keep, True, 0.3, mode, 1.5, mask)
    for got, want in zip(actual, (out, lse, *expected)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_unsupported_reasons():
    q, k = torch.randn(2, 4, 9, 16, device=DEVICE), torch.randn(2, 2, 9, 16, device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    assert triton_attention.unsupported(q, k, mask) is None
    assert "head dim d=8" in triton_attention.unsupported(q[..., :8], k[..., :8])
    assert "dtype torch.float64" in triton_attention.unsupported(q.double(), k.double())
    assert "h_kv dividing h" in triton_attention.unsupported(q[:, :3], k)
    assert "key_padding_mask" in triton_attention.unsupported(q, k, mask.float())
    assert "key_padding_mask" in triton_attention.unsupported(q, k, mask[:, :5])
    if not HAS_CUDA:
        assert "bfloat16" in triton_attention.unsupported(q.bfloat16(), k.bfloat16())
    with pytest.raises(ValueError, match="h_kv dividing"):
        triton_attention.attention_forward(q[:, :3], k, k, False, 0.25)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, r", [((2, 12, 197, 64), 0.5), ((1, 8, 1000, 128), 0.25), ((2, 4, 77, 80), 1.0)])
def test_triton_gpu_shapes(shape, r, causal, mode, dtype):
    """bfloat16 (no interpreter support) and realistic shapes: GPU only."""
    _check_against_torch(shape, dtype, r, mode, causal)
