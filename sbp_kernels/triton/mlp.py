"""Triton backward of sbp::mlp, fc2(act(fc1(x))), on kept rows: launches of gemm.py's kernels.

With s = grad_scale, dy_K the kept rows of dy (read through keep_idx inside the tile loads, never
copied) and h_K the saved kept rows of the fc1 output:
1. grad_w2 = s * dy_K^T @ act(h_K), grad_b2 = s * sum dy_K  (act applied as h_K tiles are loaded,
   in registers, as the wgmma's register operand: act(h_K) is never materialised)
2. dh_K = act'(h_K) * (s * dy_K @ w2)  (act' in the GEMM epilogue; dh_K is the one intermediate,
   [B, n_keep, hidden] in the input dtype)
3. grad_w1 = dh_K^T @ x_K, grad_b1 = sum dh_K
4. grad_x = dh_K @ w1 into the kept rows, zeros into the dropped rows, in one launch (the linear
   backward's dx kernel). s is applied once, in steps 1 and 2.
A gradient nobody needs launches nothing: frozen w2 skips step 1, and dh_K (step 2) is computed
only when x, w1 or b1 needs a gradient.
"""
from typing import Tuple

import torch
from torch import Tensor

from . import gemm
from .linear import check_rows_args, kept_rows_sum, not_needed
from .library import call, kernel_op


def mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs=(True,) * 5):
    """reference.mlp_backward with Triton kernels.

    grad_out [B, n, c_out] (any strides), x_kept [B, n_keep, c_in], h_kept [B, n_keep, hidden],
    w1 [hidden, c_in], w2 [c_out, hidden]; needs: whether (x, w1, b1, w2, b2) need a gradient.
    Returns grad_x [B, n, c_in] (zero on dropped rows), grad_w1, grad_b1, grad_w2, grad_b2, None
    for each one not needed.
    """
    needs = tuple(bool(need) for need in needs)
    if len(needs) != 5:
        raise ValueError(f"needs must hold 5 flags for (x, w1, b1, w2, b2), got {len(needs)}")
    grads = call(
        _mlp_backward_op, grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, float(grad_scale), list(needs)
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


def _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, needs):
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
    if len(needs) != 5:
        raise ValueError(f"needs must hold 5 flags for (x, w1, b1, w2, b2), got {len(needs)}")


@kernel_op("sbp::mlp_backward_triton")
def _mlp_backward_op(
    grad_out: Tensor, x_kept: Tensor, h_kept: Tensor, w1: Tensor, w2: Tensor, keep_idx: Tensor,
    activation: str, grad_scale: float, needs: list[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return mlp_backward_kernels(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs)


def mlp_backward_kernels(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs):
    """The launches of the op above (also what the offline compile report replays)."""
    _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, needs)
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    batch, n, c_out = grad_out.shape
    hidden, c_in = w1.shape
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = (not_needed(grad_out) for _ in range(5))
    if need_w2:
        grad_w2 = grad_out.new_empty(c_out, hidden)
        grad_b2 = grad_out.new_empty(c_out) if need_b2 else grad_b2
        gemm.weight_gemm(
            h_kept, grad_out, grad_w2, grad_b2 if need_b2 else None, keep_idx, gather_b=True, scale=grad_scale,
            activation=activation,
        )
    elif need_b2:
        grad_b2 = kept_rows_sum(grad_out, keep_idx, grad_scale, gather=True)
    if need_x or need_w1 or need_b1:
        grad_h = grad_out.new_empty(batch, keep_idx.shape[0], hidden)
        gemm.row_gemm(
            grad_out, w2, grad_h, keep_idx, gather_a=True, scatter_out=False, scale=grad_scale, h=h_kept,
            activation=activation,
        )
        if need_w1:
            grad_w1 = grad_out.new_empty(hidden, c_in)
            grad_b1 = grad_out.new_empty(hidden) if need_b1 else grad_b1
            gemm.weight_gemm(x_kept, grad_h, grad_w1, grad_b1 if need_b1 else None, keep_idx, gather_b=False)
        elif need_b1:
            grad_b1 = kept_rows_sum(grad_h, keep_idx, 1.0, gather=False)
        if need_x:
            grad_x = grad_out.new_empty(batch, n, c_in)
            gemm.row_gemm(grad_h, w1, grad_x, keep_idx, gather_a=False, scatter_out=True)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_mlp_backward_op.register_fake
def _mlp_backward_fake(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs):
    _check_args(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, needs)
    batch, n, c_out = grad_out.shape
    hidden, c_in = w1.shape
    shapes = ((batch, n, c_in), (hidden, c_in), (hidden,), (c_out, hidden), (c_out,))
    return tuple(grad_out.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))
