"""sbp.attention with the triton backend vs the torch backend (the oracle).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), which is slow and has
no bfloat16: small shapes, fp32 and fp16 here; bfloat16 and realistic shapes on GPU only.
Every test fills the kernels' output buffers with NaN first, so a row the kernels forget to write
(a dropped row's zero included) fails the comparison.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, requires_cuda
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


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["qkv", "q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, r", [((2, 12, 197, 64), 0.5), ((1, 8, 1000, 128), 0.25), ((2, 4, 77, 80), 1.0)])
def test_triton_gpu_shapes(shape, r, causal, mode, dtype):
    """bfloat16 (no interpreter support) and realistic shapes: GPU only."""
    _check_against_torch(shape, dtype, r, mode, causal)
