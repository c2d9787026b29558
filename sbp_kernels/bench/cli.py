"""sbp-bench: times dense PyTorch against SBP for every op, keep ratio and available backend, and
simulates whole-model training steps at full GPU shapes on any machine (--simulate).

    sbp-bench [--quick] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
              [--ops linear,pointwise_conv,attention,mlp,block,vit,convnext]
              [--backends torch,cuda,triton]
              [--repeats N] [--json PATH] [--markdown PATH] [--plot PATH]
    sbp-bench --simulate [--quick] [--ops vit,convnext,llama] [--breakdown]
              [--json PATH] [--markdown PATH] [--plot PATH]
    sbp-bench --overhead [--quick] [--repeats N] [--json PATH]

(also `python -m sbp_kernels.bench`). For each case it runs the dense baseline, then SBP at
r = 1, 0.5, 0.25 with each backend on the same keep set, and reports forward and backward time,
bytes saved for backward, peak GPU memory and the ratios of each to dense. Every SBP backward is
first checked against the torch backend (at r = 1 the torch backend against dense autograd);
a failed check is reported in the table and makes the exit status 1.

The ops "vit" and "convnext" are whole models: one training step (forward, cross-entropy loss,
backward; bf16 autocast on GPU, fp32 on CPU) of timm's vit_base_patch16_224 / convnext_tiny
(pretrained=False; sizes reduced on CPU; the replicas of bench/models.py when timm is not
installed: the output says which), dense, SBP via sbp_kernels.convert (r = 0.5), SBP in recompute
mode (alone and with the blocks left dense checkpointed), the papers' own way (models.AnchorSBP,
r = 0.5) and activation checkpointing, all on the same blocks; their forward losses are checked
against dense's. Their records have step_ms (the whole step) and fwd_ms (forward + loss), bwd_ms
null; --backends and --ratios do not apply to them (convert picks its backend, "auto").

--simulate: peak memory, held and saved bytes and FLOPs of one training step of ViT-B/16 and
ConvNeXt-T (batch 64, 224 px, bf16) and a Llama-3.2-1B-shaped LlamaForCausalLM with LoRA (4 x 2048
tokens), per variant, measured on fake tensors (nothing computed; sbp_kernels/bench/simulate.py),
in seconds on any machine; --plot draws peak x dense against FLOPs x dense. See BENCHMARKS.md.

--overhead: the host cost per call of SBP against dense (sbp_kernels/bench/overhead.py): tiny
tensors, CPU (also on a GPU machine), one torch thread, dense and SBP timed side by side; the
ratio of medians SBP / dense per row beside its target. A missed target is printed and does not
change the exit status: wall-clock times on a shared machine are too noisy to fail a run on.
"""
import argparse
import json
import sys

import torch

from ..sampling import keep_count, sample_keep_indices
from . import report, timing
from .cases import MODEL_KEEP_RATIO, OPS, attention_op, backend_reason, cases, model_cases

SIM_OPS = ("vit", "convnext", "llama")  # the simulated cases (--simulate)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", "cuda", "triton")  # run order: the reference first
RATIOS = (1.0, 0.5, 0.25)
# Max |a - b| / max |b| allowed per gradient when checking a backend against the torch backend.
# Loose enough for different summation orders (and TF32 in Triton's fp32 dots), far below the
# O(1) error of a wrong kernel.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _csv(choices, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
        return items

    return parse


def _ratios(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"keep ratios must be numbers in (0, 1], got {text!r}")
    return values


