"""One step, one keep set (DESIGN.md section 2): sbp_kernels.step and keepset.keep_idx_for."""
import pytest
import torch

import sbp_kernels
from sbp_kernels import keepset


def test_same_position_count_shares_one_set_inside_a_step():
    with sbp_kernels.step(keep_ratio=0.5):
        a = keepset.keep_idx_for(64, "cpu", 0.25)
        b = keepset.keep_idx_for(64, "cpu", 0.25)
        c = keepset.keep_idx_for(16, "cpu", 0.25)
    assert a is b and a.numel() == 32  # the step's ratio overrides the module's
    assert c.numel() == 8
    assert keepset.current() is None


def test_outside_a_step_every_call_draws_afresh():
    draws = {tuple(keepset.keep_idx_for(64, "cpu", 0.5, "random").tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_class_token_is_always_kept_with_a_patch_layout():
    for seed in range(10):
        with sbp_kernels.step(layout=(14, 14), generator=torch.Generator().manual_seed(seed)):
            keep = keepset.keep_idx_for(197, "cpu", 0.25)
        assert keep[0] == 0 and keep.numel() == 1 + 49
        patches = (keep[1:] - 1).view(7, 7)  # one of every 2x2 cell, the same offset in each
        rows, cols = patches // 14, patches % 14
        assert (rows % 2 == rows[0, 0] % 2).all() and (cols % 2 == cols[0, 0] % 2).all()


def test_step_layout_only_serves_matching_position_counts():
    with sbp_kernels.step(layout=(14, 14)):
        other_stage = keepset.keep_idx_for(56 * 56, "cpu", 0.5)  # not 2940 "prefix" tokens
    assert other_stage.numel() == 56 * 56 // 2 and other_stage[0] < 2


def test_module_layout_takes_precedence():
    with sbp_kernels.step(keep_ratio=0.5):
        keep = keepset.keep_idx_for(16, "cpu", 0.5, layout=(4, 4))
    y, x = keep // 4, keep % 4
    assert ((y + x) % 2 == (y[0] + x[0]) % 2).all()  # a checkerboard of the 4x4 map, not stripes


def test_fixed_indices_and_their_validation():
    with sbp_kernels.step(keep_idx=torch.tensor([1, 5])):
        assert keepset.keep_idx_for(8, "cpu", 0.5).tolist() == [1, 5]
    with sbp_kernels.step(keep_idx=torch.tensor([1, 9])):
        with pytest.raises(ValueError, match="keep_idx values"):
            keepset.keep_idx_for(8, "cpu", 0.5)


def test_steps_nest_and_unwind_on_error():
    with pytest.raises(RuntimeError):
        with sbp_kernels.step(keep_idx=torch.tensor([0])):
            with sbp_kernels.step(keep_idx=torch.tensor([1])):
                assert keepset.keep_idx_for(4, "cpu", 0.5).tolist() == [1]
            assert keepset.keep_idx_for(4, "cpu", 0.5).tolist() == [0]
            raise RuntimeError
    assert keepset.current() is None


def test_a_steps_keep_sets_do_not_depend_on_who_asks_first():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with sbp_kernels.step(generator=g1):
        a64, a16 = keepset.keep_idx_for(64, "cpu", 0.5), keepset.keep_idx_for(16, "cpu", 0.5)
    with sbp_kernels.step(generator=g2):
        b16, b64 = keepset.keep_idx_for(16, "cpu", 0.5), keepset.keep_idx_for(64, "cpu", 0.5)
    assert torch.equal(a64, b64) and torch.equal(a16, b16)


def test_fixed_keep_sets_per_position_count_are_private_copies():
    keep16, keep4 = torch.tensor([1, 5, 9]), torch.tensor([0, 2])
    with sbp_kernels.step(keep_idx={16: keep16, 4: keep4}):
        keep16[0] = 7  # a write after the step opened does not reach it
        assert keepset.keep_idx_for(16, "cpu", 0.5).tolist() == [1, 5, 9]
        assert keepset.keep_idx_for(4, "cpu", 0.5).tolist() == [0, 2]
        with pytest.raises(ValueError, match="n=8"):
            keepset.keep_idx_for(8, "cpu", 0.5)
    with pytest.raises(ValueError, match="keep_idx keys"):
        sbp_kernels.step(keep_idx={0: keep4}).__enter__()


def test_always_kept_positions_join_every_drawn_set():
    for seed in range(10):
        with sbp_kernels.step(always_keep=(0, -1), generator=torch.Generator().manual_seed(seed)):
            keep = keepset.keep_idx_for(20, "cpu", 0.25)
        assert keep[0] == 0 and keep[-1] == 19 and keep.unique().numel() == keep.numel()


def test_one_gather_per_tensor_and_keep_set_in_a_step():
    x = torch.randn(2, 10, 4)
    keep = torch.tensor([1, 4, 6])
    calls = []

    def gather(t, idx, dim):
        calls.append(1)
        return t.index_select(dim, idx)

    with sbp_kernels.step() as s:
        a = s.gather(x, keep, 1, gather)
        assert s.gather(x, keep, 1, gather) is a  # the same tensor again
        b = s.gather(x.view(2, 10, 4), keep, 1, gather)  # the same view of the same buffer
        x.add_(1)  # changed in place: gathered again
        c = s.gather(x, keep, 1, gather)
        assert s.gather(x, keep, 1, gather) is c and s.gather(x.view(2, 10, 4), keep, 1, gather) is c
        other_keep = s.gather(x, keep.clone(), 1, gather)  # another keep set
        other_dim = s.gather(x, torch.tensor([0, 3]), 2, gather)
    assert a is b and c is not a and len(calls) == 4
    assert torch.equal(c, x[:, keep]) and torch.equal(other_keep, c) and other_keep is not c
    assert torch.equal(other_dim, x[:, :, [0, 3]])
    with sbp_kernels.step() as s:  # `.data =` swaps the data of the same object, with the same version
        first = s.gather(x, keep, 1, gather)
        x.data = torch.randn(2, 10, 3)
        assert s.gather(x, keep, 1, gather).shape == (2, 3, 3) and first.shape == (2, 3, 4)


def test_auto_strategy_is_a_grid_over_a_layout_and_random_over_a_plain_sequence():
    """convert's default strategy "auto": a grid where the positions have a layout; over a plain
    token sequence uniformly at random, where a grid at r = 1/2 would never keep a token together
    with the one before it (over many steps, every pair of neighbours is kept together)."""
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(keepset.draw(17, 0.5, "auto", (4, 4), gen()), keepset.draw(17, 0.5, "grid", (4, 4), gen()))
    assert torch.equal(keepset.draw(64, 0.5, "auto", None, gen()),
                       sbp_kernels.sample_keep_indices((64,), 0.5, "random", gen()))
    together = torch.zeros(63, dtype=torch.bool)
    grid_together = torch.zeros(63, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        for strategy, seen in (("auto", together), ("grid", grid_together)):
            kept = torch.zeros(64, dtype=torch.bool)
            kept[keepset.draw(64, 0.5, strategy, None, generator)] = True
            seen |= kept[1:] & kept[:-1]
    assert together.all() and not grid_together.any()
    assert sbp_kernels.convert(torch.nn.Linear(4, 4)).strategy == "auto"


def test_a_compiled_step_reads_no_keep_set_values(monkeypatch):
    """A compiled converted model runs its ops' kernels with the step's keep sets as graph inputs:
    their value checks trust them as the package's own and read nothing (on a GPU each read is a
    copy to the host and a wait for the device); the step reads the caller's keep set once, when
    it opens. A caller's keep_idx given to a public op inside a compiled function is still read at
    every call, and a bad one still raises."""
    from sbp_kernels import validation

    reads = []
    check_values = validation.check_values
    monkeypatch.setattr(validation, "check_values", lambda *args: reads.append(args) or check_values(*args))
    model = sbp_kernels.convert(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 8)
    for seed in range(3):
        keep = keepset.draw(6, 0.5, "random", None, torch.Generator().manual_seed(seed))
        with sbp_kernels.step(keep_idx=keep):
            compiled(x).sum().backward()
    with sbp_kernels.step():  # eagerly, with a drawn keep set
        model(x).sum().backward()
    assert reads == []
    w = torch.randn(8, 8, requires_grad=True)
    linear = torch.compile(lambda x, k: sbp_kernels.linear(x, w, None, k), backend="aot_eager", fullgraph=True)
    linear(x, torch.tensor([0, 2, 4]))
    assert len(reads) == 1
    with pytest.raises(ValueError, match="sorted in increasing order"):
        linear(x, torch.tensor([4, 2, 0]))


def test_a_trusted_keep_set_is_still_checked_for_fewer_positions():
    with sbp_kernels.step(keep_idx=torch.tensor([0, 3, 7])) as s:
        assert s.get(8, torch.device("cpu"), 0.5).tolist() == [0, 3, 7]
        with pytest.raises(ValueError, match=r"values must lie in \[0, 6\)"):
            s.get(6, torch.device("cpu"), 0.5)


def test_public_calls_read_the_package_keep_sets_too():
    """Only the ops' kernels pass a trusted keep set unread, and only while it is unchanged: a
    step's keep set changed in place, by any means, is caught at a public call, and at a kernel
    call when its version moved."""
    x, w = torch.randn(2, 8, 4, requires_grad=True), torch.randn(3, 4)
    with sbp_kernels.step(keep_idx=torch.tensor([0, 3, 7])) as s:
        keep = s.get(8, torch.device("cpu"), 0.5)
        keep.numpy()[:] = [7, 3, 3]  # no new version
        with pytest.raises(ValueError, match="sorted in increasing order"):
            sbp_kernels.linear(x, w, None, keep)
        with pytest.raises(ValueError, match="sorted in increasing order"):
            sbp_kernels.convert(torch.nn.Linear(4, 3))(x, keep_idx=keep)
    with sbp_kernels.step() as s:
        drawn = s.get(8, torch.device("cpu"), 0.5)
        drawn.add_(100)
        with pytest.raises(ValueError, match=r"values must lie in \[0, 8\)"):
            sbp_kernels.linear(x, w, None, drawn)
        with pytest.raises(ValueError, match=r"values must lie in \[0, 8\)"):
            torch.ops.sbp.linear(x, w, None, drawn)


def test_a_fixed_keep_set_moves_to_another_device_in_a_fake_step():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        with sbp_kernels.step(keep_idx=torch.tensor([0, 3, 7])) as s:
            keep = s.get(8, torch.device("meta"), 0.5)
    assert keep.device.type == "meta" and keep.shape == (3,)
