"""sbp::linear (DESIGN.md 3.1): dense forward; backward only on kept rows, from x[..., K, :].

Also home of the kept-rows backward that sbp::pointwise_conv shares (same math per position).
"""
import torch
import torch.nn.functional as F

from .. import _extension
from .. import backend as _backend
from .. import reference
from ..validation import check_bias, check_grad_scale, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, gather_rows


def linear(x, weight, bias, keep_idx, grad_scale=1.0, *, backend="auto"):
    """y = x @ weight.T + bias exactly; gradients flow only through positions keep_idx of dim -2.

    x [..., n, c_in], weight [c_out, c_in], bias [c_out] or None, keep_idx sorted unique positions
    in [0, n). Every gradient is multiplied by grad_scale (1/r makes it unbiased).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_args(x, weight, bias, keep_idx, grad_scale, backend)  # before the op's own type checks
    return torch.ops.sbp.linear(x, weight, bias, keep_idx, grad_scale, backend)


def kept_rows_backward(backend, grad_out, x_kept, weight, keep_idx, grad_scale, channels_first):
    """Runs the backward of linear / pointwise conv on row views with the chosen backend."""
    if backend == "torch":
        return reference.kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first)
    if backend == "cuda":
        return torch.ops.sbp.kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first)
    from ..triton import linear as triton_linear  # imported lazily: triton is optional

    return triton_linear.kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first)


if _extension.loaded:

    @torch.library.register_fake("sbp::kept_rows_backward")
    def _kept_rows_backward_fake(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first):
        batch, n, c_out = grad_out.shape
        c_in = weight.shape[1]
        if channels_first:
            grad_x = grad_out.new_empty((batch, c_in, n)).transpose(1, 2)
        else:
            grad_x = grad_out.new_empty((batch, n, c_in))
        return grad_x, weight.new_empty((c_out, c_in)), weight.new_empty((c_out,))


def _check_args(x, weight, bias, keep_idx, grad_scale, backend):
    check_tensor(x, "x", min_ndim=2)
    check_tensor(weight, "weight", ndim=2)
    check_like(weight, x, "weight", "x")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [c_out, {x.shape[-1]}] to match x's last dim, got {tuple(weight.shape)}"
        )
    check_bias(bias, weight.shape[0], x)
    check_keep_idx(keep_idx, x.shape[-2], x.device)
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


@torch.library.impl("sbp::linear", "CompositeExplicitAutograd")
def _linear_kernel(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    _check_args(x, weight, bias, keep_idx, grad_scale, backend)
    return F.linear(x, weight, bias)


@torch.library.register_fake("sbp::linear")
def _linear_fake(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    _check_args(x, weight, bias, keep_idx, grad_scale, backend)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, keep_idx, grad_scale, backend = inputs
    ctx.backend = _backend.resolve(backend, "linear", x.device)
    ctx.grad_scale = grad_scale
    ctx.has_bias = bias is not None
    ctx.x_shape = x.shape
    # The only activation saved: the kept rows of x, compact. Nothing of size n.
    ctx.save_for_backward(gather_rows(x, keep_idx, -2, ctx.backend), weight, keep_idx)


def _backward(ctx, grad_out):
    x_kept, weight, keep_idx = ctx.saved_tensors
    n, c_in = ctx.x_shape[-2:]
    grad_x, grad_weight, grad_bias = kept_rows_backward(
        ctx.backend,
        grad_out.reshape(-1, n, weight.shape[0]),
        x_kept.reshape(-1, x_kept.shape[-2], c_in),
        weight,
        keep_idx,
        ctx.grad_scale,
        False,
    )
    return grad_x.view(ctx.x_shape), grad_weight, grad_bias if ctx.has_bias else None, None, None, None


torch.library.register_autograd("sbp::linear", _backward, setup_context=_setup_context)