def parser():
    p = argparse.ArgumentParser(
        prog="sbp-bench",
        description="Benchmark sbp_kernels ops (SBP) against dense PyTorch: time, saved bytes, peak memory.",
    )
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run of a minute or two")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument(
        "--ops",
        type=_csv(OPS + ("llama",), "op"),
        help=f"comma list of {', '.join(OPS)} (default: all); with --simulate of {', '.join(SIM_OPS)}",
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="whole-model training steps at full GPU shapes on fake tensors: peak memory, saved bytes, FLOPs",
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="host cost per call, SBP against dense, on tiny CPU tensors with 1 thread; a missed target "
        "is printed, not a failure (wall-clock on a shared machine is noisy)",
    )
    p.add_argument("--breakdown", action="store_true", help="with --simulate: print what holds the memory at the peak")
    p.add_argument(
        "--backends",
        type=_csv(BACKENDS, "backend"),
        default=list(BACKENDS),
        help="comma list of torch, cuda, triton (default: every available one)",
    )
    p.add_argument("--ratios", type=_ratios, default=list(RATIOS), help="keep ratios (default 1,0.5,0.25)")
    p.add_argument(
        "--repeats", type=int,
        help="timed calls per measurement (default: GPU 30, CPU 10, quick 5; --overhead: per row and side, "
        "default 5000 per op, 200 per ViT step, a tenth or less with --quick)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, help="untimed calls first (default: GPU 10, CPU 2, quick 1)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and keep sets")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown with an environment header")
    p.add_argument(
        "--plot", metavar="PATH",
        help="PNG: bar chart of backward-time and saved-bytes ratios; with --simulate peak x vs FLOPs x dense",
    )  # fmt: skip
    return p


def _say(*args, end="\n"):
    print(*args, end=end, file=sys.stderr, flush=True)


def _compare(grads, ref, targets_inputs, dtype):
    """(ok, text): the largest normalized gradient difference and where it is."""
    worst, where = 0.0, ""
    for i, (g, r) in enumerate(zip(grads, ref)):
        if g is None or r is None:
            if g is not r:
                return False, f"grad {i} is None on one side only"
            continue
        if g.shape != r.shape:
            return False, f"grad {i} has shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        r32, g32 = r.float(), g.float()
        err = float((g32 - r32).abs().max() / r32.abs().max().clamp_min(1e-12))
        if not err == err or err > worst:  # nan counts as the worst
            worst = float("inf") if err != err else err
            where = f"input {i}" if i < targets_inputs else f"param {i - targets_inputs}"
    tol = TOLERANCE.get(dtype, 1e-6)
    if worst <= tol:
        return True, f"ok {worst:.0e}"
    return False, f"FAIL err {worst:.2g} > {tol:g} ({where})"


def _measure(forward, work, grad_out, device, repeats, warmup):
    rec = {}
    rec["saved_bytes"], rec["saved_bytes_with_params"] = timing.saved(forward, work.params)
    rec["peak_bytes"] = timing.peak_bytes(forward, work.targets, grad_out, device)
    rec["fwd_ms"] = timing.median_ms(forward, device, repeats, warmup)
    out = forward()
    rec["bwd_ms"] = timing.median_ms(
        lambda: torch.autograd.grad(out, work.targets, grad_out, retain_graph=True), device, repeats, warmup
    )
    return rec


# Targets of the issue "Whole models" for the GPU runs at full shapes: (op, variant, ratio key, limit).
MODEL_TARGETS = (
    ("vit", "sbp", "peak_ratio", 0.65, "ViT-B peak memory"),
    ("vit", "sbp", "step_ratio", 0.85, "ViT-B step time"),
    ("convnext", "sbp", "peak_ratio", 0.55, "ConvNeXt-T peak memory"),
)
MODEL_VARIANTS = ("dense", "sbp", "sbp+recompute", "sbp+recompute+checkpoint", "checkpoint", "anchor")


def _plan(args, device):
    """[(case, [backend, ...])] to run, and notes on what is skipped and why."""
    plan, skipped = [], {}  # skipped: reason -> ops
    for case in cases(device.type, args.quick):
        if case.op not in args.ops:
            continue
        if "attention" in case.kernels:
            _, why = attention_op()
            if why:
                skipped.setdefault(f"skipped: {why}", []).append(case.op)
                continue
        run = []
        for name in BACKENDS:
            if name not in args.backends:
                continue
            reason = backend_reason(name, case, device)
            if reason:
                skipped.setdefault(f"backend {name} skipped: {reason}", []).append(case.op)
            else:
                run.append(name)
        plan.append((case, run))
    notes = [f"{', '.join(dict.fromkeys(ops))}: {reason}" for reason, ops in skipped.items()]
    if device.type == "cpu" and any("cuda" in run for _, run in plan):
        notes.append("backend cuda on CPU tensors runs the C++ CPU kernels of sbp_kernels._C")
    return plan, notes


