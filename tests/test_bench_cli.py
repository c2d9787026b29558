"""The benchmark CLI (sbp_kernels.bench.cli) runs in-process and writes what it promises."""
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from sbp_kernels.bench import cases as bench_cases
from sbp_kernels.bench import cli

FIELDS = (
    "op", "case", "kind", "backend", "keep_ratio", "n_keep", "dtype", "shape", "device", "fwd_ms",
    "bwd_ms", "saved_bytes", "saved_bytes_with_params", "peak_bytes", "fwd_ratio", "bwd_ratio",
    "saved_ratio", "peak_ratio", "check", "error",
)  # fmt: skip
FAST = ["--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0"]


def _with_plot(argv, png):
    """argv asking for the plot `png` too, and png; without matplotlib, argv as it is and None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return argv, None
    return argv + ["--plot", str(png)], png


def test_quick_linear_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    png = tmp_path / "bench.png"
    argv, png = _with_plot(FAST + ["--ops", "linear", "--json", str(out), "--markdown", str(md)], png)
    assert cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert records and all(set(FIELDS) <= set(r) for r in records)
    assert {r["op"] for r in records} == {"linear"}
    assert {r["device_type"] for r in records} == {"cpu"}
    # tests/conftest.py sets TRITON_INTERPRET=1 on CPU: the CLI must still not time Triton there.
    assert "triton" not in {r["backend"] for r in records}
    for r in records:
        assert r["error"] is None, r
        assert r["dtype"] == "float32" and r["peak_bytes"] is None and r["peak_ratio"] is None
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["saved_bytes"] > 0
        if r["kind"] == "dense":
            assert r["backend"] == "dense" and r["keep_ratio"] is None
            assert r["fwd_ratio"] == r["bwd_ratio"] == r["saved_ratio"] == 1.0
        else:
            assert r["keep_ratio"] in (1.0, 0.5, 0.25)
            assert r["check"] == "reference" or r["check"].startswith("ok"), r["check"]
    half = [r for r in records if r["keep_ratio"] == 0.5]
    assert half and all(r["saved_ratio"] < 0.6 for r in half)
    quarter = [r for r in records if r["keep_ratio"] == 0.25]
    assert quarter and all(r["saved_ratio"] < 0.35 for r in quarter)
    # Every case has its dense baseline and the torch backend at each r.
    for case in {r["case"] for r in records}:
        mine = [(r["backend"], r["keep_ratio"]) for r in records if r["case"] == case]
        assert ("dense", None) in mine and {("torch", k) for k in (1.0, 0.5, 0.25)} <= set(mine)
    text = md.read_text()
    assert "torch " + torch.__version__ in text and "| op | case | backend |" in text
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "saved x" in capsys.readouterr().out


def test_attention_is_skipped_with_a_note_while_it_does_not_import(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_cases, "_attention", (None, "sbp_kernels.ops.attention does not import (test)"))
    out = tmp_path / "bench.json"
    assert cli.main(FAST + ["--ops", "attention,block", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    printed = capsys.readouterr().out
    assert "note: attention, block: skipped: sbp_kernels.ops.attention does not import (test)" in printed


def test_a_wrong_backward_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    def build(device, dtype, gen):
        x = torch.randn(2, 8, 4, device=device, generator=gen).requires_grad_()
        w = torch.randn(3, 4, device=device, generator=gen).requires_grad_()
        def wrong(keep, backend):  # the right output with twice the right gradient
            return F.linear(x, w) * 2 - F.linear(x, w).detach()

        return bench_cases.Workload([x], [w], lambda: F.linear(x, w), wrong)

    case = bench_cases.Case("linear", "broken", {}, (8,), ("linear",), build)
    monkeypatch.setattr(cli, "cases", lambda device_type, quick=False: [case])
    out = tmp_path / "bench.json"
    argv = FAST + ["--ops", "linear", "--backends", "torch", "--ratios", "1", "--json", str(out)]
    assert cli.main(argv) == 1
    (sbp,) = [r for r in json.loads(out.read_text()) if r["kind"] == "sbp"]
    assert sbp["check"].startswith("FAIL")
    assert "FAILED: linear broken torch r=1: backward check FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--ops", "nope"], ["--backends", "cudnn"], ["--dtype", "int8"], ["--ratios", "0"], ["--repeats", "0"],
        ["--ops", "llama"], ["--breakdown"], ["--simulate", "--ops", "linear"], ["--overhead", "--ops", "linear"],
        ["--overhead", "--simulate"], ["--overhead", "--repeats", "0"],
    ],
)  # fmt: skip
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


# --- whole models: ops "vit" and "convnext" ---------------------------------------------------------


def test_quick_models_write_records_and_checks(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(FAST + ["--ops", "vit,convnext", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records and all(set(FIELDS) | {"step_ms", "step_ratio", "model"} <= set(r) for r in records)
    for op, name in (("vit", "vit_base_patch16_224"), ("convnext", "convnext_tiny")):
        mine = {r["backend"]: r for r in records if r["op"] == op}
        assert list(mine) == list(cli.MODEL_VARIANTS)
        for r in mine.values():
            assert r["error"] is None, r
            assert r["kind"] == r["backend"] and r["dtype"] == "float32"
            assert r["step_ms"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] is None
            assert r["peak_bytes"] is None and r["saved_bytes"] > 0
            # timm is a test dependency: the models are timm's own, and the records say so.
            assert r["model"].startswith(f"timm {name} ("), r["model"]
        assert mine["dense"]["check"] is None and mine["dense"]["saved_ratio"] == 1.0
        for variant in cli.MODEL_VARIANTS[1:]:
            assert mine[variant]["check"].startswith("loss ok"), mine[variant]["check"]
        assert {mine[v]["keep_ratio"] for v in ("sbp", "sbp+recompute", "sbp+recompute+checkpoint", "anchor")} == {0.5}
        assert mine["checkpoint"]["keep_ratio"] is None
        saved = {variant: r["saved_bytes"] for variant, r in mine.items()}
        # SBP saves about r of what its blocks save; checkpointing saves one input per block; the
        # anchor saves r of that input per block: the least of those. The recompute mode saves the
        # kept input rows and attention outputs of its blocks (about the anchor's), and with the
        # dense blocks checkpointed less again.
        assert saved["anchor"] < saved["checkpoint"] < saved["sbp"] < saved["dense"], saved
        assert saved["sbp+recompute+checkpoint"] < saved["sbp+recompute"] < saved["sbp"], saved
        assert saved["sbp+recompute"] <= 1.1 * saved["anchor"], saved
    printed = capsys.readouterr().out
    assert "step ms" in printed and "checkpoint" in printed
    assert "note: vit: timm vit_base_patch16_224 (" in printed and "note: convnext: timm convnext_tiny (" in printed


def test_without_timm_the_models_are_the_replicas_and_convert(tmp_path, monkeypatch, capsys):
    """Where timm is not installed, the CLI builds the replicas of bench/models.py, says so, and
    convert recognises them as timm's classes (their blocks save far less than dense)."""
    from sbp_kernels.bench import models

    monkeypatch.setattr(models, "timm_available", lambda: False)
    out = tmp_path / "bench.json"
    assert cli.main(FAST + ["--ops", "vit,convnext", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    for op in ("vit", "convnext"):
        mine = {r["backend"]: r for r in records if r["op"] == op}
        assert all(r["model"].startswith("replica of timm's") for r in mine.values()), mine
        assert all(r["error"] is None for r in mine.values())
        assert mine["sbp"]["saved_ratio"] < 0.75 and mine["sbp+recompute"]["saved_ratio"] < 0.5, mine
    assert isinstance(models.vit(3, 64, 2, 32, 8, 10), models.VisionTransformer)
    assert "note: vit: replica of timm's vit_base_patch16_224" in capsys.readouterr().out


def test_a_wrong_model_forward_is_reported(tmp_path, monkeypatch, capsys):
    real = cli.model_variant

    def broken(work, variant):
        model = real(work, variant)
        if variant == "anchor":
            model.head.weight.data *= 3.0  # a different forward
        return model

    monkeypatch.setattr(cli, "model_variant", broken)
    out = tmp_path / "bench.json"
    assert cli.main(FAST + ["--ops", "vit", "--json", str(out)]) == 1
    anchor = [r for r in json.loads(out.read_text()) if r["backend"] == "anchor"]
    assert anchor[0]["check"].startswith("FAIL loss")
    assert "FAILED: vit" in capsys.readouterr().out


def _grads(fn, x, params, dy):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(fn(x), [x] + params, dy)


@pytest.fixture
def drawn(monkeypatch):
    """The keep sets AnchorSBP draws (sbp_kernels.keepset.draw), in order."""
    from sbp_kernels import keepset

    got = []
    real = keepset.draw

    def draw(*args, **kwargs):
        got.append(real(*args, **kwargs))
        return got[-1]

    monkeypatch.setattr(keepset, "draw", draw)
    return got


@pytest.mark.parametrize("residual", [True, False])
def test_anchor_wrapper_at_r1_is_the_dense_block(residual):
    from sbp_kernels.bench.models import AnchorSBP, Block, ConvNeXtBlock

    torch.manual_seed(0)
    for block, x, dim, layout in (
        (Block(32, 4), torch.randn(2, 17, 32), 1, (4, 4)),
        (ConvNeXtBlock(8), torch.randn(2, 8, 6, 6), 2, None),
    ):
        params = list(block.parameters())
        dy = torch.randn_like(block(x))
        want = _grads(block, x, params, dy)
        got = _grads(AnchorSBP(block, 1.0, dim, layout, residual=residual), x, params, dy)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_anchor_wrapper_at_r_half(drawn):
    """What the papers' way computes at r < 1. Forward: exactly the block's. Backward: the block's
    gradients on the kept rows ALONE (a ViT block re-attends among kept tokens only), so:
    - parameter gradients = dense gradients of block(x[kept]) for dy[kept];
    - input gradient = that on kept rows; on dropped rows dy (residual=True: the shortcut) or 0.
    Only for a token-wise block (no mixing of rows, e.g. an Mlp) are these also the dense block's
    gradients with dy zeroed on the dropped rows; for a residual block with attention they are not."""
    from sbp_kernels.bench.models import AnchorSBP, Block, Mlp

    torch.manual_seed(0)
    block = Block(32, 4)
    params = list(block.parameters())
    x = torch.randn(2, 17, 32)  # class token + a 4 x 4 grid
    dy = torch.randn(2, 17, 32)
    for residual in (True, False):
        anchor = AnchorSBP(block, 0.5, 1, (4, 4), residual=residual)
        xg = x.clone().requires_grad_()
        y = anchor(xg)
        torch.testing.assert_close(y, block(x))
        got = torch.autograd.grad(y, [xg] + params, dy)
        idx = drawn[-1]
        assert 0 in idx.tolist() and len(idx) == 1 + 8  # the class token and half of the grid
        dropped = [i for i in range(17) if i not in idx.tolist()]
        want = _grads(block, x[:, idx], params, dy[:, idx])
        torch.testing.assert_close(got[0][:, idx], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0][:, dropped], dy[:, dropped] if residual else torch.zeros_like(dy[:, dropped]))
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # Not the dense block's gradients with dy zeroed on dropped tokens (attention mixes tokens):
    mask = torch.zeros(1, 17, 1)
    mask[:, idx] = 1
    dense_masked = _grads(block, x, params, dy * mask)
    qkv = 1 + next(i for i, p in enumerate(params) if p is block.attn.qkv.weight)
    assert not torch.allclose(got[qkv], dense_masked[qkv], atol=1e-5)

    # A token-wise block: exactly the dense gradients with dy zeroed on the dropped rows.
    mlp = Mlp(32, 64)
    mparams = list(mlp.parameters())
    got = _grads(AnchorSBP(mlp, 0.5, 1, (4, 4), residual=False), x, mparams, dy)
    mask = torch.zeros(1, 17, 1)
    mask[:, drawn[-1]] = 1
    want = _grads(mlp, x, mparams, dy * mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --- simulated steps (--simulate; sbp_kernels/bench/simulate.py, tests/test_simulate.py) -------------

SIM_FIELDS = (
    "op", "case", "variant", "kind", "keep_ratio", "model", "shape", "dtype", "device", "quick", "peak_bytes",
    "held_bytes", "saved_bytes", "flops", "peak_ratio", "held_ratio", "saved_ratio", "flops_ratio", "breakdown", "error",
)  # fmt: skip


def test_simulate_quick_writes_json_markdown_and_pareto_plot(tmp_path, capsys):
    out, md, png = tmp_path / "sim.json", tmp_path / "sim.md", tmp_path / "sim.png"
    argv, png = _with_plot(
        ["--simulate", "--quick", "--ops", "vit", "--breakdown", "--json", str(out), "--markdown", str(md)], png
    )
    assert cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == [
        "dense", "sbp", "sbp+recompute", "sbp+recompute+checkpoint", "checkpoint", "checkpoint (all)", "anchor",
    ]  # fmt: skip
    by = {r["variant"]: r for r in records}
    for r in records:
        assert set(SIM_FIELDS) <= set(r) and r["error"] is None, r
        assert r["op"] == "vit" and r["kind"] == "simulated" and r["quick"] is True
        assert r["model"].startswith("timm vit_base_patch16_224 (")
        assert r["peak_bytes"] > 0 and r["peak_bytes"] % 512 == 0 and r["flops"] > 0
        assert r["breakdown"] and sum(b for _, b in r["breakdown"]) <= r["peak_bytes"]
    assert by["dense"]["peak_ratio"] == by["dense"]["flops_ratio"] == 1.0
    # What each variant keeps for backward (held) and recomputes (FLOPs), in the order they must be.
    held = {v: r["held_ratio"] for v, r in by.items()}
    assert held["sbp+recompute+checkpoint"] < held["sbp+recompute"] < held["sbp"] < 1.0, held
    assert held["checkpoint (all)"] < held["checkpoint"] < 1.0, held
    flops = {v: r["flops_ratio"] for v, r in by.items()}
    assert flops["sbp"] < flops["sbp+recompute"] < 1.0 < flops["checkpoint"] < flops["checkpoint (all)"], flops
    printed = capsys.readouterr().out
    assert "peak x" in printed and "FLOPs x" in printed and "note: vit: timm vit_base_patch16_224 (" in printed
    assert "at the peak of vit" in printed  # --breakdown
    assert "note: target" not in printed  # the targets are for full shapes
    text = md.read_text()
    assert "| op | case | variant |" in text and "torch " + torch.__version__ in text
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    from sbp_kernels.bench.report import pareto

    points = [(1.0, 1.0), (0.8, 0.6), (0.9, 0.5), (1.2, 0.2), (1.3, 0.3), (0.9, 0.7)]
    assert sorted(pareto(points)) == [(0.8, 0.6), (0.9, 0.5), (1.2, 0.2)]


# --- host overhead (--overhead; sbp_kernels/bench/overhead.py) -----------------------------------------


def test_overhead_quick_writes_every_row_and_the_table(tmp_path, monkeypatch, capsys, request):
    """Every row with its target, in seconds: 2 repeats, the ViT cut to one block and compiled with
    aot_eager (inductor's C++ build alone takes tens of seconds). Times are wall-clock on a shared
    machine: no ratio is asserted."""
    from sbp_kernels.bench import overhead

    request.addfinalizer(torch._dynamo.reset)  # no compiled code of these models left for later tests

    monkeypatch.setitem(overhead.VIT, "depth", 1)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    threads = torch.get_num_threads()
    out = tmp_path / "overhead.json"
    assert cli.main(["--overhead", "--quick", "--repeats", "2", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # set to 1 for the run only
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["quick"] is True and result["torch_version"] == torch.__version__
    rows = result["rows"]
    assert [r["name"] for r in rows] == [row[0] for row in overhead.ROWS]
    # The targets of issue 14 item 3 (and item 2's compiled step); the forward rows are reported only.
    assert [r["target"] for r in rows] == [1.5, None, 2.0, None, 1.5, 1.25, 1.15]
    for r in rows:
        assert r["dense_us"] > 0 and r["sbp_us"] > 0 and r["repeats"] == 2, r
        assert r["ratio"] == pytest.approx(r["sbp_us"] / r["dense_us"])
        assert r["met"] == (None if r["target"] is None else r["ratio"] <= r["target"])
        assert r["note"] is None, r  # nothing compiled while timed
    printed = capsys.readouterr().out
    assert "| call | dense us | sbp us | ratio | target | met |" in printed
    assert all(f"| {r['name']} |" in printed for r in rows)


def test_overhead_missed_target_is_printed_not_a_failure(tmp_path, monkeypatch, capsys):
    from sbp_kernels.bench import overhead

    def build():
        return (lambda: None), (lambda: None)

    monkeypatch.setattr(overhead, "ROWS", (("no-op / no-op", 0.0, (3, 3), 0, build, None),))
    assert cli.main(["--overhead", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| no-op / no-op |" in printed and "| <= 0 | NO |" in printed  # times are positive: missed
    assert "note: target MISSED: no-op / no-op:" in printed and "not a failure" in printed
