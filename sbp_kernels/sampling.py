"""Keep-set samplers: which positions a stochastic-backprop layer keeps gradients for.

A keep set is a sorted, unique, 1-D int64 tensor of flat (row-major) positions of a layout
`(n,)`, `(H, W)` or `(T, H, W)`. The randomness is drawn on CPU from the package's own generator
(never the global one, so a converted model draws the same dropout masks as its dense copy under
the same seed) or from a generator the caller gives, so a seed gives the same keep set whatever
the device.

The package generator follows `torch.manual_seed` without consuming the global generator: until
`sbp_kernels.manual_seed(seed)` is called, it is reseeded from `torch.initial_seed()` whenever that
changes. Differently seeded processes (DDP ranks seeded `seed + rank`) so draw different keep sets,
and equally seeded runs draw the same ones. (Seeding torch again with the seed it already has
cannot be told apart from not seeding it: `sbp_kernels.manual_seed` restarts the keep-set stream.)
"""
import math
import numbers
from typing import NamedTuple

import torch

STRATEGIES = ("grid", "random", "temporal")
# The SBP modules, convert and step also take "auto": grid where the positions' layout is known
# (an image's pixels, a ViT's patches, Swin's windows), random for a plain sequence of tokens, where a
# regular grid would never keep two neighbours together (at r = 1/2 no token with the one before it:
# the attention gradient between adjacent tokens would never be computed; see keepset.draw).
SETTING_STRATEGIES = STRATEGIES + ("auto",)


class _PackageGenerator:
    """The package's CPU generator (see the module docstring)."""

    def __init__(self):
        self.generator = torch.Generator()
        self.follows = None  # the torch.initial_seed() it was seeded from; "manual" after manual_seed

    def get(self):
        if self.follows != "manual":
            seed = torch.initial_seed()
            if seed != self.follows:
                # A seed of its own, derived from the global one (a fixed odd multiplier, so the
                # keep-set stream is not a copy of the global stream, and the same in every process).
                self.generator.manual_seed((seed * 0x9E3779B97F4A7C15 + 0x5B9) % 2**63)
                self.follows = seed
        return self.generator

    def manual_seed(self, seed):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.generator.manual_seed(int(seed))
        self.follows = "manual"


_package_generator = _PackageGenerator()


def default_generator():
    """The package's own CPU generator, from which keep sets are drawn unless one is given."""
    return _package_generator.get()


def manual_seed(seed):
    """Seeds the package's keep-set generator (from then on it no longer follows torch.manual_seed)."""
    _package_generator.manual_seed(seed)