def _with_ratios(records):
    dense = {(r["op"], r["case"]): r for r in records if r["kind"] == "dense"}
    for r in records:
        d = dense.get((r["op"], r["case"]), {})
        for key in ("fwd", "bwd", "step", "saved", "peak"):
            value_key = {"fwd": "fwd_ms", "bwd": "bwd_ms", "step": "step_ms"}.get(key, f"{key}_bytes")
            a, b = r.get(value_key), d.get(value_key)
            r[f"{key}_ratio"] = a / b if a is not None and b else None


def _check(work, forward, backend, ratio, keep, grad_out, cache, dtype):
    """(ok, text): this SBP configuration's gradients against the torch backend's on the same keep
    set, or for the torch backend at r = 1 against dense autograd. cache keeps reference gradients."""
    grads = timing.forward_backward(forward, work.targets, grad_out)
    if backend == "torch":
        cache[ratio] = grads
        if ratio != 1.0:
            return True, "reference"
        if "dense" not in cache:
            cache["dense"] = timing.forward_backward(work.dense, work.targets, grad_out)
        ok, text = _compare(grads, cache["dense"], len(work.inputs), dtype)
        return ok, f"{text} vs dense"
    if ratio not in cache:
        cache[ratio] = timing.forward_backward(lambda: work.sbp(keep, "torch"), work.targets, grad_out)
    ok, text = _compare(grads, cache[ratio], len(work.inputs), dtype)
    return ok, f"{text} vs torch"


