"""Test oracles: dense PyTorch autograd with the output gradient zeroed on dropped positions."""
import torch

import sbp_kernels

# Tolerances per dtype: outputs and gradients are compared with float64 oracles.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}

CPU_BACKENDS = ["torch"] + (["cuda"] if sbp_kernels.backends()["cuda"] is None else [])


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


def assert_all_close(actual, expected, **tol):
    """Pairwise assert_close of two gradient lists; None (no gradient) must match None."""
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tol)


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
