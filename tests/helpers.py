"""Test oracles: dense PyTorch autograd with the output gradient zeroed on dropped positions."""
import torch
from torch.utils.flop_counter import FlopCounterMode

import sbp_kernels

# Tolerances per dtype: outputs and gradients are compared with float64 oracles. float32 is tight;
# float16 / bfloat16 compare the op run in that dtype with float64 math on the same inputs, so
# they carry the rounding of half-precision GEMMs and activations.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
# r = 1 against dense autograd in float64: the same math, summed in another order at most.
R1_TOL = dict(atol=1e-12, rtol=1e-12)

CPU_BACKENDS = ["torch"] + (["cuda"] if sbp_kernels.backends()["cuda"] is None else [])


def keep_set(n, r, seed=0, strategy="random"):
    """A keep set of n positions at ratio r from a seeded generator (never the global RNG)."""
    return sbp_kernels.sample_keep_indices((n,), r, strategy, torch.Generator().manual_seed(seed))


def dropped(keep_idx, n):
    """Bool [n]: True on the positions keep_idx leaves out."""
    return torch.ones(n, dtype=torch.bool).index_fill(0, keep_idx.cpu().long(), False)


def keep_mask(keep_idx, n, dim, ndim):
    """A 0/1 float64 tensor broadcastable along `dim` that is 1 on kept positions."""
    shape = [1] * ndim
    shape[dim] = n
    mask = torch.zeros(n, dtype=torch.float64)
    mask[keep_idx.cpu().long()] = 1
    return mask.view(shape)


def masked_dense_grads(dense_fn, inputs, grad_out, keep_idx, dim, grad_scale=1.0):
    """Gradients of dense_fn(*inputs) in float64 for the output gradient zeroed on dropped
    positions along `dim` of the output: what SBP must produce for position-wise layers."""
    inputs64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    out = dense_fn(*inputs64)
    mask = keep_mask(keep_idx, out.shape[dim], dim, out.dim())
    out.backward(grad_out.double() * mask * grad_scale)
    return out.detach(), [None if t is None else t.grad for t in inputs64]


def sbp_grads(sbp_fn, inputs, grad_out):
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = sbp_fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [None if t is None else t.grad for t in inputs]


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def assert_grads_close(actual, expected, dtype):
    """assert_close over two gradient lists; an expected None must be None."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            assert a is not None and a.shape == e.shape
            assert_close(a, e, dtype)


def assert_all_close(actual, expected, **tol):
    """Pairwise assert_close of two gradient lists; None (no gradient) must match None."""
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tol)


def backward_flops(out, grad_out):
    """{op name: FLOPs} counted while out.backward(grad_out) runs (torch backend GEMMs)."""
    with FlopCounterMode(display=False) as counter:
        out.backward(grad_out)
    return {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def compile_matches_eager(fn, inputs, seed=0, **tol):
    """fn(*inputs) -> a tensor, run eagerly and under torch.compile(fullgraph=True,
    backend="aot_eager") from the same seed: outputs and the gradients of every floating input
    that requires grad must agree."""
    torch._dynamo.reset()
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        torch.manual_seed(seed)
        out = run(*leaves)
        out.square().sum().backward()
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        results.append((out.detach(), grads))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    torch.testing.assert_close(compiled_out, eager_out, **tol)
    assert len(eager_grads) > 0
    assert_all_close(compiled_grads, eager_grads, **tol)


def compiled_and_eager_grads(model, x, keep_idx, backend):
    """Gradients (x, then parameters) of model(x, keep_idx, backend).square().sum() for the model
    compiled with torch.compile(fullgraph=True, backend="aot_eager") running `backend`, and run
    eagerly with the torch backend."""
    torch._dynamo.reset()
    grads = {}
    for name, fn in (("eager", model), ("compiled", torch.compile(model, fullgraph=True, backend="aot_eager"))):
        model.zero_grad()
        x_leaf = x.clone().requires_grad_()
        fn(x_leaf, keep_idx, backend if name == "compiled" else "torch").square().sum().backward()
        grads[name] = [x_leaf.grad] + [p.grad.clone() for p in model.parameters()]
    return grads["compiled"], grads["eager"]
