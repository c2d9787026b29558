"""tokenwise (DESIGN.md 3.5): any position-wise function, exact on all rows, with an autograd
graph (and so saved activations) only for the kept rows."""
import torch

from ..validation import check_keep_idx, check_tensor


def tokenwise(fn, x, keep_idx, dim=-2):
    """fn(x) for a position-wise fn (LayerNorm, an MLP, a user block) along `dim` of x.

    The output is fn(x) itself, computed without a graph; the kept rows are run through fn a
    second time with a graph, and enter the output as (y_kept - y_kept.detach()), exact zeros that
    carry their gradient. Costs r extra forward work on kept rows and saves only their activations.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    check_tensor(x, "x", min_ndim=1, dtypes=None)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index a dim of x (shape {tuple(x.shape)}), got {dim}")
    check_keep_idx(keep_idx, x.shape[dim], x.device)
    with torch.no_grad():
        out = fn(x)
    if not torch.is_grad_enabled():
        return out
    kept_out = fn(x.index_select(dim, keep_idx))
    return out.index_add(dim, keep_idx, kept_out - kept_out.detach())