def keep_count(n, keep_ratio):
    """Number of positions kept out of `n`: `max(1, round(keep_ratio * n))`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_ratio(keep_ratio)
    return max(1, round(keep_ratio * n))


def sample_keep_indices(layout, keep_ratio, strategy="grid", generator=None, device=None):
    """Sample the keep set of a layout.

    strategy:
      - "grid": the paper's grid-wise sampling: an evenly spread pattern of exactly n_keep
        positions, shifted cyclically by a uniformly random offset over the whole layout (a
        torus), so every position is kept with probability exactly n_keep / n. The pattern is a
        checkerboard at keep_ratio 1/2 and one position of every s x s cell at 1/s^2 where the
        lattice divides the layout (the last two dims; a 3-D layout repeats it in every frame),
        and otherwise a low-discrepancy set (a run of the R_d sequence order) of n_keep positions.
        A 1-D layout keeps evenly spaced positions.
      - "random": uniform without replacement.
      - "temporal": whole frames of a (T, H, W) layout, evenly spaced with a random phase. The
        count is rounded to whole frames: `keep_count(T, keep_ratio) * H * W`.
    Every other strategy keeps exactly `keep_count(prod(layout), keep_ratio)` positions.
    generator: a CPU torch.Generator, or None for the package's own (see default_generator).
    """
    layout = check_layout(layout)
    n = math.prod(layout)
    n_keep = keep_count(n, keep_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if generator is None:
        generator = default_generator()
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    elif generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (keep sets are drawn on CPU), got {generator.device}")

    if strategy == "random":
        idx = torch.randperm(n, generator=generator)[:n_keep].sort().values
    elif strategy == "temporal":
        if len(layout) != 3:
            raise ValueError(f"strategy 'temporal' needs a (T, H, W) layout, got layout {layout}")
        t, h, w = layout
        frames = _shift((t,), _even_1d(t, keep_count(t, keep_ratio)), generator)
        idx = (frames[:, None] * (h * w) + torch.arange(h * w)).flatten()
    else:
        dims = tuple(d for d in layout if d > 1) or (1,)  # size-1 axes change nothing
        idx = _shift(dims, grid_pattern(dims, keep_ratio, n_keep), generator)
    return idx if device is None else idx.to(device)


class Windowed(NamedTuple):
    """The layout of an (H, W) grid cut into (wh, ww) windows (Swin): its keep sets are the same in
    every window, as window attention needs (see sample_windowed)."""

    grid: tuple
    window: tuple


def sample_windowed(layout, keep_ratio, strategy="grid", generator=None, device=None):
    """A keep set of a Windowed layout: one keep set of a (wh, ww) window (sample_keep_indices),
    repeated in every window of the (H, W) grid, which the windows tile exactly. Every position is
    kept with the same probability, keep_count(wh * ww, keep_ratio) / (wh * ww)."""
    (h, w), (wh, ww) = layout
    if h % wh or w % ww:
        raise ValueError(f"the windows {layout.window} must tile the grid {layout.grid}")
    in_window = torch.zeros(wh * ww, dtype=torch.bool)
    in_window[sample_keep_indices((wh, ww), keep_ratio, strategy, generator)] = True
    y, x = torch.arange(h)[:, None] % wh, torch.arange(w)[None, :] % ww
    idx = in_window[y * ww + x].flatten().nonzero().squeeze(1)
    return idx if device is None else idx.to(device)


def check_ratio(keep_ratio):
    # bool is an int subclass, and nan fails every comparison, so both need their own test.
    if (
        not isinstance(keep_ratio, numbers.Real)
        or isinstance(keep_ratio, bool)
        or math.isnan(keep_ratio)
        or not 0 < keep_ratio <= 1
    ):
        raise ValueError(f"keep_ratio must be a real number in (0, 1], got {keep_ratio!r}")


def check_layout(layout, name="layout"):
    if isinstance(layout, int) and not isinstance(layout, bool):
        layout = (layout,)
    if (
        not isinstance(layout, (tuple, list, torch.Size))
        or not 1 <= len(layout) <= 3
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in layout)
    ):
        raise ValueError(f"{name} must be (n,), (H, W) or (T, H, W) of positive ints, got {layout!r}")
    return tuple(int(d) for d in layout)


def _randint(high, generator):
    return int(torch.randint(high, (1,), generator=generator))


def _shift(dims, pattern, generator):
    """The flat positions of `pattern` (flat positions of the layout dims) after a uniformly
    random cyclic shift along every axis, sorted. Each position of the torus is then kept with
    probability len(pattern) / prod(dims), whatever the pattern."""
    coords = torch.stack(torch.unravel_index(pattern, dims))
    offsets = torch.tensor([_randint(d, generator) for d in dims])[:, None]
    shifted = (coords + offsets) % torch.tensor(dims)[:, None]
    flat = torch.zeros_like(pattern)
    for axis, size in enumerate(dims):
        flat = flat * size + shifted[axis]
    return flat.sort().values


def _even_1d(n, k):
    """k evenly spaced positions of n: floor(i * n / k)."""
    return torch.arange(k) * n // k


def grid_pattern(dims, keep_ratio, n_keep):
    """The evenly spread pattern of exactly n_keep flat positions that grid sampling shifts."""
    if len(dims) == 1:
        return _even_1d(dims[0], n_keep)
    lattice = _lattice(dims[-2], dims[-1], keep_ratio, n_keep)
    order = _low_discrepancy_order(dims)
    if lattice is None:
        return order[:n_keep].sort().values
    mask = lattice.expand(dims).flatten()
    on = order[mask[order]]  # lattice positions, in low-discrepancy order
    if len(on) >= n_keep:  # the lattice does not divide the layout: drop an even spread of it...
        return on[:n_keep].sort().values
    off = order[~mask[order]]  # ...or add an even spread of the other positions
    return torch.cat([on, off[: n_keep - len(on)]]).sort().values


def _lattice(h, w, keep_ratio, n_keep):
    """H x W mask of a sub-lattice of density keep_ratio, or None when keep_ratio is not a
    lattice density (1/2, or 1/s^2 for an integer s >= 2)."""
    y = torch.arange(h)[:, None]
    x = torch.arange(w)
    if keep_ratio == 0.5:  # the checkerboard colour with round(h * w / 2) squares (both when even)
        even = (y + x) % 2 == 0
        return even if int(even.sum()) == n_keep or h * w % 2 == 0 else ~even
    s = round(keep_ratio**-0.5)
    if s >= 2 and math.isclose(keep_ratio * s * s, 1.0):  # one position of every s x s cell
        return (y % s == 0) & (x % s == 0)
    return None


def _low_discrepancy_order(dims):
    """All positions sorted by frac(coords . alpha), alpha the R_d sequence step (powers of the
    inverse generalised golden ratio). Positions close in this order are far apart in the
    layout, so any run of consecutive ones is spread evenly over it."""
    d = len(dims)
    phi = 2.0
    for _ in range(50):  # fixed point of phi^(d+1) = phi + 1
        phi = (1 + phi) ** (1 / (d + 1))
    alpha = torch.tensor([phi ** -(i + 1) for i in range(d)], dtype=torch.float64)
    coords = torch.cartesian_prod(*[torch.arange(k) for k in dims]).reshape(-1, d).double()  # row-major
    return ((coords @ alpha) % 1).argsort(stable=True)
