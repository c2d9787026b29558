"""Triton kept-rows backward of sbp::linear and sbp::pointwise_conv, and the forward's row gather.

Two launches of the kept-rows GEMMs (gemm.py), no gathered copy of dy:
- weight GEMM: grad_weight = s * dy_K^T @ x_K and grad_bias = s * sum dy_K, dy's kept rows read
  through keep_idx inside the tile loads (split-K when the weight is small);
- row GEMM: grad_x = s * dy_K @ weight written into the kept rows, and zeros into the dropped rows
  by other programs of the same launch.
A gradient nobody needs (a frozen weight, an input without requires_grad) launches nothing.

Both are torch.library ops (`sbp::kept_rows_backward_triton`, `sbp::gather_rows_triton`;
library.kernel_op) with fake kernels, so torch.compile(fullgraph=True) traces a backward that calls
them, and on a GPU inductor sees the kernels themselves. An op cannot return None: the op returns
an empty tensor for a gradient not asked for, and the Python wrappers turn it into None.
"""
from typing import Tuple

import torch
from torch import Tensor

from . import gemm
from .library import call, kernel_op


def kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first,
                       need_dx=True, need_dw=True, need_db=True):
    """reference.kept_rows_backward with Triton kernels.

    grad_out [B, n, c_out] with any strides, x_kept [B, n_keep, c_in], weight [c_out, c_in],
    keep_idx sorted unique int64/int32 positions. Returns grad_x [B, n, c_in] (zero on dropped
    rows; stored [B, c_in, n] and returned as its transposed view when channels_first),
    grad_weight [c_out, c_in], grad_bias [c_out], every one times grad_scale, and None for each
    gradient whose need_* flag is False (its GEMM is not launched).
    """
    needs = (bool(need_dx), bool(need_dw), bool(need_db))
    grads = call(
        _kept_rows_backward_op, grad_out, x_kept, weight, keep_idx, float(grad_scale), bool(channels_first), *needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


def not_needed(like):
    """The placeholder a custom op returns for a gradient not asked for."""
    return like.new_empty(0)


def kept_rows_sum(rows, keep_idx, scale, gather):
    """scale * the sum of rows[b, keep_idx[k]] (gather) or rows[b, k] over b and k: a bias
    gradient whose weight gradient is not needed, so no weight GEMM computes it on the way."""
    kept = rows.index_select(1, keep_idx) if gather else rows
    return (kept.sum((0, 1), dtype=torch.promote_types(rows.dtype, torch.float32)) * scale).to(rows.dtype)


def gather_rows(x, keep_idx, dim):
    """x.index_select(dim, keep_idx) by one Triton kernel: strided read, contiguous write."""
    return call(_gather_rows_op, x, keep_idx, dim)


def check_rows_args(grad_out, x_kept, weights, keep_idx):
    """Metadata checks the kernels rely on (the public API has validated the values)."""
    if grad_out.dim() != 3 or x_kept.dim() != 3:
        raise ValueError(
            f"grad_out and x_kept must be 3-D [B, n, c] row views, got {tuple(grad_out.shape)} and "
            f"{tuple(x_kept.shape)}"
        )
    for name, t in (("x_kept", x_kept), *weights):
        if t.dtype != grad_out.dtype:
            raise TypeError(f"{name} must have grad_out's dtype {grad_out.dtype}, got {t.dtype}")
        if t.device != grad_out.device:
            raise ValueError(f"{name} must be on grad_out's device {grad_out.device}, got {t.device}")
    if keep_idx.dim() != 1 or keep_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep_idx must be a 1-D int64/int32 tensor, got {keep_idx.dtype} {tuple(keep_idx.shape)}")
    if x_kept.shape[:2] != (grad_out.shape[0], keep_idx.shape[0]):
        raise ValueError(
            f"x_kept must have shape [{grad_out.shape[0]}, {keep_idx.shape[0]}, c_in], got {tuple(x_kept.shape)}"
        )


def _check_args(grad_out, x_kept, weight, keep_idx):
    check_rows_args(grad_out, x_kept, (("weight", weight),), keep_idx)
    if weight.dim() != 2 or tuple(weight.shape) != (grad_out.shape[2], x_kept.shape[2]):
        raise ValueError(
            f"weight must have shape [{grad_out.shape[2]}, {x_kept.shape[2]}], got {tuple(weight.shape)}"
        )


def empty_rows(like, batch, n, channels, channels_first):
    """An uninitialised [batch, n, channels] tensor, stored [batch, channels, n] when channels_first."""
    if channels_first:
        return like.new_empty(batch, channels, n).transpose(1, 2)
    return like.new_empty(batch, n, channels)


@kernel_op("sbp::kept_rows_backward_triton")
def _kept_rows_backward_op(
    grad_out: Tensor, x_kept: Tensor, weight: Tensor, keep_idx: Tensor, grad_scale: float, channels_first: bool,
    need_dx: bool = True, need_dw: bool = True, need_db: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    return kept_rows_backward_kernels(
        grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, need_dx, need_dw, need_db
    )


def kept_rows_backward_kernels(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, need_dx, need_dw,
                               need_db):
    """The launches of the op above (also what the offline compile report replays)."""
    _check_args(grad_out, x_kept, weight, keep_idx)
    batch, n, c_out = grad_out.shape
    c_in = weight.shape[1]
    grad_x, grad_weight, grad_bias = (not_needed(grad_out) for _ in range(3))  # distinct: outputs may not alias
    if need_dw:
        grad_weight = grad_out.new_empty(c_out, c_in)
        grad_bias = grad_out.new_empty(c_out) if need_db else grad_bias
        gemm.weight_gemm(
            x_kept, grad_out, grad_weight, grad_bias if need_db else None, keep_idx, gather_b=True, scale=grad_scale
        )
    elif need_db:
        grad_bias = kept_rows_sum(grad_out, keep_idx, grad_scale, gather=True)
    if need_dx:
        grad_x = empty_rows(grad_out, batch, n, c_in, channels_first)
        gemm.row_gemm(grad_out, weight, grad_x, keep_idx, gather_a=True, scatter_out=True, scale=grad_scale)
    return grad_x, grad_weight, grad_bias


@_kept_rows_backward_op.register_fake
def _kept_rows_backward_fake(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, need_dx=True,
                             need_dw=True, need_db=True):
    _check_args(grad_out, x_kept, weight, keep_idx)
    batch, n, c_out = grad_out.shape
    c_in = weight.shape[1]
    grad_x = empty_rows(grad_out, batch, n, c_in, channels_first) if need_dx else not_needed(grad_out)
    grad_weight = grad_out.new_empty(c_out, c_in) if need_dw else not_needed(grad_out)
    return grad_x, grad_weight, grad_out.new_empty(c_out) if need_db else not_needed(grad_out)


def _gather_shape(x, keep_idx, dim):
    if keep_idx.dim() != 1 or keep_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep_idx must be a 1-D int64/int32 tensor, got {keep_idx.dtype} {tuple(keep_idx.shape)}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}), got {dim}")
    dim = dim % x.dim()
    return (*x.shape[:dim], keep_idx.shape[0], *x.shape[dim + 1:])


@kernel_op("sbp::gather_rows_triton")
def _gather_rows_op(x: Tensor, keep_idx: Tensor, dim: int) -> Tensor:
    _gather_shape(x, keep_idx, dim)
    return gemm.gather_rows(x, keep_idx, dim)


@_gather_rows_op.register_fake
def _gather_rows_fake(x, keep_idx, dim):
    return x.new_empty(_gather_shape(x, keep_idx, dim))
