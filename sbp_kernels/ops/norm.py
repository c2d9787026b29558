"""sbp::layer_norm and sbp::rms_norm (DESIGN.md 3.5): exact norms over the last dim whose backward
runs on kept rows (positions on dim -2) in closed form, from the kept rows of x alone.

tokenwise(norm, x, keep_idx) would serve too, but it re-runs the norm on the kept rows with a graph
(r extra forward work, and the norm's own saved tensors); these save x_K (plus LayerNorm's
per-row mean and rstd) and need no second forward. The forwards are written as the models write
them, so the output equals the dense module's:
- layer_norm: F.layer_norm (nn.LayerNorm, timm LayerNorm, Hugging Face LayerNorms).
- rms_norm: y = x * rsqrt(mean(x^2) + eps) in float32, then either
  (weight + weight_offset) * y.to(x.dtype) (Llama, Qwen, Mistral: scale_in_float=False) or
  (y * (weight_offset + weight.float())).to(x.dtype) (Gemma, offset 1: scale_in_float=True).
Norms are position-wise parts of a block: they take no grad_scale (the block's linear, attention
or MLP op applies it once).
"""
import math

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..validation import check_in_kernel, check_keep_idx, check_tensor, is_real
from . import _library  # noqa: F401  (declares the schemas)
from ._common import (
    autocast_enabled, cpp_eager, cpp_face, eager, gather_rows, in_memory_order, kept_rows_for_cpp, needs_graph,
    own_keep_idx, traced,
)

_LAYER_NORM_EAGER = cpp_face("layer_norm_eager")


def layer_norm(x, weight, bias, keep_idx, eps=1e-5, *, backend="auto"):
    """F.layer_norm(x, (c,), weight, bias, eps) exactly; gradients only through rows keep_idx of dim -2."""
    check_args(x, weight, bias, keep_idx, eps, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply_layer_norm(x, weight, bias, keep_idx, eps, backend)


def rms_norm(x, weight, keep_idx, eps=1e-6, weight_offset=0.0, scale_in_float=False, *, backend="auto"):
    """RMSNorm over the last dim exactly (see the module docstring); gradients only through rows keep_idx."""
    check_args(x, weight, None, keep_idx, eps, backend)
    if not is_real(weight_offset):
        raise TypeError(f"weight_offset must be a real number, got {type(weight_offset).__name__}")
    if not isinstance(scale_in_float, bool):
        raise TypeError(f"scale_in_float must be a bool, got {type(scale_in_float).__name__}")
    keep_idx = own_keep_idx(keep_idx)
    return apply_rms_norm(x, weight, keep_idx, eps, float(weight_offset), scale_in_float, backend)


def apply_layer_norm(x, weight, bias, keep_idx, eps=1e-5, backend="auto"):
    """sbp.layer_norm on checked arguments (a step's keep set): the modules' entry point. Under
    autocast the forward is F.layer_norm's under the device's own policy (float32 on CUDA, the input
    dtype on CPU), as the dense model's is; the backward runs in the dtype the forward computed in."""
    if not needs_graph(x, weight, bias):
        return _layer_norm(x, weight, bias, eps)
    if traced():
        return torch.ops.sbp.layer_norm(x, weight, bias, keep_idx, eps, backend)
    if not autocast_enabled(x) and cpp_eager(_backend.resolve(backend, "layer_norm", x.device)):
        x_kept = kept_rows_for_cpp(x, keep_idx, -2, True)
        return _LAYER_NORM_EAGER(x, weight, bias, keep_idx, x_kept, eps)
    return LayerNormFunction.apply(x, weight, bias, keep_idx, eps, backend)


def apply_rms_norm(x, weight, keep_idx, eps=1e-6, weight_offset=0.0, scale_in_float=False, backend="auto"):
    """sbp.rms_norm on checked arguments (a step's keep set): the modules' entry point."""
    if not needs_graph(x, weight):
        return _rms_norm(x, weight, eps, weight_offset, scale_in_float)
    if traced():
        return torch.ops.sbp.rms_norm(x, weight, keep_idx, eps, weight_offset, scale_in_float, backend)
    return RmsNormFunction.apply(x, weight, keep_idx, eps, weight_offset, scale_in_float, backend)


def check_args(x, weight, bias, keep_idx, eps, backend):
    check_tensor(x, "x", min_ndim=2)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, name)
            if t.device != x.device:
                raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")
            if tuple(t.shape) != (x.shape[-1],):
                raise ValueError(f"{name} must have shape [{x.shape[-1]}] (x's last dim), got {tuple(t.shape)}")
    if not is_real(eps) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    check_keep_idx(keep_idx, x.shape[-2], x.device)
    _backend.check_name(backend)


def _layer_norm(x, weight, bias, eps):
    return in_memory_order(lambda t: F.layer_norm(t, t.shape[-1:], weight, bias, eps), x)


def _rms_norm(x, weight, eps, weight_offset, scale_in_float):
    """The models' RMSNorm forward, operation for operation (so the output is bitwise theirs)."""
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    if scale_in_float:
        return (y * (weight_offset + weight.float())).to(x.dtype)
    w = weight + weight_offset if weight_offset else weight
    return w * y.to(x.dtype)


