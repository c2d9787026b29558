"""Keep-set samplers: which positions a stochastic-backprop layer keeps gradients for.

A keep set is a sorted, unique, 1-D int64 tensor of flat (row-major) positions of a layout
`(n,)`, `(H, W)` or `(T, H, W)`. The randomness is always drawn on CPU from the given
generator, so a seed gives the same keep set whatever the device.
"""
import math
import numbers

import torch

from .validation import mark_valid

STRATEGIES = ("grid", "random", "temporal")


def keep_count(n, keep_ratio):
    """Number of positions kept out of `n`: `max(1, round(keep_ratio * n))`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_ratio(keep_ratio)
    return max(1, round(keep_ratio * n))


def sample_keep_indices(layout, keep_ratio, strategy="grid", generator=None, device=None):
    """Sample the keep set of a layout.

    strategy:
      - "grid": the paper's grid-wise sampling. For keep_ratio 1/2 (checkerboard) and 1/s^2
        (one position of every s x s cell) the kept positions are a regular sub-lattice of each
        H x W frame with a random phase, the same in every frame; other ratios take a run of
        positions in a low-discrepancy order starting at a random place, which is spread over
        the whole layout. A 1-D layout keeps evenly spaced positions with a random phase.
      - "random": uniform without replacement.
      - "temporal": whole frames of a (T, H, W) layout, evenly spaced with a random phase. The
        count is rounded to whole frames: `keep_count(T, keep_ratio) * H * W`.
    Every other strategy keeps exactly `keep_count(prod(layout), keep_ratio)` positions, and
    every strategy keeps each position with probability about keep_ratio over calls.
    """
    layout = _check_layout(layout)
    n = math.prod(layout)
    n_keep = keep_count(n, keep_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (keep sets are drawn on CPU), got {generator.device}")

    if strategy == "random":
        idx = torch.randperm(n, generator=generator)[:n_keep].sort().values
    elif strategy == "temporal":
        if len(layout) != 3:
            raise ValueError(f"strategy 'temporal' needs a (T, H, W) layout, got layout {layout}")
        t, h, w = layout
        frames = _spread(torch.arange(t), keep_count(t, keep_ratio), generator)
        idx = (frames[:, None] * (h * w) + torch.arange(h * w)).flatten()
    else:
        idx = _grid(layout, keep_ratio, n_keep, generator)
    idx = idx.to("cpu" if device is None else device)
    mark_valid(idx, n)  # valid by construction: the ops need not check its values again
    return idx


def _check_ratio(keep_ratio):
    # bool is an int subclass, and nan fails every comparison, so both need their own test.
    if (
        not isinstance(keep_ratio, numbers.Real)
        or isinstance(keep_ratio, bool)
        or math.isnan(keep_ratio)
        or not 0 < keep_ratio <= 1
    ):
        raise ValueError(f"keep_ratio must be a real number in (0, 1], got {keep_ratio!r}")


def _check_layout(layout):
    if isinstance(layout, int) and not isinstance(layout, bool):
        layout = (layout,)
    if (
        not isinstance(layout, (tuple, list, torch.Size))
        or not 1 <= len(layout) <= 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in layout)
    ):
        raise ValueError(f"layout must be (n,), (H, W) or (T, H, W) of positive ints, got {layout!r}")
    return tuple(layout)


def _randint(high, generator):
    return int(torch.randint(high, (1,), generator=generator))


def _spread(candidates, k, generator):
    """k of the sorted `candidates`, evenly spaced with a random phase j.

    Picks floor((i * m + j) / k) for i < k, j uniform in [0, m): exact integer arithmetic, k
    distinct sorted picks, and each candidate is picked for exactly k of the m phases.
    """
    m = len(candidates)
    j = _randint(m, generator)
    return candidates[(torch.arange(k) * m + j) // k]


def _grid(layout, keep_ratio, n_keep, generator):
    # Size-1 axes change neither the flat order nor the spread: drop them so (1, n) acts as (n,).
    dims = [d for d in layout if d > 1]
    if len(dims) <= 1:
        return _spread(torch.arange(math.prod(layout)), n_keep, generator)
    frame = _lattice(dims[-2], dims[-1], keep_ratio, generator)
    if frame is None:
        return _window(_low_discrepancy_order(dims), n_keep, generator)
    return _fix_count(frame.expand(dims).flatten(), n_keep, generator)


def _lattice(h, w, keep_ratio, generator):
    """H x W mask of a sub-lattice of density keep_ratio with a random phase, or None when
    keep_ratio is not a lattice density (1/2, or 1/s^2 for an integer s >= 2)."""
    y = torch.arange(h)[:, None]
    x = torch.arange(w)
    if keep_ratio == 0.5:  # checkerboard
        return (y + x + _randint(2, generator)) % 2 == 0
    s = round(keep_ratio**-0.5)
    if s >= 2 and math.isclose(keep_ratio * s * s, 1.0):  # one position of every s x s cell
        return (y % s == _randint(s, generator)) & (x % s == _randint(s, generator))
    return None


def _fix_count(mask, n_keep, generator):
    """The positions of a flat lattice mask, brought to exactly n_keep.

    When the lattice does not divide the layout its count depends on the phase: drop an evenly
    spread subset of its positions, or add an evenly spread subset of the others.
    """
    on = mask.nonzero().squeeze(1)
    if len(on) >= n_keep:
        return _spread(on, n_keep, generator)
    off = (~mask).nonzero().squeeze(1)
    return torch.cat([on, _spread(off, n_keep - len(on), generator)]).sort().values


def _low_discrepancy_order(dims):
    """All positions sorted by frac(coords . alpha), alpha the R_d sequence step (powers of the
    inverse generalised golden ratio). Positions close in this order are far apart in the
    layout, so any run of consecutive ones is spread evenly over it."""
    d = len(dims)
    phi = 2.0
    for _ in range(50):  # fixed point of phi^(d+1) = phi + 1
        phi = (1 + phi) ** (1 / (d + 1))
    alpha = torch.tensor([phi ** -(i + 1) for i in range(d)], dtype=torch.float64)
    coords = torch.cartesian_prod(*[torch.arange(k) for k in dims]).double()  # row-major
    return ((coords @ alpha) % 1).argsort(stable=True)


def _window(order, k, generator):
    # A cyclic run of k positions with a uniform random start keeps each one for exactly k of
    # the n starts: exact coverage k / n.
    n = len(order)
    start = _randint(n, generator)
    return order[(start + torch.arange(k)) % n].sort().values
