"""tokenwise (DESIGN.md 3.5): any position-wise function, exact on all rows, with an autograd
graph (and so saved activations) only for the kept rows.

For LayerNorm and RMSNorm the package has ops with a closed-form kept-rows backward (norm.py),
which need no second forward; tokenwise serves every other position-wise function (layer scale,
a user's block).
"""
import torch

from ..backend import check_name
from ..validation import check_keep_idx, check_tensor
from ._common import own_keep_idx


def tokenwise(fn, x, keep_idx, dim=-2, *, backend="auto"):
    """fn(x) for a position-wise fn (LayerNorm, an MLP, a user block) along `dim` of x.

    The output is fn(x) itself, computed without a graph; the kept rows are run through fn a
    second time with a graph, which receives the output gradient of the kept rows. Costs r extra
    forward work and saves only the kept rows' activations (and keep_idx).

    backend is accepted (and checked) like every op's, for a uniform API; fn runs with whatever
    kernels it calls itself, so every backend computes the same.
    """
    check_name(backend)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    check_tensor(x, "x", min_ndim=1, dtypes=None)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index a dim of x (shape {tuple(x.shape)}), got {dim}")
    check_keep_idx(keep_idx, x.shape[dim], x.device)
    keep_idx = own_keep_idx(keep_idx)
    return apply(fn, x, keep_idx, dim)


def apply(fn, x, keep_idx, dim=-2):
    """tokenwise on checked arguments (a step's keep set): the modules' entry point."""
    if not torch.is_grad_enabled():
        return fn(x)
    with torch.no_grad():
        out = fn(x)
    return _RouteKeptGrad.apply(out, fn(x.index_select(dim, keep_idx)), keep_idx, dim)


class _RouteKeptGrad(torch.autograd.Function):
    """Returns `out` unchanged; backward hands the kept rows of the gradient to `kept_out`."""

    @staticmethod
    def forward(ctx, out, kept_out, keep_idx, dim):
        ctx.save_for_backward(keep_idx)
        ctx.dim = dim
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (keep_idx,) = ctx.saved_tensors
        return None, grad.index_select(ctx.dim, keep_idx), None, None