@torch.library.impl("sbp::layer_norm", "CompositeExplicitAutograd")
def _layer_norm_kernel(x, weight, bias, keep_idx, eps=1e-5, backend="auto"):
    check_in_kernel(check_args, x, weight, bias, keep_idx, eps, backend)
    return _layer_norm(x, weight, bias, eps)


@torch.library.register_fake("sbp::layer_norm")
def _layer_norm_fake(x, weight, bias, keep_idx, eps=1e-5, backend="auto"):
    check_args(x, weight, bias, keep_idx, eps, backend)
    return torch.empty_like(x)


@torch.library.impl("sbp::rms_norm", "CompositeExplicitAutograd")
def _rms_norm_kernel(x, weight, keep_idx, eps=1e-6, weight_offset=0.0, scale_in_float=False, backend="auto"):
    check_in_kernel(check_args, x, weight, None, keep_idx, eps, backend)
    return _rms_norm(x, weight, eps, weight_offset, scale_in_float)


@torch.library.register_fake("sbp::rms_norm")
def _rms_norm_fake(x, weight, keep_idx, eps=1e-6, weight_offset=0.0, scale_in_float=False, backend="auto"):
    check_args(x, weight, None, keep_idx, eps, backend)
    dtype = x.dtype if weight is None or scale_in_float else torch.promote_types(weight.dtype, x.dtype)
    return torch.empty_like(x, dtype=dtype)


def _kept_grad_rows(grad_out, keep_idx):
    return grad_out.index_select(-2, keep_idx)


def _scatter(dx_kept, keep_idx, x_shape, dtype):
    grad_x = dx_kept.new_zeros(x_shape, dtype=dtype)
    return grad_x.index_copy_(-2, keep_idx.long(), dx_kept.to(dtype))


def _sum_rows(t):
    """Sum over every dim but the last (batch and kept rows)."""
    return t.reshape(-1, t.shape[-1]).sum(0)


class LayerNormFunction(torch.autograd.Function):
    """The eager face of sbp::layer_norm; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, weight, bias, keep_idx, eps, backend):
        return _layer_norm(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, keep_idx, eps, backend = inputs
        ctx.backend = _backend.resolve(backend, "layer_norm", x.device)
        ctx.eps, ctx.x_shape = eps, x.shape
        ctx.compute_dtype = output.dtype  # autocast may have computed in float32
        ctx.needs = ctx.needs_input_grad[:3]
        ctx.save_for_backward(gather_rows(x, keep_idx, -2, ctx.backend), weight, bias, keep_idx)

    @staticmethod
    def backward(ctx, grad_out):
        x_kept, weight, bias, keep_idx = ctx.saved_tensors
        shape = x_kept.shape[-1:]
        x_c = x_kept.to(ctx.compute_dtype)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x_c, shape, weight, bias, ctx.eps)  # mixed dtypes as dense
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            _kept_grad_rows(grad_out, keep_idx).to(ctx.compute_dtype), x_c, shape, mean, rstd, weight, bias,
            [ctx.needs[0], ctx.needs[1] and weight is not None, ctx.needs[2] and bias is not None],
        )
        grad_x = None if dx is None else _scatter(dx, keep_idx, ctx.x_shape, x_kept.dtype)
        return grad_x, dw, db, None, None, None


class RmsNormFunction(torch.autograd.Function):
    """The eager face of sbp::rms_norm; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, weight, keep_idx, eps, weight_offset, scale_in_float, backend):
        return _rms_norm(x, weight, eps, weight_offset, scale_in_float)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, keep_idx, eps, weight_offset, scale_in_float, backend = inputs
        ctx.backend = _backend.resolve(backend, "rms_norm", x.device)
        ctx.eps, ctx.x_shape, ctx.weight_offset = eps, x.shape, weight_offset
        ctx.needs = ctx.needs_input_grad[:2]
        ctx.save_for_backward(gather_rows(x, keep_idx, -2, ctx.backend), weight, keep_idx)

    @staticmethod
    def backward(ctx, grad_out):
        x_kept, weight, keep_idx = ctx.saved_tensors
        # In float32, with xhat = x rstd: dxhat = dy * w_eff, dx = rstd (dxhat - xhat mean(dxhat xhat)),
        # dw = sum dy * xhat (the casts of the forward count as identities).
        x32 = x_kept.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = x32 * rstd
        dy = _kept_grad_rows(grad_out, keep_idx).float()
        dxhat = dy if weight is None else dy * (weight.float() + ctx.weight_offset)
        grad_x = grad_w = None
        if ctx.needs[0]:
            dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
            grad_x = _scatter(dx, keep_idx, ctx.x_shape, x_kept.dtype)
        if ctx.needs[1] and weight is not None:
            grad_w = _sum_rows(dy * xhat).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None


torch.library.register_autograd(
    "sbp::layer_norm", LayerNormFunction.backward, setup_context=LayerNormFunction.setup_context
)
torch.library.register_autograd("sbp::rms_norm", RmsNormFunction.backward, setup_context=RmsNormFunction.setup_context)
LayerNormFunction = eager(LayerNormFunction)
RmsNormFunction = eager(RmsNormFunction)
