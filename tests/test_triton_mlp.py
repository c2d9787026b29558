"""Triton backend of sbp.mlp vs the torch reference (DESIGN.md 3.4).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, tiny
odd shapes. Tolerances: fp32 atol = rtol = 1e-4; fp16 atol = rtol = 2e-2 (fp16 rounding of dh_K
and of the activation, sums of at most ~80 unit-scale products). GPU-only tests (bf16, which the
interpreter lacks; H100-sized shapes) compare errors against an fp32 reference instead.
"""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from conftest import HAS_CUDA, requires_cuda
from helpers import assert_all_close, compiled_and_eager_grads
from sbp_kernels import reference

triton_mlp = pytest.importorskip("sbp_kernels.triton.mlp", reason="needs triton")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
DEVICE = "cuda" if HAS_CUDA else "cpu"
ACTIVATION_NAMES = ["gelu", "gelu_tanh", "relu", "silu"]
DENSE_ACTIVATIONS = {
    "gelu": torch.nn.GELU(),
    "gelu_tanh": torch.nn.GELU(approximate="tanh"),
    "relu": torch.nn.ReLU(),
    "silu": torch.nn.SiLU(),
}


def _keep(n, n_keep, dtype=torch.int64, device=DEVICE):
    return torch.randperm(n)[:n_keep].sort().values.to(device=device, dtype=dtype)


