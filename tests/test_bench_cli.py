"""The benchmark CLI (sbp_kernels.bench.cli) runs in-process and writes what it promises."""
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


def test_quick_linear_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    png = tmp_path / "bench.png"
    argv = FAST + ["--ops", "linear", "--json", str(out), "--markdown", str(md)]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(png)]
    except ImportError:
        png = None
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
    "argv", [["--ops", "nope"], ["--backends", "cudnn"], ["--dtype", "int8"], ["--ratios", "0"], ["--repeats", "0"]]
)
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