class _Runner:
    def __init__(self, args, device, dtype, total, base):
        self.args, self.device, self.dtype, self.total, self.base = args, device, dtype, total, base
        quick_cpu = args.quick and device.type == "cpu"
        self.repeats = args.repeats or (5 if args.quick else 30 if device.type == "cuda" else 10)
        self.warmup = args.warmup
        if self.warmup is None:
            self.warmup = 1 if quick_cpu else 10 if device.type == "cuda" else 2
        self.records, self.failures, self.step = [], [], 0

    def case(self, case, backends):
        device, ratios = self.device, self.args.ratios
        gen = torch.Generator(device=device).manual_seed(self.args.seed)
        try:
            work = case.build(device, self.dtype, gen)
            with torch.no_grad():
                grad_out = torch.randn(work.dense().shape, device=device, generator=gen).to(self.dtype)
        except Exception as exc:  # noqa: BLE001  (report, go on with the other cases)
            msg = f"{case.name}: could not build the case ({type(exc).__name__}: {exc})"
            _say(f"ERROR {msg}")
            self.failures.append(msg)
            self.step += 1 + len(ratios) * len(backends)
            return
        n_positions = 1
        for d in case.layout:
            n_positions *= d
        cache = {}  # reference gradients of the checks
        self.one(case, work, grad_out, "dense", None, None, n_positions, cache)
        for ratio in ratios:
            # One keep set per r, shared by every backend.
            keep = sample_keep_indices(
                case.layout, ratio, "grid", torch.Generator().manual_seed(self.args.seed), device=device
            )
            for key in [k for k in cache if k != "dense"]:
                del cache[key]
            for backend in backends:
                self.one(case, work, grad_out, backend, ratio, keep, n_positions, cache)
        del work, grad_out, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def one(self, case, work, grad_out, backend, ratio, keep, n_positions, cache):
        self.step += 1
        what = f"{case.name} {backend}" + ("" if ratio is None else f" r={ratio:g}")
        _say(f"[{self.step}/{self.total}] {what} ...", end="")
        rec = dict(
            self.base,
            op=case.op,
            case=case.label,
            shape=case.shape,
            kind="dense" if ratio is None else "sbp",
            backend=backend,
            keep_ratio=ratio,
            n_positions=n_positions,
            n_keep=n_positions if ratio is None else keep_count(n_positions, ratio),
            step_ms=None,
            check=None,
            error=None,
        )
        try:
            if ratio is None:
                forward = work.dense
            else:

                def forward():
                    return work.sbp(keep, backend)

                ok, rec["check"] = _check(work, forward, backend, ratio, keep, grad_out, cache, self.dtype)
                if not ok:
                    self.failures.append(f"{what}: backward check {rec['check']}")
                    _say(f" CHECK FAILED: {rec['check']} ...", end="")
            rec.update(_measure(forward, work, grad_out, self.device, self.repeats, self.warmup))
            check = f", {rec['check']}" if rec["check"] else ""
            _say(f" fwd {rec['fwd_ms']:.3f} ms, bwd {rec['bwd_ms']:.3f} ms{check}")
        except Exception as exc:  # noqa: BLE001  (report, go on with the other runs)
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["check"] = rec["check"] or "ERROR"
            self.failures.append(f"{what}: {rec['error']}")
            _say(f" ERROR {rec['error']}")
        self.records.append(rec)


    def model_case(self, case):
        """One whole model: a training step of each variant (MODEL_VARIANTS)."""
        device = self.device
        gen = torch.Generator(device=device).manual_seed(self.args.seed)
        try:
            work = case.build(device, gen)
        except Exception as exc:  # noqa: BLE001
            msg = f"{case.name}: could not build the case ({type(exc).__name__}: {exc})"
            _say(f"ERROR {msg}")
            self.failures.append(msg)
            self.step += len(MODEL_VARIANTS)
            return
        dense_loss = None
        for variant in MODEL_VARIANTS:
            self.step += 1
            what = f"{case.name} {variant}"
            _say(f"[{self.step}/{self.total}] {what} ...", end="")
            ratio = MODEL_KEEP_RATIO if variant.startswith("sbp") or variant == "anchor" else None
            rec = dict(
                self.base, op=case.op, case=case.label, shape=case.shape, kind=variant, backend=variant,
                model=case.source,
                keep_ratio=ratio, n_positions=case.n_positions,
                n_keep=None if ratio is None else keep_count(case.n_positions, ratio),
                fwd_ms=None, bwd_ms=None, step_ms=None, saved_bytes=None, saved_bytes_with_params=None,
                peak_bytes=None, check=None, error=None,
            )  # fmt: skip
            try:
                model = model_variant(work, variant)
                fwd, train_step = model_step(model, work.x, work.y, device, self.dtype)
                with torch.no_grad():
                    loss = float(fwd())
                if variant == "dense":
                    dense_loss = loss
                else:
                    ok, rec["check"] = _compare_loss(loss, dense_loss, self.dtype)
                    if not ok:
                        self.failures.append(f"{what}: forward check {rec['check']}")
                        _say(f" CHECK FAILED: {rec['check']} ...", end="")
                params = list(model.parameters())
                rec["saved_bytes"], rec["saved_bytes_with_params"] = timing.saved(fwd, params)
                train_step()
                rec["peak_bytes"] = timing.step_peak_bytes(train_step, device)
                rec["fwd_ms"] = timing.median_ms(fwd, device, self.repeats, self.warmup)
                rec["step_ms"] = timing.median_ms(train_step, device, self.repeats, self.warmup)
                check = f", {rec['check']}" if rec["check"] else ""
                _say(f" step {rec['step_ms']:.3f} ms, fwd {rec['fwd_ms']:.3f} ms{check}")
                del model, fwd, train_step, params
            except Exception as exc:  # noqa: BLE001  (report, go on)
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["check"] = rec["check"] or "ERROR"
                self.failures.append(f"{what}: {rec['error']}")
                _say(f" ERROR {rec['error']}")
            self.records.append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def model_variant(work, variant):
    """A deep copy of work.model as `variant` (MODEL_VARIANTS): dense; sbp (convert of the SBP
    blocks); sbp+recompute (convert(..., recompute=True)); sbp+recompute+checkpoint (and
    torch.utils.checkpoint of the blocks SBP leaves dense); checkpoint (of the SBP blocks); anchor
    (AnchorSBP on the SBP blocks)."""
    import copy

    from ..nn.convert import convert
    from .models import AnchorSBP, Checkpointed, wrap

    model = copy.deepcopy(work.model)
    if variant.startswith("sbp"):
        convert(model, MODEL_KEEP_RATIO, "grid", layers=work.sbp_layers, recompute="recompute" in variant)
        if variant.endswith("+checkpoint") and not wrap(model, work.dense_blocks, Checkpointed):
            raise RuntimeError("no dense block to checkpoint")
    elif variant == "anchor":
        if not wrap(model, work.blocks, lambda m: AnchorSBP(m, MODEL_KEEP_RATIO, **work.anchor)):
            raise RuntimeError("no block to wrap")
    elif variant == "checkpoint":
        if not wrap(model, work.blocks, Checkpointed):
            raise RuntimeError("no block to wrap")
    return model.train()


