"""sbp::linear (DESIGN.md 3.1): dense forward; backward only on kept rows, from x[..., K, :].

Also home of the kept-rows backward that sbp::pointwise_conv shares (same math per position).
Nothing is saved that the backward will not use: x's kept rows only when the weight needs a
gradient (a frozen LoRA base layer saves no activation at all), the weight only when x needs one.
"""
import math

import torch
import torch.nn.functional as F

from .. import _extension
from .. import backend as _backend
from .. import reference
from ..validation import check_bias, check_grad_scale, check_in_kernel, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import (
    autocast_inputs, cpp_eager, cpp_face, eager, gather_rows, in_memory_order, kept_rows_for_cpp, needs_graph,
    own_keep_idx, traced,
)

_LINEAR_EAGER = cpp_face("linear_eager")


def linear(x, weight, bias, keep_idx, grad_scale=1.0, *, backend="auto"):
    """y = x @ weight.T + bias exactly; gradients flow only through positions keep_idx of dim -2.

    x [..., n, c_in], weight [c_out, c_in], bias [c_out] or None, keep_idx sorted unique positions
    in [0, n). Every gradient is multiplied by grad_scale (1/r makes it unbiased).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_args(x, weight, bias, keep_idx, grad_scale, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply(x, weight, bias, keep_idx, grad_scale, backend)


def apply(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    """sbp.linear on checked arguments (a step's keep set): the modules' entry point."""
    if not needs_graph(x, weight, bias):
        return in_memory_order(F.linear, x, weight, bias)
    if traced():
        return torch.ops.sbp.linear(x, weight, bias, keep_idx, grad_scale, backend)
    if cpp_eager(_backend.resolve(backend, "linear", x.device)):
        x_kept = kept_rows_for_cpp(x, keep_idx, -2, weight.requires_grad)
        return _LINEAR_EAGER(x, weight, bias, keep_idx, x_kept, grad_scale)
    return LinearFunction.apply(x, weight, bias, keep_idx, grad_scale, backend)


def check_args(x, weight, bias, keep_idx, grad_scale, backend):
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


def kept_rows_backward(backend, grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in, needs):
    """The backward of linear / pointwise conv on row views [B, n, c] with the chosen backend.

    grad_out [B, n, c_out]; x_kept [B, n_keep, c_in] (None when the weight needs no gradient);
    weight [c_out, c_in] (None when x needs none); needs: (x, weight, bias) flags. Returns
    (grad_x [B, n, c_in], grad_weight, grad_bias), None for what is not needed.
    """
    if backend == "torch":
        return reference.kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in, needs)
    if backend == "cuda":
        grads = torch.ops.sbp.kept_rows_backward(
            grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in, list(needs)
        )
        return tuple(g if need else None for g, need in zip(grads, needs))
    from ..triton import linear as triton_linear  # imported lazily: triton is optional

    need_dx, need_dw, need_db = needs
    return triton_linear.kept_rows_backward(
        grad_out, x_kept, weight, keep_idx, grad_scale, channels_first,
        need_dx=need_dx, need_dw=need_dw, need_db=need_db,
    )


if _extension.loaded:

    @torch.library.register_fake("sbp::kept_rows_backward")
    def _kept_rows_backward_fake(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in, needs):
        batch, n, c_out = grad_out.shape
        grads = reference.empty_rows(grad_out, batch, n, c_in, channels_first), grad_out.new_empty((c_out, c_in))
        grads += (grad_out.new_empty((c_out,)),)
        return tuple(g if need else grad_out.new_empty((0,)) for g, need in zip(grads, needs))

    def _kept_rows_backward_setup_context(ctx, inputs, output):
        grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in, needs = inputs
        ctx.grad_scale, ctx.needs = grad_scale, tuple(needs)
        ctx.save_for_backward(grad_out, x_kept, weight, keep_idx)

    def _kept_rows_backward_backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        """The op's own derivative (it is linear in grad_out, and in x_kept and weight): what a
        backward through the linear backward (create_graph=True) and opcheck need."""
        grad_out, x_kept, weight, keep_idx = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs
        dy_kept = grad_out.index_select(1, keep_idx)
        d_dy_kept = torch.zeros_like(dy_kept)
        d_x_kept = d_weight = None
        if need_dx and grad_grad_x is not None:
            ggx_kept = grad_grad_x.index_select(1, keep_idx)
            d_dy_kept = d_dy_kept + ggx_kept @ weight.t()
            d_weight = (dy_kept.flatten(0, 1).t() @ ggx_kept.flatten(0, 1)) * ctx.grad_scale
        if need_dw and grad_grad_weight is not None:
            d_dy_kept = d_dy_kept + x_kept @ grad_grad_weight.t()
            d_x_kept = (dy_kept @ grad_grad_weight) * ctx.grad_scale
        if need_db and grad_grad_bias is not None:
            d_dy_kept = d_dy_kept + grad_grad_bias
        d_grad_out = torch.zeros_like(grad_out).index_copy_(1, keep_idx.long(), d_dy_kept * ctx.grad_scale)
        return d_grad_out, d_x_kept, d_weight, None, None, None, None, None

    torch.library.register_autograd(
        "sbp::kept_rows_backward", _kept_rows_backward_backward, setup_context=_kept_rows_backward_setup_context
    )


@torch.library.impl("sbp::linear", "CompositeExplicitAutograd")
def _linear_kernel(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    check_in_kernel(check_args, x, weight, bias, keep_idx, grad_scale, backend)
    return in_memory_order(F.linear, x, weight, bias)


@torch.library.register_fake("sbp::linear")
def _linear_fake(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    check_args(x, weight, bias, keep_idx, grad_scale, backend)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class LinearFunction(torch.autograd.Function):
    """The eager face of sbp::linear; its setup_context and backward are the op's autograd formula."""

    @staticmethod
    def forward(x, weight, bias, keep_idx, grad_scale, backend):
        return in_memory_order(F.linear, x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, keep_idx, grad_scale, backend = inputs
        ctx.backend = _backend.resolve(backend, "linear", x.device)
        ctx.grad_scale = grad_scale
        ctx.x_shape = x.shape
        ctx.needs = tuple(ctx.needs_input_grad[:2]) + (bias is not None and ctx.needs_input_grad[2],)
        need_dx, need_dw, _ = ctx.needs
        # The only activation saved: the kept rows of x, compact, and only for the weight gradient.
        x_kept = gather_rows(x, keep_idx, -2, ctx.backend) if need_dw else None
        ctx.save_for_backward(x_kept, weight if need_dx else None, keep_idx)

    @staticmethod
    def backward(ctx, grad_out):
        x_kept, weight, keep_idx = ctx.saved_tensors
        *lead, n, c_in = ctx.x_shape
        batch = math.prod(lead)
        grad_x, grad_weight, grad_bias = kept_rows_backward(
            ctx.backend,
            grad_out.reshape(batch, n, grad_out.shape[-1]),
            None if x_kept is None else x_kept.reshape(batch, keep_idx.shape[0], c_in),
            weight,
            keep_idx,
            ctx.grad_scale,
            False,
            c_in,
            ctx.needs,
        )
        grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
        return grad_x, grad_weight, grad_bias, None, None, None


torch.library.register_autograd("sbp::linear", LinearFunction.backward, setup_context=LinearFunction.setup_context)
LinearFunction = eager(LinearFunction)
