"""sbp::mlp (DESIGN.md 3.4): fc2(act(fc1(x))) saving only x and the hidden pre-activation of kept
rows, so the 4x-wide hidden tensor of dropped rows is never stored.

sbp::mlp is a composite of sbp::mlp_forward, which also returns the kept rows of the hidden
pre-activation for its autograd formula to save (setup_context sees inputs and outputs only).
"""
import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import reference
from ..reference import ACTIVATIONS
from ..validation import check_bias, check_grad_scale, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, gather_rows


def mlp(x, w1, b1, w2, b2, keep_idx, activation="gelu", grad_scale=1.0, *, backend="auto"):
    """fc2(act(fc1(x))) exactly; gradients only through positions keep_idx of dim -2.

    x [..., n, c_in], w1 [hidden, c_in], b1 [hidden] or None, w2 [c_out, hidden], b2 [c_out] or
    None; activation "gelu" (erf, as nn.GELU()), "gelu_tanh", "relu" or "silu".
    """
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    _check_args(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend)  # before the op's type checks
    return torch.ops.sbp.mlp(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend)


def _check_args(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend):
    check_tensor(x, "x", min_ndim=2)
    for name, w, in_features in (("w1", w1, x.shape[-1]), ("w2", w2, w1.shape[0])):
        check_tensor(w, name, ndim=2)
        check_like(w, x, name, "x")
        if w.shape[1] != in_features:
            raise ValueError(f"{name} must have shape [out, {in_features}], got {tuple(w.shape)}")
    check_bias(b1, w1.shape[0], x, "b1")
    check_bias(b2, w2.shape[0], x, "b2")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    check_keep_idx(keep_idx, x.shape[-2], x.device)
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


@torch.library.impl("sbp::mlp", "CompositeImplicitAutograd")
def _mlp_composite(x, w1, b1, w2, b2, keep_idx, activation="gelu", grad_scale=1.0, backend="auto"):
    return torch.ops.sbp.mlp_forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend)[0]


@torch.library.impl("sbp::mlp_forward", "CompositeExplicitAutograd")
def _mlp_forward_kernel(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend):
    _check_args(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend)
    hidden = F.linear(x, w1, b1)
    out = F.linear(ACTIVATIONS[activation][0](hidden), w2, b2)
    return out, gather_rows(hidden, keep_idx, -2, _backend.resolve(backend, "mlp", x.device))


@torch.library.register_fake("sbp::mlp_forward")
def _mlp_forward_fake(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend):
    _check_args(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend)
    out = x.new_empty((*x.shape[:-1], w2.shape[0]))
    return out, x.new_empty((*x.shape[:-2], keep_idx.shape[0], w1.shape[0]))


def mlp_backward(backend, grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale):
    if backend == "torch":
        return reference.mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale)
    from ..triton import mlp as triton_mlp  # imported lazily: triton is optional

    return triton_mlp.mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, keep_idx, activation, grad_scale, backend = inputs
    ctx.backend = _backend.resolve(backend, "mlp", x.device)
    ctx.activation, ctx.grad_scale = activation, grad_scale
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(gather_rows(x, keep_idx, -2, ctx.backend), output[1], w1, w2, keep_idx)


def _backward(ctx, grad_out, _grad_hidden_kept):
    x_kept, h_kept, w1, w2, keep_idx = ctx.saved_tensors
    n, c_in = ctx.x_shape[-2:]
    n_keep = keep_idx.shape[0]
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = mlp_backward(
        ctx.backend,
        grad_out.reshape(-1, n, w2.shape[0]),
        x_kept.reshape(-1, n_keep, c_in),
        h_kept.reshape(-1, n_keep, w1.shape[0]),
        w1,
        w2,
        keep_idx,
        ctx.activation,
        ctx.grad_scale,
    )
    has_b1, has_b2 = ctx.has_bias
    return (
        grad_x.view(ctx.x_shape),
        grad_w1,
        grad_b1 if has_b1 else None,
        grad_w2,
        grad_b2 if has_b2 else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("sbp::mlp_forward", _backward, setup_context=_setup_context)
