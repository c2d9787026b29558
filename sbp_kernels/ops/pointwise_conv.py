"""sbp::pointwise_conv (DESIGN.md 3.2): a 1x1 convolution whose backward runs on kept pixels.

x [B, c_in, H, W] in NCHW or channels_last; positions are the flattened H*W pixels. The backward
is linear's kept-rows backward on the strided view [B, H*W, c] of each tensor: no permute copy.
"""
import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..validation import check_bias, check_grad_scale, check_in_kernel, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, eager, gather_rows, needs_graph, own_keep_idx, traced
from .linear import kept_rows_backward


def pointwise_conv(x, weight, bias, keep_idx, grad_scale=1.0, *, backend="auto"):
    """conv2d(x, weight, bias) with a 1x1 kernel exactly; gradients only through pixels keep_idx.

    weight [c_out, c_in, 1, 1] or [c_out, c_in]; keep_idx indexes the flattened H*W positions.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_args(x, weight, bias, keep_idx, grad_scale, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply(x, weight, bias, keep_idx, grad_scale, backend)


def apply(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    """sbp.pointwise_conv on checked arguments (a step's keep set): the modules' entry point."""
    if not needs_graph(x, weight, bias):
        return _conv(x, weight, bias)
    if traced():
        return torch.ops.sbp.pointwise_conv(x, weight, bias, keep_idx, grad_scale, backend)
    return PointwiseConvFunction.apply(x, weight, bias, keep_idx, grad_scale, backend)


def _rows(t):
    """[B, C, H, W] -> the [B, H*W, C] view (strided; a view for NCHW and channels_last alike)."""
    return t.flatten(2).transpose(1, 2)


def check_args(x, weight, bias, keep_idx, grad_scale, backend):
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight")
    check_like(weight, x, "weight", "x")
    if weight.dim() not in (2, 4) or weight.shape[1] != x.shape[1] or tuple(weight.shape[2:]) not in ((), (1, 1)):
        raise ValueError(
            f"weight must have shape [c_out, {x.shape[1]}, 1, 1] or [c_out, {x.shape[1]}], got {tuple(weight.shape)}"
        )
    check_bias(bias, weight.shape[0], x)
    check_keep_idx(keep_idx, x.shape[2] * x.shape[3], x.device)
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


def _weight_4d(weight):
    return weight if weight.dim() == 4 else weight[:, :, None, None]


def _conv(x, weight, bias):
    """The 1x1 convolution. Without input or output channels it is nn.Linear's on every pixel
    (F.conv2d refuses c_out = 0, and for c_in = 0 returns no channels instead of the bias)."""
    if x.shape[1] and weight.shape[0]:
        return F.conv2d(x, _weight_4d(weight), bias)
    batch, c_in, height, width = x.shape
    out = F.linear(_rows(x), weight.reshape(weight.shape[0], c_in), bias)
    return out.transpose(1, 2).reshape(batch, weight.shape[0], height, width)


@torch.library.impl("sbp::pointwise_conv", "CompositeExplicitAutograd")
def _pointwise_conv_kernel(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    check_in_kernel(check_args, x, weight, bias, keep_idx, grad_scale, backend)
    return _conv(x, weight, bias)


@torch.library.register_fake("sbp::pointwise_conv")
def _pointwise_conv_fake(x, weight, bias, keep_idx, grad_scale=1.0, backend="auto"):
    check_args(x, weight, bias, keep_idx, grad_scale, backend)
    return _conv(x, weight, bias)


class PointwiseConvFunction(torch.autograd.Function):
    """The eager face of sbp::pointwise_conv; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, weight, bias, keep_idx, grad_scale, backend):
        return _conv(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, keep_idx, grad_scale, backend = inputs
        ctx.backend = _backend.resolve(backend, "pointwise_conv", x.device)
        ctx.grad_scale = grad_scale
        ctx.x_shape = x.shape
        ctx.weight_4d = weight.dim() == 4
        ctx.needs = tuple(ctx.needs_input_grad[:2]) + (bias is not None and ctx.needs_input_grad[2],)
        need_dx, need_dw, _ = ctx.needs
        # grad_x gets x's memory format; a tensor that is both (C == 1 or H*W == 1) counts as NCHW.
        ctx.channels_first = x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)
        x_kept = gather_rows(_rows(x), keep_idx, 1, ctx.backend) if need_dw else None
        ctx.save_for_backward(x_kept, weight if need_dx else None, keep_idx)

    @staticmethod
    def backward(ctx, grad_out):
        x_kept, weight, keep_idx = ctx.saved_tensors
        batch, c_in, height, width = ctx.x_shape
        grad_x, grad_weight, grad_bias = kept_rows_backward(
            ctx.backend,
            _rows(grad_out),
            x_kept,
            None if weight is None else weight.reshape(weight.shape[0], c_in),
            keep_idx,
            ctx.grad_scale,
            ctx.channels_first,
            c_in,
            ctx.needs,
        )
        if grad_x is not None:
            grad_x = grad_x.transpose(1, 2).view(batch, c_in, height, width)
        if grad_weight is not None and ctx.weight_4d:
            grad_weight = grad_weight[:, :, None, None]
        return grad_x, grad_weight, grad_bias, None, None, None


torch.library.register_autograd(
    "sbp::pointwise_conv", PointwiseConvFunction.backward, setup_context=PointwiseConvFunction.setup_context
)
PointwiseConvFunction = eager(PointwiseConvFunction)
