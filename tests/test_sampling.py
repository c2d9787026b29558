import math

import pytest
import torch

from sbp_kernels.sampling import keep_count, sample_keep_indices

LAYOUTS = [(1,), (7,), (197,), (14, 14), (7, 9), (5, 14, 14), (3, 7, 5)]
RATIOS = [1.0, 0.5, 0.25, 0.3, 0.01, 1e-6]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def expected_count(layout, r, strategy):
    if strategy == "temporal":
        t, h, w = layout
        return max(1, round(r * t)) * h * w
    return max(1, round(r * math.prod(layout)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("r", RATIOS)
def test_counts_sorted_unique_in_range(layout, r):
    n = math.prod(layout)
    strategies = ["grid", "random"] + (["temporal"] if len(layout) == 3 else [])
    g = gen(1)
    for strategy in strategies:
        for _ in range(5):  # several phases
            idx = sample_keep_indices(layout, r, strategy, generator=g)
            assert idx.dtype == torch.int64 and idx.dim() == 1
            assert len(idx) == expected_count(layout, r, strategy)
            assert (idx[1:] > idx[:-1]).all()
            assert idx[0] >= 0 and idx[-1] < n


def test_keep_count():
    assert keep_count(10, 0.25) == round(2.5)
    assert keep_count(10, 1e-6) == 1
    assert keep_count(7, 1.0) == 7
    for bad in (0, -3, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"\bn\b"):
            keep_count(bad, 0.5)


def test_int_layout_and_ratio_one():
    assert torch.equal(sample_keep_indices(7, 0.5, generator=gen()), sample_keep_indices((7,), 0.5, generator=gen()))
    for layout in [(14, 14), (7, 9), (3, 7, 5)]:
        for strategy in ("grid", "random"):
            idx = sample_keep_indices(layout, 1.0, strategy, generator=gen())
            assert torch.equal(idx, torch.arange(math.prod(layout)))


def test_grid_1d_evenly_spaced():
    g = gen(2)
    for _ in range(20):
        idx = sample_keep_indices((197,), 0.3, generator=g)
        gaps = idx.diff()
        assert gaps.min() >= 3 and gaps.max() <= 4  # 197 / 59 = 3.34


def cells(idx, h, w, s):
    """keep mask as [h/s, w/s, s, s]: cell rows, cell cols, offset in cell."""
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[idx] = True
    return mask.view(h // s, s, w // s, s).permute(0, 2, 1, 3)


def test_grid_quarter_is_lattice():
    g = gen(3)
    phases = set()
    for _ in range(200):
        c = cells(sample_keep_indices((14, 14), 0.25, generator=g), 14, 14, 2)
        assert (c.sum((2, 3)) == 1).all()  # one per 2x2 cell
        assert (c == c[0, 0]).all()  # the same offset in every cell
        phases.add(tuple(c[0, 0].flatten().tolist()))
    assert len(phases) == 4


def test_grid_ninth_is_lattice():
    c = cells(sample_keep_indices((12, 12), 1 / 9, generator=gen(4)), 12, 12, 3)
    assert (c.sum((2, 3)) == 1).all() and (c == c[0, 0]).all()


def test_grid_half_is_checkerboard():
    g = gen(5)
    phases = set()
    y, x = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    for _ in range(200):
        idx = sample_keep_indices((14, 14), 0.5, generator=g)
        c = cells(idx, 14, 14, 2)
        assert (c.sum((2, 3)) == 2).all()
        parity = ((y + x).flatten()[idx] % 2).unique()
        assert len(parity) == 1
        phases.add(int(parity))
    assert phases == {0, 1}


def test_grid_3d_same_phase_every_frame():
    g = gen(6)
    for r in (0.5, 0.25):
        idx = sample_keep_indices((5, 14, 14), r, generator=g)
        mask = torch.zeros(5 * 196, dtype=torch.bool)
        mask[idx] = True
        frames = mask.view(5, 196)
        assert (frames == frames[0]).all()
        assert int(frames[0].sum()) == round(r * 196)


def test_grid_non_lattice_is_spread():
    # r = 0.3 on 14 x 14: every 4 x 4 window of the layout holds some kept positions.
    g = gen(7)
    for _ in range(20):
        mask = torch.zeros(196)
        mask[sample_keep_indices((14, 14), 0.3, generator=g)] = 1
        counts = torch.nn.functional.avg_pool2d(mask.view(1, 1, 14, 14), 4, stride=1) * 16
        assert counts.min() >= 2 and counts.max() <= 8


@pytest.mark.parametrize("strategy", ["grid", "random"])
@pytest.mark.parametrize("layout", [(14, 14), (7, 9), (197,)])
@pytest.mark.parametrize("r", [0.5, 0.3])
def test_uniform_coverage(strategy, layout, r):
    draws = 400
    n = math.prod(layout)
    g = gen(8)
    freq = torch.zeros(n)
    for _ in range(draws):
        freq[sample_keep_indices(layout, r, strategy, generator=g)] += 1
    freq /= draws
    # binomial std <= 0.025 at 400 draws: 0.1 is 4 std.
    assert (freq - keep_count(n, r) / n).abs().max() < 0.1


def test_temporal_keeps_whole_frames_uniformly():
    g = gen(9)
    freq = torch.zeros(7)
    for _ in range(400):
        idx = sample_keep_indices((7, 3, 4), 0.3, "temporal", generator=g)
        frames = idx.view(-1, 12) // 12
        assert (frames == frames[:, :1]).all()  # whole frames
        assert torch.equal(idx.view(-1, 12) % 12, torch.arange(12).expand(len(frames), 12))
        freq[frames[:, 0]] += 1
    assert (freq / 400 - 2 / 7).abs().max() < 0.1


@pytest.mark.parametrize("strategy", ["grid", "random"])
def test_reproducible_and_device(strategy):
    a = sample_keep_indices((14, 14), 0.3, strategy, generator=gen(10))
    b = sample_keep_indices((14, 14), 0.3, strategy, generator=gen(10), device="cpu")
    c = sample_keep_indices((14, 14), 0.3, strategy, generator=gen(11), device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert b.device.type == "cpu" and c.device.type == "cpu"


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_ratio(bad):
    with pytest.raises((ValueError, TypeError), match="keep_ratio"):
        sample_keep_indices((14, 14), bad)


@pytest.mark.parametrize("bad", [(), (0, 3), (-1,), (2, 3, 4, 5), "abc", (2.0, 3), 0])
def test_bad_layout(bad):
    with pytest.raises(ValueError, match="layout"):
        sample_keep_indices(bad, 0.5)


def test_bad_strategy_temporal_generator():
    with pytest.raises(ValueError, match="strategy.*grid"):
        sample_keep_indices((14, 14), 0.5, "foo")
    with pytest.raises(ValueError, match="layout"):
        sample_keep_indices((14, 14), 0.5, "temporal")
    with pytest.raises(TypeError, match="generator"):
        sample_keep_indices((14, 14), 0.5, generator=5)


# --- grid sampling keeps every position with probability n_keep / n (DESIGN.md 2) ------------------


@pytest.mark.parametrize(
    "layout, r",
    [((3, 3), 0.25), ((7, 7), 0.25), ((5, 7), 0.5), ((14, 14), 1 / 9), ((7, 7), 0.5), ((6, 10), 0.3), ((2, 5, 7), 0.5)],
)
def test_grid_is_unbiased_exactly(layout, r):
    """The grid pattern shifted by every offset of the torus covers each position the same number
    of times, so a uniformly drawn offset keeps each with probability exactly n_keep / n."""
    from sbp_kernels.sampling import grid_pattern

    dims = tuple(d for d in layout if d > 1)
    n = math.prod(dims)
    pattern = grid_pattern(dims, r, keep_count(n, r))
    assert len(pattern) == keep_count(n, r) and len(set(pattern.tolist())) == len(pattern)
    coords = torch.stack(torch.unravel_index(pattern, dims))
    counts = torch.zeros(n)
    for offset in torch.cartesian_prod(*[torch.arange(d) for d in dims]).reshape(-1, len(dims)):
        shifted = (coords + offset[:, None]) % torch.tensor(dims)[:, None]
        flat = torch.zeros_like(pattern)
        for axis, size in enumerate(dims):
            flat = flat * size + shifted[axis]
        counts[flat] += 1
    assert (counts == len(pattern)).all()


@pytest.mark.parametrize("layout, r", [((3, 3), 0.25), ((7, 7), 0.25), ((5, 7), 0.5), ((14, 14), 1 / 9)])
def test_grid_frequencies_resolve_one_percent(layout, r):
    """The issue's cases, measured: 20000 draws resolve 1% (binomial sd <= 0.35%)."""
    n = math.prod(layout)
    target = keep_count(n, r) / n
    g = gen(7)
    counts = torch.zeros(n)
    for _ in range(20000):
        counts[sample_keep_indices(layout, r, generator=g)] += 1
    freq = counts / 20000
    assert (freq - target).abs().max() < 0.01, (freq.min(), freq.max(), target)


def test_grid_lattices_where_the_layout_divides():
    g = gen(4)
    for _ in range(20):
        idx = sample_keep_indices((14, 14), 0.5, generator=g)
        y, x = idx // 14, idx % 14
        assert len(idx) == 98 and len(((y + x) % 2).unique()) == 1  # a checkerboard
    test_grid_quarter_is_lattice()


def test_keep_sets_never_touch_the_global_generator():
    """Drawing keep sets leaves the global RNG where it was; the package generator follows
    torch.manual_seed (same seed, same keep sets) until sbp_kernels.manual_seed is called."""
    import sbp_kernels
    from sbp_kernels import sampling

    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = [sample_keep_indices((14, 14), 0.25) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12)  # another seed: another stream
    other = [sample_keep_indices((14, 14), 0.25) for _ in range(3)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    torch.manual_seed(11)  # the seed changed back: the stream starts again
    again = [sample_keep_indices((14, 14), 0.25) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    try:
        sbp_kernels.manual_seed(3)
        a = sample_keep_indices((64,), 0.5, "random")
        torch.manual_seed(99)  # no longer followed
        sbp_kernels.manual_seed(3)
        assert torch.equal(sample_keep_indices((64,), 0.5, "random"), a)
        with pytest.raises(TypeError, match="seed"):
            sbp_kernels.manual_seed(1.5)
    finally:
        sampling._package_generator.follows = None  # back to following torch.manual_seed


def test_windowed_keep_sets_repeat_in_every_window():
    from sbp_kernels.sampling import Windowed, sample_windowed

    idx = sample_windowed(Windowed((14, 21), (7, 7)), 0.5, generator=gen(2))
    mask = torch.zeros(14, 21, dtype=torch.bool)
    mask.view(-1)[idx] = True
    windows = mask.view(2, 7, 3, 7).permute(0, 2, 1, 3).reshape(6, 7, 7)
    assert (windows == windows[0]).all() and int(windows[0].sum()) == keep_count(49, 0.5)
    with pytest.raises(ValueError, match="tile"):
        sample_windowed(Windowed((10, 10), (7, 7)), 0.5)