def _grads(fn, inputs, dy):
    """Output of fn(*inputs) and the gradients of <output, dy> w.r.t. the inputs (None stays None)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grads = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], dy))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def _params(c_in, hidden, c_out, bias1, bias2, dtype=torch.float32, device=DEVICE):
    w1 = torch.randn(hidden, c_in, device=device, dtype=dtype) / c_in**0.5
    w2 = torch.randn(c_out, hidden, device=device, dtype=dtype) / hidden**0.5
    b1 = torch.randn(hidden, device=device, dtype=dtype) if bias1 else None
    b2 = torch.randn(c_out, device=device, dtype=dtype) if bias2 else None
    return w1, b1, w2, b2


def _dense_mlp(activation):
    act = DENSE_ACTIVATIONS[activation]
    return lambda x, w1, b1, w2, b2: F.linear(act(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_mlp_float64_and_strided_keep_idx(activation):
    """float64 (float64 accumulation and activation) with a non-contiguous keep_idx view."""
    batch, n, c_in, hidden, c_out = 2, 9, 5, 33, 16
    x = torch.randn(batch, n, c_in, device=DEVICE, dtype=torch.float64)
    params = _params(c_in, hidden, c_out, True, True, torch.float64)
    dy = torch.randn(batch, n, c_out, device=DEVICE, dtype=torch.float64)
    keep = torch.arange(n, device=DEVICE)[1::3]
    expected = _grads(lambda *t: sbp_kernels.mlp(*t, keep.contiguous(), activation, backend="torch"), (x, *params), dy)
    actual = _grads(lambda *t: sbp_kernels.mlp(*t, keep, activation, backend="triton"), (x, *params), dy)
    assert all(g.dtype == torch.float64 for g in actual[1])
    assert_all_close(actual[1], expected[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_mlp_matches_torch_backend(activation, dtype):
    batch, n, c_in, hidden, c_out = 2, 7, 5, 33, 16
    x = torch.randn(batch, n, c_in, device=DEVICE, dtype=dtype)
    params = _params(c_in, hidden, c_out, True, True, dtype)
    dy = torch.randn(batch, n, c_out, device=DEVICE, dtype=dtype)
    keep = _keep(n, 3)
    outs = {
        backend: _grads(
            lambda *t: sbp_kernels.mlp(*t, keep, activation, 2.0, backend=backend), (x, *params), dy
        )
        for backend in ("torch", "triton")
    }
    y, grads = outs["triton"]
    torch.testing.assert_close(y, outs["torch"][0], atol=0, rtol=0)  # forward is the dense one
    assert_all_close(grads, outs["torch"][1], **TOL[dtype])
    dropped = torch.ones(n, dtype=torch.bool, device=DEVICE)
    dropped[keep] = False
    assert (grads[0][:, dropped] == 0).all()


# (batch shape, n, n_keep, c_in, hidden, c_out, b1, b2, grad_scale, index dtype)
SHAPE_CASES = [
    ((2,), 1, 1, 16, 5, 33, True, True, 1.0, torch.int64),
    ((1,), 37, 1, 5, 16, 5, False, True, 0.5, torch.int64),
    ((2, 3), 37, 20, 33, 16, 5, True, False, 1.0, torch.int32),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: f"B{c[0]}-n{c[1]}-k{c[2]}")
def test_mlp_shapes_match_torch_backend(case):
    batch, n, n_keep, c_in, hidden, c_out, bias1, bias2, grad_scale, index_dtype = case
    x = torch.randn(*batch, n, c_in, device=DEVICE)
    params = _params(c_in, hidden, c_out, bias1, bias2)
    dy = torch.randn(*batch, n, c_out, device=DEVICE)
    keep = _keep(n, n_keep, index_dtype)
    outs = {
        backend: _grads(lambda *t: sbp_kernels.mlp(*t, keep, "gelu", grad_scale, backend=backend), (x, *params), dy)
        for backend in ("torch", "triton")
    }
    assert_all_close(outs["triton"][1], outs["torch"][1], **TOL[torch.float32])


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_mlp_keep_all_equals_dense_autograd(activation):
    """r = 1: exactly the gradients of Linear -> act -> Linear under plain autograd."""
    n = 37
    x = torch.randn(2, n, 16, device=DEVICE)
    params = _params(16, 33, 5, True, True)
    dy = torch.randn(2, n, 5, device=DEVICE)
    keep = torch.arange(n, device=DEVICE)
    _, expected = _grads(_dense_mlp(activation), (x, *params), dy)
    _, actual = _grads(lambda *t: sbp_kernels.mlp(*t, keep, activation, backend="triton"), (x, *params), dy)
    assert_all_close(actual, expected, **TOL[torch.float32])


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_mlp_backward_direct_strided(activation):
    batch, n, c_in, hidden, c_out = 2, 37, 5, 33, 16
    keep = _keep(n, 17, torch.int32)
    x_kept = torch.randn(batch, 17, c_in, device=DEVICE)
    h_kept = torch.randn(batch, 17, hidden, device=DEVICE)
    w1, _, w2, _ = _params(c_in, hidden, c_out, False, False)
    grad_outs = [
        torch.randn(batch, c_out, n, device=DEVICE).transpose(1, 2),
        torch.randn(1, 1, c_out, device=DEVICE).expand(batch, n, c_out),
    ]
    for grad_out in grad_outs:
        args = (grad_out, x_kept, h_kept, w1, w2, keep, activation, 1.5)
        assert_all_close(triton_mlp.mlp_backward(*args), reference.mlp_backward(*args), **TOL[torch.float32])


def test_mlp_backward_direct_fp16():
    batch, n, c_in, hidden, c_out = 2, 7, 16, 33, 5
    keep = torch.tensor([1, 5], device=DEVICE)
    tensors = [
        torch.randn(batch, n, c_out, device=DEVICE),
        torch.randn(batch, 2, c_in, device=DEVICE),
        torch.randn(batch, 2, hidden, device=DEVICE),
        torch.randn(hidden, c_in, device=DEVICE) / c_in**0.5,
        torch.randn(c_out, hidden, device=DEVICE) / hidden**0.5,
    ]
    half = [t.half() for t in tensors]
    for activation in ACTIVATION_NAMES:
        actual = triton_mlp.mlp_backward(*half, keep, activation, 2.0)
        expected = reference.mlp_backward(*(t.float() for t in half), keep, activation, 2.0)
        assert all(a.dtype == torch.float16 for a in actual)
        assert_all_close([a.float() for a in actual], expected, **TOL[torch.float16])


NEEDS = [  # (x, w1, b1, w2, b2)
    (True, False, False, False, False),  # frozen MLP, input needs grad (LoRA elsewhere)
    (False, True, True, True, True),  # first layer's input needs none
    (True, True, False, False, True),
    (False, False, True, False, False),  # bias only: no weight GEMM at all
    (False, False, False, False, False),
]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if x else "0" for x in n))
def test_mlp_backward_skips_gradients_not_needed(needs, monkeypatch):
    """Frozen weights launch no weight GEMM, no dh GEMM runs when x, w1, b1 need none, and each
    gradient not asked for comes back None."""
    from sbp_kernels.triton import gemm

    launches = {"weight": 0, "row": 0}
    for kind, kernel in (("weight", gemm._weight_gemm_kernel), ("row", gemm._row_gemm_kernel)):
        def counting(*args, _run=kernel.run, _kind=kind, **kwargs):
            launches[_kind] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting)
    batch, n, c_in, hidden, c_out = 2, 37, 5, 33, 16
    keep = _keep(n, 17)
    w1, _, w2, _ = _params(c_in, hidden, c_out, False, False)
    args = (torch.randn(batch, n, c_out, device=DEVICE), torch.randn(batch, 17, c_in, device=DEVICE),
            torch.randn(batch, 17, hidden, device=DEVICE), w1, w2, keep, "gelu", 1.5)
    actual = triton_mlp.mlp_backward(*args, needs=needs)
    expected = reference.mlp_backward(*args)
    need_x, need_w1, need_b1, need_w2, _ = needs
    assert launches["weight"] == need_w1 + need_w2
    assert launches["row"] == (need_x or need_w1 or need_b1) + need_x
    for got, want, need in zip(actual, expected, needs):
        if need:
            torch.testing.assert_close(got, want, **TOL[torch.float32])
        else:
            assert got is None


def test_opcheck_mlp_backward():
    keep = torch.tensor([0, 4], device=DEVICE)
    w1, _, w2, _ = _params(5, 16, 33, False, False)
    args = (
        torch.randn(2, 33, 7, device=DEVICE).transpose(1, 2),
        torch.randn(2, 2, 5, device=DEVICE),
        torch.randn(2, 2, 16, device=DEVICE),
        w1,
        w2,
        keep,
        "gelu_tanh",
        2.0,
    )
    for needs in ([True] * 5, [False, True, False, False, True]):
        torch.library.opcheck(torch.ops.sbp.mlp_backward_triton.default, (*args, needs))


def test_bad_input_is_rejected():
    keep = torch.tensor([0, 1])
    w1, _, w2, _ = _params(5, 16, 33, False, False)
    args = [torch.randn(2, 7, 33), torch.randn(2, 2, 5), torch.randn(2, 2, 16), w1, w2, keep, "gelu", 1.0]
    with pytest.raises(ValueError, match="activation"):
        triton_mlp.mlp_backward(*args[:6], "tanh", 1.0)
    with pytest.raises(ValueError, match="h_kept"):
        triton_mlp.mlp_backward(args[0], args[1], args[2][:, :, :8], *args[3:])
    with pytest.raises(ValueError, match="w2"):
        triton_mlp.mlp_backward(*args[:4], w2[:, :8], *args[5:])


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 16), torch.nn.Linear(16, 5)

    def forward(self, x, keep, backend):
        y = sbp_kernels.mlp(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, keep, "silu", 2.0, backend=backend
        )
        return x + y


def test_torch_compile_fullgraph_traces_triton_mlp_backward():
    model = _Block().to(DEVICE)
    x, keep = torch.randn(2, 7, 5, device=DEVICE), torch.tensor([1, 2, 6], device=DEVICE)
    compiled, eager = compiled_and_eager_grads(model, x, keep, "triton")
    assert_all_close(compiled, eager, **TOL[torch.float32])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_mlp_gpu_error_within_twice_torch(activation, dtype):
    """GPU, ViT-S-sized MLP: the Triton error vs an fp32 reference is at most 2x torch's (+ slack)."""
    batch, n, n_keep, c_in, hidden, c_out = 4, 197, 99, 384, 1536, 384
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, n, c_in, device="cuda", generator=gen)
    dy = torch.randn(batch, n, c_out, device="cuda", generator=gen)
    params = _params(c_in, hidden, c_out, True, True, device="cuda")
    keep = _keep(n, n_keep, device="cuda")

    def run(compute_dtype, backend):
        inputs = [t.to(dtype).to(compute_dtype) for t in (x, *params)]
        return _grads(
            lambda *t: sbp_kernels.mlp(*t, keep, activation, 2.0, backend=backend),
            inputs,
            dy.to(dtype).to(compute_dtype),
        )[1]

    high = run(torch.float32, "torch")
    # relative to the largest gradient entry: about one rounding of it in the low precision
    slack = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    errors = {}
    for backend in ("triton", "torch"):
        errors[backend] = [
            ((a.float() - e).abs().max() / e.abs().max()).item() for a, e in zip(run(dtype, backend), high)
        ]
    for got, ref in zip(errors["triton"], errors["torch"]):
        assert got <= 2 * ref + slack, errors