def model_step(model, x, y, device, dtype):
    """(forward, step): forward() -> the loss, graph recorded; step(): zero grads, forward, backward.
    Autocast to dtype unless it is float32."""
    import torch.nn.functional as F

    autocast = dtype != torch.float32

    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return F.cross_entropy(model(x).float(), y)

    def step():
        for p in model.parameters():
            p.grad = None
        forward().backward()

    return forward, step


def _compare_loss(loss, ref, dtype):
    err = abs(loss - ref) / max(abs(ref), 1e-12)
    if not err == err:
        err = float("inf")
    tol = TOLERANCE.get(dtype, 1e-6)
    if err <= tol:
        return True, f"loss ok {err:.0e} vs dense"
    return False, f"FAIL loss {loss:.6g} vs dense {ref:.6g} (err {err:.2g} > {tol:g})"


def _model_notes(records, device, quick):
    """The issue's targets beside the GPU results (full shapes only)."""
    notes = []
    if device.type != "cuda" or quick:
        return notes
    for op, variant, key, limit, what in MODEL_TARGETS:
        for r in records:
            if r["op"] == op and r["kind"] == variant and r.get(key) is not None:
                verdict = "meets" if r[key] <= limit else "MISSES"
                notes.append(f"target {what}: {variant} {r[key]:.2f}x dense, target <= {limit}x: {verdict}")
    return notes


def run(args):
    """Runs the benchmark: (records, notes, failures, environment, settings)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    dtype_name = str(dtype).replace("torch.", "")
    env = report.environment(device)
    plan, notes = _plan(args, device)
    models = [c for c in model_cases(device.type, args.quick) if c.op in args.ops]
    total = sum(1 + len(args.ratios) * len(backends) for _, backends in plan) + len(MODEL_VARIANTS) * len(models)
    load = f", load average {env['load_average']}" if device.type == "cpu" else ""
    shapes = "quick" if args.quick else "full"
    _say(f"sbp-bench on {env['device']}, {dtype_name}, {shapes} shapes, {total} runs{load}")
    for note in notes:
        _say(f"note: {note}")
    for case in models:
        notes.append(f"{case.op}: {case.source}")
    base = {
        "model": None,
        "dtype": dtype_name,
        "device": env["device"],
        "device_type": device.type,
        "quick": args.quick,
        "torch_version": env["torch"],
        "triton_version": env["triton"],
        "cuda_version": env["cuda"],
        "commit": env["commit"],
        "date": env["date"],
        "load_average": env["load_average"],
    }
    runner = _Runner(args, device, dtype, total, base)
    for case, backends in plan:
        runner.case(case, backends)
    for case in models:
        runner.model_case(case)
    _with_ratios(runner.records)
    notes += _model_notes(runner.records, device, args.quick)
    settings = {"dtype": dtype_name, "repeats": runner.repeats, "warmup": runner.warmup}
    return runner.records, notes, runner.failures, env, settings


def run_simulate(args):
    """--simulate: (records, notes, failures, environment)."""
    from . import simulate

    env = report.environment(torch.device("cpu"))
    ops = args.ops or list(SIM_OPS)
    notes = []
    if "llama" in ops and simulate.llm_libraries():
        notes.append(f"llama skipped: {simulate.llm_libraries()}")
        ops = [op for op in ops if op != "llama"]
    cases = simulate.sim_cases(args.quick, ops)
    shapes = "quick" if args.quick else "full GPU"
    _say(f"sbp-bench --simulate: {shapes} shapes, bf16, fake tensors on the CPU (nothing computed), "
         f"{sum(len(c.variants) for c in cases)} runs")  # fmt: skip
    for case in cases:
        notes.append(f"{case.op}: {case.source}")
    base = {
        "device": "simulated (FakeTensorMode, CPU device; sbp ops on their torch backend)",
        "device_type": "fake",
        "quick": args.quick,
        "torch_version": env["torch"],
        "commit": env["commit"],
        "date": env["date"],
    }
    records, failures = simulate.run_cases(cases, base, _say)
    for what, value, limit, met in simulate.verdicts(records):
        shown = "missing" if value is None else f"{value:.3f}x"
        notes.append(f"target {what}: {shown} dense, target <= {limit:.2f}x: {'meets' if met else 'MISSES'}")
    return records, notes, failures, env


def main_simulate(args):
    plot_ok = _plot_ok(args)
    records, notes, failures, env = run_simulate(args)
    print(report.sim_table(records))
    for note in notes:
        print(f"note: {note}")
    if args.breakdown:
        print(report.sim_breakdown(records))
    for failure in failures:
        print(f"FAILED: {failure}")
    shapes = "quick" if args.quick else "full GPU"
    summary = f"simulated, {shapes} shapes, bf16"
    _write_outputs(
        args, records,
        lambda: report.sim_markdown(records, env, summary, notes + [f"FAILED: {x}" for x in failures]),
        plot_ok and (lambda path: report.pareto_plot(records, path, f"{summary}, torch {env['torch']}, "
                                                     f"commit {env['commit']}")),
    )
    return 1 if failures else 0


def _write_outputs(args, records, markdown, plot):
    """What the options ask for: --json the records, --markdown the text markdown() makes, --plot
    the figure plot(path) draws (plot is False where matplotlib is missing)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        _say(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown())
        _say(f"wrote {args.markdown}")
    if args.plot and plot:
        plot(args.plot)
        _say(f"wrote {args.plot}")


