"""The offline Hopper compile report (sbp_kernels/kernel_report.py, DESIGN.md 6).

The report compiles real kernels for sm_90 with the ptxas Triton ships, which needs the compiled
(not the interpreted) kernel objects, so it runs in one subprocess without TRITON_INTERPRET; the
tests read what that run printed and wrote. In it:
- the report proper, with --check, on one layer (ViT-B's attention projection: the gathered
  weight GEMM with split-K, its split sum, the dx GEMM) and the CUDA sources;
- the report, with --check, on Llama-3.2-1B's LM head + loss (the loss's forward and backward);
- the gate on deliberately bad weight-GEMM configs (2 warps: mma.sync; one stage: no pipelining;
  256 x 256 x 128 tiles: too much shared memory) and on too few splits (the split-K target
  lowered to 16 multiprocessors);
- the TTGIR analysis of a kernel that sums a dot operand in registers: Triton 3.x then gives the
  operand's shared-memory buffer one slot too few, so the next cp.async overwrites a tile that an
  in-flight wgmma still reads (the race the weight GEMM's bias used to cause).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, pathlib, sys
    import torch, triton, triton.language as tl
    from sbp_kernels import kernel_report as kr
    from sbp_kernels.triton import gemm

    out = sys.argv[1]
    kr.CUDA_SOURCES = pathlib.Path(sys.argv[2])  # the checkout's (an installed package has no csrc/)
    results = {"report": kr.main(["--only", "ViT-B proj|csrc", "--arch", "90", "--jobs", "1", "--check",
                                  "--json", out + "/report.json"])}
    results["lm_head"] = kr.main(["--only", "Llama-3.2-1B lm head", "--arch", "90", "--jobs", "1", "--check",
                                  "--json", out + "/lm_head.json"])

    def config(bm, bn, bk, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                             num_stages=stages)

    t = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")
    keep = t(99, dtype=torch.int64)
    kr.cases = lambda: [("proj dW", lambda: gemm.weight_gemm(t(64, 99, 768), t(64, 197, 768), t(768, 768), t(768),
                                                             keep, gather_b=True))]
    good = gemm._weight_gemm_kernel.configs[:1]
    gemm._weight_gemm_kernel.configs[:] = good + [config(64, 32, 32, 2, 3), config(128, 128, 64, 8, 1),
                                                  config(256, 256, 128, 8, 4)]
    gate = ["--only", "proj dW", "--arch", "90", "--jobs", "1", "--check", "--json"]
    results["bad_configs"] = kr.main(gate + [out + "/bad.json"])
    gemm._weight_gemm_kernel.configs[:] = good
    gemm.HOPPER_SMS = 16  # splits for a 16-SM GPU: too few programs for 132
    results["few_splits"] = kr.main(gate + [out + "/few.json"])

    @triton.jit
    def summed_dot(a_ptr, b_ptr, c_ptr, s_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        row_sums = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + (k + offs)[None, :])
            b = tl.load(b_ptr + (k + offs)[:, None] * BLOCK + offs[None, :])
            row_sums += tl.sum(a.to(tl.float32), axis=1)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)
        tl.store(s_ptr + offs, row_sums)

    args = (t(64, 4096), t(4096, 64), t(64, 64, dtype=torch.float32), t(64, dtype=torch.float32), 4096)
    launch = kr.Launch("race", None, summed_dot, (1,), args, dict(BLOCK=64, num_warps=4, num_stages=3))
    results["race"] = kr.compile_variant(launch, None, 90)
    json.dump(results, open(out + "/results.json", "w"))
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    (out / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sources = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    done = subprocess.run([sys.executable, str(out / "script.py"), str(out), str(sources)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {name: json.loads((out / f"{name}.json").read_text())["rows"]
            for name in ("report", "lm_head", "bad", "few")}
    return results, rows, done.stdout


def test_gate_passes_on_the_package_kernels(run):
    """ViT-B proj: every config of the gathered weight GEMM compiles for sm_90 without spills, on
    wgmma, pipelined (buffers of 3+ slots, cp.async waits that keep copies in flight) and with at
    least a wave of programs thanks to split-K."""
    results, rows, stdout = run
    assert results["report"] == 0, stdout
    triton_rows = [r for r in rows["report"] if r["config"] != "nvcc"]
    assert {r["kernel"] for r in triton_rows} == {"weight_gemm[B_IDX,HAS_BIAS]", "split_sum[HAS_BIAS]",
                                                  "row_gemm[A_IDX,C_IDX]"}
    for row in triton_rows:
        assert row["arch"] == 90 and 0 < row["regs"] <= 255 and row["spill"] == 0 and not row["problems"], row
        assert 0 < row["smem"] <= 227 * 1024
        if row["kernel"] != "split_sum[HAS_BIAS]":
            assert row["dots"] and all(engine == "wgmma" and dtype == "bf16" for engine, dtype in row["dots"])
            (loop,) = row["loops"]
            assert loop["pipelined"] and loop["races"] == 0 and loop["register_tiles"] == 0
            assert min(slots for slots, _ in loop["buffers"]) >= 3 and min(loop["async_waits"]) >= 2
    weight = [r for r in triton_rows if r["weight_gemm"]]
    assert len(weight) == 4 and all(r["programs"] >= 132 for r in weight)
    assert "0 failing the gate" in stdout


def test_gate_passes_on_the_lm_head_and_loss(run):
    """Llama-3.2-1B's head + loss (vocab 128256, 4 x 2048 tokens, r = 0.5): the forward's flattened
    (vocab tile, K step) loop and the backward's three kernels are pipelined wgmma loops; the weight
    gradient of every vocabulary chunk fills a wave; the 16 chunks' repeated launches are one row each."""
    results, rows, stdout = run
    assert results["lm_head"] == 0, stdout
    lm_head = rows["lm_head"]
    assert {r["kernel"] for r in lm_head} == {"lse", "dlogits", "weight_gemm", "dh", "dh[ACC_IN]",
                                               "dh[ACC_IN,C_IDX]"}
    for row in lm_head:
        assert row["spill"] == 0 and not row["problems"] and 0 < row["smem"] <= 227 * 1024, row
        assert row["dots"] and all(engine == "wgmma" and dtype == "bf16" for engine, dtype in row["dots"])
        (loop,) = row["loops"]
        assert loop["pipelined"] and min(slots for slots, _ in loop["buffers"]) >= 3
    # per config: dlogits and weight_gemm of a full chunk (8192 classes) and of the last (5376)
    assert sorted(r["programs"] for r in lm_head if r["weight_gemm"] and r["config"] == "128x128x64 w8 s3") \
        == [672, 1024]
    assert all(r["programs"] >= 132 for r in lm_head if r["weight_gemm"])
    assert len(lm_head) == 4 * 8  # 4 configs of: lse, dlogits x 2, weight_gemm x 2, dh x 3


