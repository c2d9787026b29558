"""sbp::dropout (DESIGN.md 3.5): position-wise dropout whose backward keeps only the kept rows'
mask.

The forward is torch.native_dropout, the very call F.dropout makes (on CPU and CUDA alike), so the
same seed draws the same mask as the dense model's nn.Dropout. Only the mask of the kept rows
(positions on dim -2) is saved, as bool; the gradient is dy * mask / (1 - p) on kept rows and 0
on dropped ones, as for every position-wise op inside an SBP block.
"""

import torch

from .. import backend as _backend
from .. import replay
from ..validation import check_in_kernel, check_keep_idx, check_tensor, is_real
from . import _library  # noqa: F401  (declares the schemas)
from ._common import eager, gather_rows, needs_graph, own_keep_idx, traced


def dropout(x, keep_idx, p, *, backend="auto"):
    """F.dropout(x, p, training=True) with the same mask; gradients only through rows keep_idx of dim -2."""
    check_args(x, keep_idx, p, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply(x, keep_idx, p, backend)


def apply(x, keep_idx, p, backend="auto"):
    """sbp.dropout on checked arguments (a step's keep set): the modules' entry point."""
    if not needs_graph(x) or p == 0:
        return _forward(x, keep_idx, p)[0] if p else x
    if traced():
        return torch.ops.sbp.dropout(x, keep_idx, p, backend)
    return DropoutFunction.apply(x, keep_idx, p, backend)[0]


def check_args(x, keep_idx, p, backend):
    check_tensor(x, "x", min_ndim=2)
    if not is_real(p) or not 0 <= p < 1:
        raise ValueError(f"p must be a real number in [0, 1), got {p!r}")
    check_keep_idx(keep_idx, x.shape[-2], x.device)
    _backend.check_name(backend)


def _forward(x, keep_idx, p):
    out, mask = replay.dropout(x, p, lambda m: gather_rows(m, keep_idx, -2))
    return out, gather_rows(mask, keep_idx, -2)


@torch.library.impl("sbp::dropout", "CompositeImplicitAutograd")
def _dropout_composite(x, keep_idx, p, backend="auto"):
    return torch.ops.sbp.dropout_forward(x, keep_idx, p, backend)[0]


@torch.library.impl("sbp::dropout_forward", "CompositeExplicitAutograd")
def _dropout_forward_kernel(x, keep_idx, p, backend):
    check_in_kernel(check_args, x, keep_idx, p, backend)
    return _forward(x, keep_idx, p)


@torch.library.register_fake("sbp::dropout_forward")
def _dropout_forward_fake(x, keep_idx, p, backend):
    check_args(x, keep_idx, p, backend)
    kept = (*x.shape[:-2], keep_idx.shape[0], x.shape[-1])
    return torch.empty_like(x), x.new_empty(kept, dtype=torch.bool)


class DropoutFunction(torch.autograd.Function):
    """The eager face of sbp::dropout_forward; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, keep_idx, p, backend):
        return _forward(x, keep_idx, p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, keep_idx, p, backend = inputs
        ctx.backend = _backend.resolve(backend, "dropout", x.device)
        ctx.p, ctx.x_shape = p, x.shape
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], keep_idx)

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):
        mask_kept, keep_idx = ctx.saved_tensors
        dx_kept = torch.ops.aten.native_dropout_backward(grad_out.index_select(-2, keep_idx), mask_kept, 1 / (1 - ctx.p))
        grad_x = grad_out.new_zeros(ctx.x_shape).index_copy_(-2, keep_idx.long(), dx_kept)
        return grad_x, None, None, None


torch.library.register_autograd(
    "sbp::dropout_forward", DropoutFunction.backward, setup_context=DropoutFunction.setup_context
)
DropoutFunction = eager(DropoutFunction)