def _plot_ok(args):
    if not args.plot:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _say(f"note: --plot {args.plot} needs matplotlib (pip install matplotlib); no plot will be written")
        return False
    return True


def main_overhead(args):
    from . import overhead

    env = report.environment(torch.device("cpu"))
    _say(f"sbp-bench --overhead: tiny tensors, CPU, 1 torch thread{', quick' if args.quick else ''}, "
         f"load average {env['load_average']}")  # fmt: skip
    rows = overhead.run(args.quick, args.repeats, _say)
    print(report.overhead_table(rows))
    for r in rows:
        if r["note"]:
            print(f"note: {r['name']}: {r['note']}")
        if r["met"] is False:
            print(f"note: target MISSED: {r['name']}: {r['ratio']:.2f}x > {r['target']:g}x "
                  "(reported, not a failure: wall-clock times on a shared machine are noisy)")  # fmt: skip
    if args.json:
        result = {
            "torch_version": env["torch"], "threads": 1, "quick": args.quick, "cpu": report.cpu_model(),
            "commit": env["commit"], "date": env["date"], "load_average": env["load_average"], "rows": rows,
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        _say(f"wrote {args.json}")
    return 0


def main(argv=None):
    args = parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser().error("--repeats must be >= 1")
    if args.overhead:
        other = [name for name in ("simulate", "breakdown", "ops", "device", "dtype", "warmup", "threads",
                                   "markdown", "plot") if getattr(args, name) not in (None, False)]  # fmt: skip
        if other:
            parser().error(f"--overhead takes --quick, --repeats and --json, not --{', --'.join(other)}")
        return main_overhead(args)
    if args.simulate:
        bad = [op for op in args.ops or () if op not in SIM_OPS]
        if bad:
            parser().error(f"--simulate runs {', '.join(SIM_OPS)}, not {', '.join(bad)}")
        if args.threads is not None:
            if args.threads < 1:
                parser().error("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        return main_simulate(args)
    if args.breakdown:
        parser().error("--breakdown goes with --simulate")
    if args.ops is None:
        args.ops = list(OPS)
    if "llama" in args.ops:
        parser().error("--ops llama is simulated only (add --simulate)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser().error("--device cuda: no CUDA device is available to torch")
    if args.warmup is not None and args.warmup < 0:
        parser().error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser().error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    plot_ok = _plot_ok(args)

    records, notes, failures, env, settings = run(args)

    print(report.text_table(records))
    for note in notes:
        print(f"note: {note}")
    for failure in failures:
        print(f"FAILED: {failure}")
    shapes = "quick" if args.quick else "full"
    summary = f"{shapes} shapes, {settings['dtype']}, median of {settings['repeats']} calls"
    summary += f" after {settings['warmup']} warm-up"
    _write_outputs(
        args, records,
        lambda: report.markdown(records, env, summary, notes + [f"FAILED: {x}" for x in failures]),
        plot_ok and (lambda path: report.plot(records, path, f"{env['device']}, {summary}, commit {env['commit']}")),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
