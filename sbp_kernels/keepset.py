"""One step, one keep set (DESIGN.md section 2): SBP layers that see the same position count in
one forward pass share the same kept positions, as the paper found best.

`step(...)` opens a scope in which every SBP module asks `keep_idx_for(n, ...)` for its keep set;
the first request for a position count n draws it and later requests reuse it. Outside any scope
each call draws a fresh set. Models converted with `sbp_kernels.convert` open a scope at every
forward call of the converted root module, unless the user already opened one.
"""
import contextlib
import math
import threading

import torch

from .sampling import sample_keep_indices
from .validation import check_keep_idx, mark_valid

_local = threading.local()


class KeepSets:
    """The keep sets of one step, drawn lazily per (position count, device)."""

    def __init__(self, keep_ratio=None, strategy=None, layout=None, generator=None, keep_idx=None):
        self.keep_ratio, self.strategy, self.generator = keep_ratio, strategy, generator
        self.layout = None if layout is None else tuple(layout)
        self.keep_idx = keep_idx
        self._sets = {}

    def get(self, n, device, keep_ratio, strategy, layout=None):
        key = (n, str(device))
        if key not in self._sets:
            self._sets[key] = self._draw(n, device, keep_ratio, strategy, layout)
        return self._sets[key]

    def _draw(self, n, device, keep_ratio, strategy, layout):
        if self.keep_idx is not None:
            keep_idx = self.keep_idx.to(device)
            check_keep_idx(keep_idx, n, keep_idx.device)
            return keep_idx
        keep_ratio = self.keep_ratio if self.keep_ratio is not None else keep_ratio
        strategy = self.strategy if self.strategy is not None else strategy
        if layout is None and self.layout is not None and _fits(self.layout, n):
            layout = self.layout
        return draw(n, device, keep_ratio, strategy, layout, self.generator)


def _fits(layout, n):
    """A step's layout serves n positions when they are its positions plus fewer prefix tokens
    (a ViT's class / register tokens): other position counts (a convnet's other stages) do not
    use it."""
    m = math.prod(layout)
    return m <= n < 2 * m


def draw(n, device, keep_ratio, strategy, layout=None, generator=None):
    """A fresh keep set of n positions. With a layout of m <= n positions, the first n - m tokens
    (a ViT's class / register tokens) are always kept and the layout's positions follow them."""
    if layout is None:
        return sample_keep_indices((n,), keep_ratio, strategy, generator, device)
    prefix = n - math.prod(layout)
    idx = sample_keep_indices(layout, keep_ratio, strategy, generator, device)
    if prefix == 0:
        return idx
    idx = torch.cat([torch.arange(prefix, device=idx.device), idx + prefix])
    mark_valid(idx, n)
    return idx


def current():
    """The KeepSets of the innermost open step, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def step(keep_ratio=None, strategy=None, layout=None, generator=None, keep_idx=None):
    """Shares one keep set per position count among all SBP layers run inside the block.

    keep_ratio / strategy override the modules' own; layout ((H, W) or (T, H, W)) lays out the
    last prod(layout) tokens for grid sampling of any position count n with
    prod(layout) <= n < 2 prod(layout), the n - prod(layout) tokens before them are always kept
    (a ViT's class token); keep_idx fixes the indices themselves.
    """
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(KeepSets(keep_ratio, strategy, layout, generator, keep_idx))
    try:
        yield stack[-1]
    finally:
        stack.pop()


def keep_idx_for(n, device, keep_ratio, strategy="grid", layout=None):
    """The keep set an SBP module uses for n positions: the open step's, else a fresh one.

    layout: the module's own knowledge of how the n positions are laid out (a 1x1 conv knows its
    (H, W)); it takes precedence over the step's layout.
    """
    sets = current()
    if sets is None:
        return draw(n, device, keep_ratio, strategy, layout)
    return sets.get(n, device, keep_ratio, strategy, layout)
