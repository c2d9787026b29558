"""Triton backward of sbp::mlp, fc2(act(fc1(x))), on kept rows: four launches of gemm.py's kernel.

With s = grad_scale, dy_K the kept rows of dy (read through keep_idx inside the tile loads, never
copied) and h_K the saved kept rows of the fc1 output:
1. grad_w2 = s * dy_K^T @ act(h_K), grad_b2 = s * sum dy_K  (act applied as h_K tiles are loaded:
   act(h_K) is never materialised)
2. dh_K = act'(h_K) * (s * dy_K @ w2)  (act' in the GEMM epilogue; dh_K is the one intermediate,
   [B, n_keep, hidden] in the input dtype)
3. grad_w1 = dh_K^T @ x_K, grad_b1 = sum dh_K
4. grad_x = dh_K @ w1 into the kept rows, zeros into the dropped rows, in one launch (the linear
   backward's dx kernel). s is applied once, in steps 1 and 2.
"""
from typing import Tuple

import torch
from torch import Tensor

from . import gemm
from .linear import check_rows_args


def mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale):
    """reference.mlp_backward with Triton kernels.

    grad_out [B, n, c_out] (any strides), x_kept [B, n_keep, c_in], h_kept [B, n_keep, hidden],
    w1 [hidden, c_in], w2 [c_out, hidden]. Returns grad_x [B, n, c_in] (zero on dropped rows),
    grad_w1, grad_b1, grad_w2, grad_b2.
    """
    return torch.ops.sbp.mlp_backward_triton(
        grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, float(grad_scale)
    )


def _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation):
    check_rows_args(grad_out, x_kept, (("h_kept", h_kept), ("w1", w1), ("w2", w2)), keep_idx)
    c_in = x_kept.shape[2]
    if w1.dim() != 2 or w1.shape[1] != c_in:
        raise ValueError(f"w1 must have shape [hidden, {c_in}], got {tuple(w1.shape)}")
    hidden = w1.shape[0]
    if tuple(w2.shape) != (grad_out.shape[2], hidden):
        raise ValueError(f"w2 must have shape [{grad_out.shape[2]}, {hidden}], got {tuple(w2.shape)}")
    if tuple(h_kept.shape) != (*x_kept.shape[:2], hidden):
        raise ValueError(f"h_kept must have shape {(*x_kept.shape[:2], hidden)}, got {tuple(h_kept.shape)}")
    if activation not in gemm.ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(gemm.ACTIVATION_CODES)}, got {activation!r}")


@torch.library.custom_op("sbp::mlp_backward_triton", mutates_args=())
def _mlp_backward_op(
    grad_out: Tensor, x_kept: Tensor, h_kept: Tensor, w1: Tensor, w2: Tensor, keep_idx: Tensor,
    activation: str, grad_scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation)
    batch, n, c_out = grad_out.shape
    hidden, c_in = w1.shape
    grad_w2, grad_b2 = grad_out.new_empty(c_out, hidden), grad_out.new_empty(c_out)
    gemm.weight_gemm(
        grad_out, h_kept, grad_w2, grad_b2, keep_idx, gather_a=True, scale=grad_scale, activation=activation
    )
    grad_h = grad_out.new_empty(batch, keep_idx.shape[0], hidden)
    gemm.row_gemm(
        grad_out, w2, grad_h, keep_idx, gather_a=True, scatter_out=False, scale=grad_scale, h=h_kept,
        activation=activation,
    )
    grad_w1, grad_b1 = grad_out.new_empty(hidden, c_in), grad_out.new_empty(hidden)
    gemm.weight_gemm(grad_h, x_kept, grad_w1, grad_b1, keep_idx, gather_a=False)
    grad_x = grad_out.new_empty(batch, n, c_in)
    gemm.row_gemm(grad_h, w1, grad_x, keep_idx, gather_a=False, scatter_out=True)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_mlp_backward_op.register_fake
def _mlp_backward_fake(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale):
    _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation)
    batch, n, c_out = grad_out.shape
    hidden, c_in = w1.shape
    new = grad_out.new_empty
    return new(batch, n, c_in), new(hidden, c_in), new(hidden), new(c_out, hidden), new(c_out)