def test_cuda_sources_parsed(run):
    """nvcc -Xptxas -v rows: one per kernel instantiation, demangled, registers and no spills."""
    _, rows, _ = run
    cuda = [r for r in rows["report"] if r["config"] == "nvcc"]
    if not cuda:
        pytest.skip("nvcc not found")
    assert all(r["regs"] > 0 and r["spill"] == 0 and "(" not in r["kernel"] for r in cuda)
    assert any(r["kernel"].startswith("copy_rows_kernel<") for r in cuda)


def test_gate_fails_on_bad_configs(run):
    results, rows, stdout = run
    assert results["bad_configs"] == 1
    problems = {r["config"]: " ".join(r["problems"]) for r in rows["bad"] if r["weight_gemm"]}
    assert problems["128x128x64 w8 s3"] == ""
    assert "not on wgmma" in problems["64x32x32 w2 s3"]
    assert "not pipelined" in problems["128x128x64 w8 s1"]
    assert "shared memory" in problems["256x256x128 w8 s4"]
    assert results["few_splits"] == 1
    assert all("programs < 132" in " ".join(r["problems"]) for r in rows["few"] if r["weight_gemm"])


def test_race_found_in_real_ttgir(run):
    """A dot operand also summed in registers: 2 slots filled 2 iterations ahead while wgmma
    waits leave one product in flight."""
    race = run[0]["race"]
    (loop,) = race["loops"]
    assert race["dots"] == [["wgmma", "bf16"]]
    assert loop["races"] == 1 and not loop["pipelined"] and loop["wgmma_waits"] == [1]
    assert [2, 2] in loop["buffers"]  # [slots, copies issued before the loop]


def test_parse_ptxas_and_nvcc_logs():
    from sbp_kernels import kernel_report

    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n")
    assert kernel_report.parse_ptxas(log) == {"regs": 168, "stack": 16, "spill": 20}
    (row,) = kernel_report.parse_nvcc(log)
    assert row["smem"] == 2048 and row["regs"] == 168 and row["kernel"].startswith("foo")


def test_target_cases_cover_the_models():
    from sbp_kernels import kernel_report

    names = [name for name, _ in kernel_report.cases()]
    assert {"ViT-B qkv", "ViT-B mlp", "ViT-B attention", "ConvNeXt-T s4 mlp", "Llama-3-8B down",
            "Llama-3-8B attention padded", "Llama-3.2-1B lm head + loss", "Llama-3-8B lm head + loss"} \
        <= set(names)
    assert torch.bfloat16 == kernel_report.DTYPE
