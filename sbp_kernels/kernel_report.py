"""Offline compile report of the package's kernels for Hopper (DESIGN.md 6), no GPU needed.

    python -m sbp_kernels.kernel_report [--json PATH] [--arch 90 80] [--check] [--only REGEX] [--jobs N]

Replays the host code of every Triton launch the package makes in the backward (and the
attention forward) of a ViT-B block, the MLPs of ConvNeXt-T's four stages and a Llama-3-8B layer,
and in the forward and backward of the LM head + loss of Llama-3.2-1B and Llama-3-8B, bf16, keep
ratio 0.5, on meta tensors: the launches are recorded instead of run, so the report sees exactly
the kernels, constexprs, strides and grids the package would launch (a launch repeated with the
same specialization and grid, as the chunks of the loss's backward are, is one row). Each launch is
then compiled ahead of time for every autotune config and each architecture (Triton's
`GPUTarget("cuda", arch, ...)` and the ptxas its wheel ships), and the CUDA sources in csrc/cuda
with `nvcc -Xptxas -v`. Per variant it reports: registers, spill bytes, shared memory, the engine
of each matrix product (wgmma / mma.sync / fma), the main loop's pipelining read from the TTGIR
(shared-memory buffers per pipelined operand, the cp.async wait depth inside the loop, wgmma
waits) and the programs of the grid in waves on an H100 / H200's 132 multiprocessors.

--check exits 1 when an sm_90 variant has: a compile error; any spill; shared memory above
227 KiB; a bf16 / fp16 product not on wgmma; a main loop that is not software-pipelined (a
buffer with one slot, a cp.async wait for everything inside the loop, a tile loaded into
registers and used in the same iteration, or a cp.async into a buffer slot that an in-flight
wgmma still reads); a weight-gradient GEMM with fewer programs than multiprocessors. The same
findings on sm_80 are printed as advice (the gate is Hopper's, DESIGN.md 6).
Compiles go to a fresh temporary Triton cache, so nothing carries over between runs.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

SMS = 132  # multiprocessors of an H100 SXM / H200
SMEM_LIMIT = 227 * 1024  # shared memory a block may use on sm_90
KEEP_RATIO = 0.5
DTYPE = torch.bfloat16
CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


# ------------------------------------------------------------------------------------------------
# the launches: the package's host code on meta tensors


def _t(*shape, dtype=DTYPE):
    return torch.empty(shape, dtype=dtype, device="meta")


def _keep(n):
    return _t(max(1, round(KEEP_RATIO * n)), dtype=torch.int64)


def _linear(batch, n, c_in, c_out, bias):
    from .triton import linear

    keep = _keep(n)
    x_kept, grad_out = _t(batch, keep.shape[0], c_in), _t(batch, n, c_out)
    return lambda: linear.kept_rows_backward_kernels(
        grad_out, x_kept, _t(c_out, c_in), keep, 1.0, False, True, True, bias
    )


def _mlp(batch, n, c_in, hidden):
    from .triton import mlp

    keep = _keep(n)
    n_keep = keep.shape[0]
    args = (_t(batch, n, c_in), _t(batch, n_keep, c_in), _t(batch, n_keep, hidden), _t(hidden, c_in), _t(c_in, hidden))
    return lambda: mlp.mlp_backward_kernels(*args, keep, "gelu", 1.0, [True] * 5)


def _attention(batch, heads, kv_heads, n, d, causal, padded=False):
    from .triton import attention

    keep = _keep(n)
    n_keep = keep.shape[0]
    q, kv = _t(batch, n, heads, d).transpose(1, 2), _t(batch, n, kv_heads, d).transpose(1, 2)
    mask = _t(batch, n, dtype=torch.bool) if padded else None

    def run():
        out, lse = attention.attention_forward_kernels(q, kv, kv, causal, d**-0.5, mask)
        attention.attention_backward_kernels(
            out, _t(batch, heads, n_keep, d), _t(batch, kv_heads, n_keep, d), _t(batch, kv_heads, n_keep, d),
            _t(batch, heads, n_keep, d), _t(batch, heads, n_keep, dtype=torch.float32), keep, causal, d**-0.5, "qkv",
            1.0, mask,
        )

    return run


def _cross_entropy(batch, n, c, vocab):
    from .triton import cross_entropy

    keep = _keep(n)
    n_keep = keep.shape[0]
    weight, rows = _t(vocab, c), _t(batch, n_keep, dtype=torch.int64)

    def run():  # the LM head + loss: forward over all rows, backward of a trained head on kept rows
        cross_entropy.forward_kernels(_t(batch, n, c), weight, _t(batch, n, dtype=torch.int64), None, -100, "mean")
        cross_entropy.backward_kernels(
            _t(batch, n_keep, c), weight, None, rows, _t(batch, n_keep, dtype=torch.float32), keep,
            _t(1, dtype=torch.float32), n, -100, [True, True, False],
        )

    return run


def _gather(batch, n, c):
    from .triton import gemm

    return lambda: gemm.gather_rows(_t(batch, n, c), _keep(n), 1)


def cases():
    """(name, host code) of every target shape: ViT-B/16 at 224 px, ConvNeXt-T, a Llama-3-8B layer, the
    LM heads + losses of Llama-3.2-1B and Llama-3-8B (vocab 128256)."""
    vit = [
        ("ViT-B qkv", _linear(64, 197, 768, 2304, True)),
        ("ViT-B proj", _linear(64, 197, 768, 768, True)),
        ("ViT-B mlp", _mlp(64, 197, 768, 3072)),
        ("ViT-B attention", _attention(64, 12, 12, 197, 64, False)),
        ("ViT-B gather", _gather(64, 197, 768)),
    ]
    convnext = [(f"ConvNeXt-T s{i + 1} mlp", _mlp(64, side * side, c, 4 * c))
                for i, (c, side) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)))]
    tokens = (4, 2048)
    llama = [
        ("Llama-3-8B q/o", _linear(*tokens, 4096, 4096, False)),
        ("Llama-3-8B k/v", _linear(*tokens, 4096, 1024, False)),
        ("Llama-3-8B gate/up", _linear(*tokens, 4096, 14336, False)),
        ("Llama-3-8B down", _linear(*tokens, 14336, 4096, False)),
        ("Llama-3-8B attention", _attention(4, 32, 8, 2048, 128, True)),
        ("Llama-3-8B attention padded", _attention(4, 32, 8, 2048, 128, True, padded=True)),
        ("Llama-3.2-1B lm head + loss", _cross_entropy(*tokens, 2048, 128256)),
        ("Llama-3-8B lm head + loss", _cross_entropy(*tokens, 4096, 128256)),
    ]
    return vit + convnext + llama


class Launch(collections.namedtuple("Launch", "case autotuner fn grid args kwargs")):
    """One recorded kernel launch (autotuner None for a plain @triton.jit kernel)."""


@contextlib.contextmanager
def _recording(case, launches):
    """Kernel launches append a Launch instead of running."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def autotuned(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, self, self.fn, grid, args, kwargs))

    def plain(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, None, self, grid, args, kwargs))

    with mock.patch.object(Autotuner, "run", autotuned), mock.patch.object(JITFunction, "run", plain):
        yield


def record(only=None):
    launches = []
    for name, run in cases():
        if only is None or re.search(only, name):
            with _recording(name, launches):
                run()
    return launches


# ------------------------------------------------------------------------------------------------
# compiling a variant


def variants(launches, archs):
    """(launch, config or None, arch) for every autotune config of every launch."""
    return [(launch, config, arch) for launch in launches
            for config in (launch.autotuner.configs if launch.autotuner else [None]) for arch in archs]


def _config_kwargs(config):
    return config.all_kwargs() if config is not None else {}


_BINDERS = {}


def _compile_inputs(fn, args, kwargs, arch):
    """Triton's own binding of a launch for target sm_<arch>: (source, target, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 64)
    if (fn, arch) not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[fn, arch]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def compile_key(launch, config, arch):
    """Launches whose compiled kernels are the same (same specialization): compiled once."""
    kwargs = {**launch.kwargs, **_config_kwargs(config)}
    src, _, options = _compile_inputs(launch.fn, launch.args, kwargs, arch)
    return src.hash(), arch, repr(options)


def compile_variant(launch, config, arch):
    """Compiles one variant; returns its registers, spills, shared memory and TTGIR analysis."""
    from triton import knobs
    from triton.compiler import compile as triton_compile

    kwargs = {**launch.kwargs, **_config_kwargs(config)}
    log = io.StringIO()
    try:
        src, target, options = _compile_inputs(launch.fn, launch.args, kwargs, arch)
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton
            kernel = triton_compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # a compile error is a finding, not a crash of the report
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    return {**parse_ptxas(log.getvalue()), "smem": kernel.metadata.shared, **analyse_ttgir(kernel.asm["ttgir"])}


# ------------------------------------------------------------------------------------------------
# parsing compiler output


def parse_ptxas(log):
    """Registers, spill stores / loads and stack frame bytes of the (single) entry in a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(spills.group(1)) if spills else None,
        "spill": int(spills.group(2)) + int(spills.group(3)) if spills else None,
    }


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = ([\w.]+)")
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*? : (?:!ttg\.memdesc|tensor)<[\dx]+x(\w+),"
                  r".*-> tensor<[\dx]+x\w+, (#\w+)")
_ALLOC = re.compile(r"= ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x")
_VIEWS = ("ttg.memdesc_index", "ttg.memdesc_subview", "ttg.memdesc_trans", "ttg.memdesc_reinterpret")
_NAME = r"(%[\w.$-]+)"


def _loops(lines):
    """(header index, [body line indices]) of every scf.for, by the printer's indentation."""
    loops = []
    for i, line in enumerate(lines):
        if " scf.for " not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for j in range(i + 1, len(lines)):
            if lines[j].strip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent:
                break
            body.append(j)
        loops.append((i, body))
    return loops


def analyse_ttgir(ttgir):
    """Matrix products and main-loop pipelining of a TTGIR module.

    dots: [engine, operand dtype] per product, engine wgmma (ttng.warp_group_dot), mma (tt.dot with
    an nvidia_mma v2 result: mma.sync) or fma. loops: for every scf.for holding a product:
    - buffers: the slots of each shared-memory buffer the loop copies into or reads (the leading
      dim of its ttg.local_alloc), and the copies issued into it before the loop (how many
      iterations ahead it is filled);
    - async_waits: the cp.async wait depths inside the loop (ttg.async_wait num; 0 waits for every
      copy in flight); wgmma_waits: the wgmma wait depths (pendings);
    - register_tiles: tiles (rank >= 2) loaded into registers and used in the same iteration (a
      tile load whose only use is the loop's yield is a register prefetch and fine);
    - races: buffers that a wgmma left in flight (pendings >= 1) reads while the loop copies into
      them with too few slots (slots <= iterations ahead): the next cp.async overwrites a tile
      the wgmma still reads;
    - pipelined: copies in flight across iterations, every buffer multi-slotted, no race.
    """
    lines = ttgir.splitlines()
    mma_v2 = {m.group(1) for m in re.finditer(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = 2", ttgir, re.M)}
    defs = {}
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = (i, m.group(2))

    def alloc_of(name):
        """The multi-slot ttg.local_alloc a memdesc value views, or None."""
        name = name.split("#")[0]
        while name in defs:
            i, op = defs[name]
            if _ALLOC.search(lines[i]):
                return name
            if op not in _VIEWS:
                return None
            name = re.search(op.replace(".", r"\.") + " " + _NAME, lines[i]).group(1)
        return None

    def copy_dst(line):
        m = re.search(r"ttg\.async_copy_global_to_local " + _NAME + ", " + _NAME, line)
        return alloc_of(m.group(2)) if m else None

    dots, loops = [], []
    for line in lines:
        m = _DOT.search(line)
        if m:
            engine = "wgmma" if m.group(1) == "ttng.warp_group_dot" else "mma" if m.group(3) in mma_v2 else "fma"
            dots.append([engine, m.group(2)])
    for header, body in _loops(lines):
        text = [lines[j] for j in body]
        if not any(_DOT.search(line) for line in text):
            continue
        copied = {copy_dst(line) for line in text} - {None}
        wgmma_read = {alloc_of(name) for line in text
                      for name in re.findall(r"ttng\.warp_group_dot " + _NAME + ", " + _NAME, line) for name in name}
        loaded = {alloc_of(name) for line in text for name in re.findall(r"ttg\.local_load " + _NAME, line)}
        used = (copied | wgmma_read | loaded) - {None}
        ahead = {a: sum(copy_dst(lines[i]) == a for i in range(defs[a][0], header)) for a in used}
        slots = {a: int(_ALLOC.search(lines[defs[a][0]]).group(1)) for a in used}
        wgmma_waits = [int(p) for line in text for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", line)]
        races = sorted(a for a in (wgmma_read & copied) if max(wgmma_waits, default=0) > 0 and slots[a] <= ahead[a])
        register_tiles = 0
        for j in body:
            m = _DEF.match(lines[j])
            if m and m.group(2) == "tt.load" and re.search(r": tensor<\d+x\d+x", lines[j]):
                users = [lines[u] for u in body if u != j and re.search(re.escape(m.group(1)) + r"\b", lines[u])]
                register_tiles += any("scf.yield" not in user for user in users)
        waits = [int(w) for line in text for w in re.findall(r"ttg\.async_wait .*\{num = (\d+)", line)]
        loops.append({
            "buffers": sorted([slots[a], ahead[a]] for a in used),
            "async_waits": waits,
            "wgmma_waits": wgmma_waits,
            "register_tiles": register_tiles,
            "races": len(races),
            "pipelined": bool(copied) and min(waits, default=0) > 0 and min(slots.values(), default=0) >= 2
            and not register_tiles and not races,
        })
    return {"dots": dots, "loops": loops}


# ------------------------------------------------------------------------------------------------
# CUDA sources


def nvcc_report(archs):
    """Registers, spills and shared memory of every kernel in csrc/cuda/*.cu (nvcc -Xptxas -v)."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    sources = sorted(CUDA_SOURCES.glob("*.cu"))
    if not os.path.exists(nvcc) or not sources:
        return [], ["nvcc or csrc/cuda/*.cu not found: CUDA sources not checked"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for src in sources:
                cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{CUDA_SOURCES}",
                       str(src), "-o", os.path.join(tmp, "k.o")]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    rows.append({"case": f"csrc/cuda/{src.name}", "kernel": src.name, "arch": arch, "config": "nvcc",
                                 "error": done.stderr.strip().splitlines()[-1][:300]})
                    continue
                rows += [{"case": f"csrc/cuda/{src.name}", "arch": arch, "config": "nvcc", **row}
                         for row in parse_nvcc(done.stderr)]
    return rows, []


def parse_nvcc(log):
    """One row per entry function of an nvcc -Xptxas -v log (names demangled by c++filt)."""
    rows = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log)[1:]:
        name = re.search(r"entry function '([^']+)'", block).group(1)
        smem = re.search(r"(\d+) bytes smem", block)
        rows.append({"kernel": name, **parse_ptxas(block), "smem": int(smem.group(1)) if smem else 0})
    if rows and shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows), capture_output=True,
                               text=True).stdout.splitlines()
        for row, name in zip(rows, names):  # "void ns::(anonymous namespace)::k<T, ns::U>(...)" -> "k<T, U>"
            name = name.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
            row["kernel"] = re.sub(r"\b\w+::", "", name)
    return rows


# ------------------------------------------------------------------------------------------------
# the report


def kernel_label(launch):
    """Kernel name and the constexpr flags that select its code path."""
    flags = [f"{k}={v}" if not isinstance(v, bool) else k for k, v in launch.kwargs.items()
             if k.isupper() and v and k not in ("DOT_PRECISION", "BLOCK_D", "BLOCK_R", "BLOCK_C", "BLOCK")]
    name = launch.fn.__name__.strip("_").removesuffix("_kernel")
    return name + (f"[{','.join(flags)}]" if flags else "")


def config_label(config, launch):
    if config is None:
        return "w{} s{}".format(launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3))
    blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def programs(launch, config):
    grid = launch.grid
    if callable(grid):
        grid = grid({**dict(zip(launch.fn.arg_names, launch.args)), **launch.kwargs, **_config_kwargs(config)})
    return math.prod(grid)


def findings(row):
    """What a variant breaks of DESIGN.md 6, or []."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    found = []
    if row["spill"]:
        found.append(f"spills {row['spill']} B")
    if row["smem"] > SMEM_LIMIT:
        found.append(f"shared memory {row['smem'] / 1024:.0f} KiB > {SMEM_LIMIT // 1024} KiB")
    if row["arch"] >= 90 and any(e != "wgmma" and t in ("bf16", "f16") for e, t in row.get("dots", [])):
        found.append("bf16/fp16 product not on wgmma")
    if any(loop["races"] for loop in row.get("loops", [])):
        found.append("cp.async overwrites a buffer an in-flight wgmma reads")
    if any(not loop["pipelined"] for loop in row.get("loops", [])):
        found.append("main loop not pipelined")
    if row.get("weight_gemm") and row["programs"] < SMS:
        found.append(f"weight-gradient GEMM: {row['programs']} programs < {SMS} multiprocessors")
    return found


def _pipeline_label(row):
    loops = row.get("loops")
    if not loops:
        return "-"
    parts = []
    for loop in loops:
        waits = ",".join(map(str, sorted(set(loop["async_waits"])))) or "-"
        bufs = "/".join(str(slots) for slots, _ in loop["buffers"]) or "-"
        parts.append(f"buf {bufs} wait {waits}" + (f" reg{loop['register_tiles']}" if loop["register_tiles"] else "")
                     + (f" race{loop['races']}" if loop["races"] else ""))
    return "; ".join(parts)


def _dots_label(row):
    counts = collections.Counter(engine for engine, _ in row.get("dots", []))
    return ",".join(f"{n}x{e}" if n > 1 else e for e, n in sorted(counts.items())) or "-"


def format_table(rows):
    head = ("arch", "case", "kernel", "config", "regs", "spill", "smem KiB", "products", "main loop pipelining",
            "programs", "waves", "gate")
    table = [head]
    for r in rows:
        table.append((
            f"sm_{r['arch']}", r["case"], r["kernel"], r["config"],
            str(r.get("regs", "-")), str(r.get("spill", "-")),
            f"{r['smem'] / 1024:.1f}" if r.get("smem") is not None else "-",
            _dots_label(r), _pipeline_label(r),
            str(r.get("programs", "-")), f"{r['programs'] / SMS:.2f}" if r.get("programs") else "-",
            "; ".join(r["problems"]) or ("advice: " + "; ".join(r["advice"]) if r["advice"] else "ok"),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


_WORK = []  # (launch, config, arch) of each compile, read by forked workers


def _compile_task(i):
    return compile_variant(*_WORK[i])


def build_report(archs=(90, 80), only=None, jobs=None):
    """Rows of the report (one per case, kernel, config and arch) and the notes."""
    import triton
    from triton import knobs

    from .backend import triton_interpreted
    from .triton.gemm import autotuning

    if triton_interpreted() or not autotuning():
        raise SystemExit("kernel_report compiles the kernels' autotune lists for a GPU: run it without "
                         "TRITON_INTERPRET=1 and SBP_TRITON_AUTOTUNE=0")

    cache = tempfile.mkdtemp(prefix="sbp-kernel-report-")
    knobs.cache.dir = cache  # fresh: every variant really compiles, nothing carries over
    try:
        launches = record(only)
        work = variants(launches, archs)
        keys = [compile_key(*v) for v in work]
        unique = list(dict.fromkeys(keys))
        _WORK[:] = [work[keys.index(k)] for k in unique]
        jobs = jobs or os.cpu_count() or 1
        if jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                compiled = list(pool.map(_compile_task, range(len(unique))))
        else:
            compiled = [_compile_task(i) for i in range(len(unique))]
        by_key = dict(zip(unique, compiled))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows, seen = [], set()
    for (launch, config, arch), key in zip(work, keys):
        count = programs(launch, config)
        if (launch.case, key, count) in seen:  # the same launch again (the chunks of a loop): one row
            continue
        seen.add((launch.case, key, count))
        rows.append({
            "case": launch.case, "kernel": kernel_label(launch), "config": config_label(config, launch), "arch": arch,
            "programs": count, "weight_gemm": launch.fn.__name__ == "_weight_gemm_kernel", **by_key[key],
        })
    notes = [f"triton {triton.__version__}, torch {torch.__version__}; {len(unique)} distinct compiles"]
    if only is None or re.search(only, "csrc/cuda"):
        cuda_rows, cuda_notes = nvcc_report(archs)
        rows += cuda_rows
        notes += cuda_notes
    for row in rows:
        # The gate is Hopper's (DESIGN.md 6); what sm_80 breaks is reported as advice.
        found = findings(row)
        row["problems"], row["advice"] = (found, []) if row["arch"] >= 90 else ([], found)
    return rows, notes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sbp_kernels.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a variant fails the gate")
    parser.add_argument("--only", metavar="REGEX", help="only the cases whose name matches (e.g. 'ViT-B proj')")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    start = time.time()
    rows, notes = build_report(args.arch, args.only, args.jobs)
    print(format_table(rows))
    for note in notes:
        print(note)
    failed = [r for r in rows if r["problems"]]
    print(f"{len(rows)} variants, {len(failed)} failing the gate, {time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"sms": SMS, "notes": notes, "rows": rows}, indent=1))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
