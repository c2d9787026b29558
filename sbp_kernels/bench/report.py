"""Tables, markdown, JSON-ready environment info and the plot of the benchmark CLI."""
import datetime
import os
import platform
import subprocess

import torch

COLUMNS = (
    # (header, record key, format)
    ("op", "op", "{}"),
    ("case", "case", "{}"),
    ("backend", "backend", "{}"),
    ("r", "keep_ratio", "{:g}"),
    ("fwd ms", "fwd_ms", "{:.3f}"),
    ("bwd ms", "bwd_ms", "{:.3f}"),
    ("step ms", "step_ms", "{:.3f}"),
    ("saved MiB", "saved_bytes", "mib"),
    ("fwd x", "fwd_ratio", "{:.2f}"),
    ("bwd x", "bwd_ratio", "{:.2f}"),
    ("step x", "step_ratio", "{:.2f}"),
    ("saved x", "saved_ratio", "{:.2f}"),
    ("peak MiB", "peak_bytes", "mib"),
    ("peak x", "peak_ratio", "{:.2f}"),
    ("check", "check", "{}"),
)


def _cell(record, key, fmt):
    """record[key] as a table cell: "-" when missing, "mib" / "gflop" in those units, else fmt."""
    value = record.get(key)
    if value is None:
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.2f}"
    if fmt == "gflop":
        return f"{value / 1e9:.2f}"
    return fmt.format(value)


def rows(records):
    return [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in records]


def text_table(records):
    headers = [h for h, _, _ in COLUMNS]
    body = rows(records)
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    last_case = None
    for record, row in zip(records, body):
        if last_case is not None and (record["op"], record["case"]) != last_case:
            lines.append("")
        last_case = (record["op"], record["case"])
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def markdown_table(records):
    headers = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows(records):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def overhead_table(rows):
    """The rows of --overhead (bench/overhead.py) as a markdown table."""
    lines = ["| call | dense us | sbp us | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        target = "-" if r["target"] is None else f"<= {r['target']:g}"
        met = "-" if r["met"] is None else "yes" if r["met"] else "NO"
        lines.append(f"| {r['name']} | {r['dense_us']:.1f} | {r['sbp_us']:.1f} | {r['ratio']:.2f} | {target} | {met} |")
    return "\n".join(lines)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def load_average():
    """The 1-minute load average (a busy CPU makes CPU timings noisy), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit():
    """Short commit of the checkout this package runs from (+ "-dirty"), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(records, env, settings, notes):
    lines = [
        "# sbp_kernels benchmark",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, triton {env['triton'] or 'not installed'}, "
        f"CUDA {env['cuda'] or 'none (CPU build of torch)'}",
        f"- commit: {env['commit'] or 'unknown (not a git checkout)'}",
        f"- date: {env['date']}",
        f"- 1-minute load average at start: {env['load_average'] if env['load_average'] is not None else 'unknown'}",
        f"- settings: {settings}",
        "",
        "Ratios are to the dense PyTorch baseline of the same case (fwd x, bwd x, step x: time; saved x: "
        "activation bytes saved for backward, parameters excluded; peak x: peak GPU memory of "
        "forward + backward above the inputs).",
        "",
        markdown_table(records),
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(records, path, title):
    """Bar chart: backward-time ratio and saved-bytes ratio to dense, per case, for each backend and r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sbp = [r for r in records if r["kind"] == "sbp" and r.get("bwd_ratio") is not None]
    case_names = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in sbp))
    series = list(dict.fromkeys((r["backend"], r["keep_ratio"]) for r in sbp))
    width = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(case_names)), 8), sharex=True)
    colors = {1.0: "#4c72b0", 0.5: "#dd8452", 0.25: "#55a868"}
    hatches = ["", "//", "..", "xx"]
    backends = list(dict.fromkeys(b for b, _ in series))
    for ax, key, ylabel in (
        (axes[0], "bwd_ratio", "backward time / dense"),
        (axes[1], "saved_ratio", "saved bytes / dense"),
    ):
        for i, (backend, ratio) in enumerate(series):
            xs, ys = [], []
            for j, name in enumerate(case_names):
                for r in sbp:
                    if f"{r['op']}\n{r['case']}" == name and (r["backend"], r["keep_ratio"]) == (backend, ratio):
                        if r.get(key) is not None:
                            xs.append(j + (i - (len(series) - 1) / 2) * width)
                            ys.append(r[key])
            ax.bar(
                xs,
                ys,
                width,
                label=f"{backend} r={ratio:g}",
                color=colors.get(ratio, "#8172b2"),
                hatch=hatches[backends.index(backend) % len(hatches)],
                edgecolor="black",
                linewidth=0.4,
            )
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(ylabel)
    axes[1].set_xticks(range(len(case_names)))
    axes[1].set_xticklabels(case_names, fontsize=7)
    axes[0].legend(fontsize=7, ncol=min(6, len(series)))
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- simulated steps (sbp-bench --simulate) ---------------------------------------------------

SIM_COLUMNS = (
    ("op", "op", "{}"),
    ("case", "case", "{}"),
    ("variant", "variant", "{}"),
    ("r", "keep_ratio", "{:g}"),
    ("peak MiB", "peak_bytes", "mib"),
    ("peak x", "peak_ratio", "{:.3f}"),
    ("held x", "held_ratio", "{:.3f}"),
    ("saved x", "saved_ratio", "{:.3f}"),
    ("GFLOP", "flops", "gflop"),
    ("FLOPs x", "flops_ratio", "{:.3f}"),
    ("error", "error", "{}"),
)


def _sim_rows(records):
    columns = [c for c in SIM_COLUMNS if c[1] != "error" or any(r.get("error") for r in records)]
    return [h for h, _, _ in columns], [[_cell(r, k, f) for _, k, f in columns] for r in records]


def sim_table(records):
    headers, body = _sim_rows(records)
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    last = None
    for record, row in zip(records, body):
        if last is not None and (record["op"], record["case"]) != last:
            lines.append("")
        last = (record["op"], record["case"])
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def sim_markdown_table(records):
    headers, body = _sim_rows(records)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return "\n".join(lines)


def sim_breakdown(records, top=6):
    """What holds the memory at each variant's peak (the records' breakdown), as text."""
    lines = []
    for r in records:
        if not r.get("breakdown"):
            continue
        ratio = "" if r["keep_ratio"] is None else f" r={r['keep_ratio']:g}"
        lines.append(f"at the peak of {r['op']} {r['case']} {r['variant']}{ratio} ({r['peak_bytes'] / 2**20:.1f} MiB):")
        for what, nbytes in r["breakdown"][:top]:
            lines.append(f"  {nbytes / 2**20:10.1f} MiB  {what}")
    return "\n".join(lines)


def sim_markdown(records, env, settings, notes):
    lines = [
        "# sbp_kernels simulated training steps",
        "",
        "- measured on fake tensors (FakeTensorMode on the CPU device; nothing computed), sbp ops on their torch backend",
        f"- torch {env['torch']}",
        f"- commit: {env['commit'] or 'unknown (not a git checkout)'}",
        f"- date: {env['date']}",
        f"- settings: {settings}",
        "",
        "Ratios are to the dense variant of the same case: peak x (peak live bytes of the step above the parameters "
        "and the batch, each allocation rounded up to 512 B), held x (live bytes at the end of forward + loss), "
        "saved x (bytes saved for backward, parameters excluded), FLOPs x (forward + loss + backward).",
        "",
        sim_markdown_table(records),
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def pareto(points):
    """The points (x, y, ...) not dominated by another (lower-or-equal in both, lower in one)."""
    return [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)]


def pareto_plot(records, path, title):
    """PNG: per case, peak memory x dense (y) against FLOPs x dense (x) of every variant, the
    Pareto front (lower-left is better) drawn through the points no other beats on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["op"], r["case"]) for r in records))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.0), squeeze=False)
    markers = {"dense": "s", "checkpoint": "^", "checkpoint (all)": "v", "anchor": "D"}
    for ax, (op, case) in zip(axes[0], cases):
        mine = [r for r in records if (r["op"], r["case"]) == (op, case) and r.get("peak_ratio") is not None
                and r.get("flops_ratio") is not None]  # fmt: skip
        points, placed = [], []
        for r in sorted(mine, key=lambda r: (r["flops_ratio"], r["peak_ratio"])):
            ratio = r["keep_ratio"] is not None and r["variant"] != "anchor"
            name = r["variant"] + (f" r={r['keep_ratio']:g}" if ratio else "")
            x, y = r["flops_ratio"], r["peak_ratio"]
            sbp = r["variant"].startswith("sbp")
            ax.scatter(x, y, marker=markers.get(r["variant"], "o"), s=36, color="#dd8452" if sbp else "#4c72b0",
                       edgecolor="black", linewidth=0.5, zorder=3)  # fmt: skip
            # A label near an earlier one goes below it.
            shift = sum(1 for px, py in placed if abs(px - x) < 0.12 and abs(py - y) < 0.05)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3 - 9 * shift), fontsize=6)
            placed.append((x, y))
            points.append((x, y))
        front = sorted(pareto(points))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="#55a868", linewidth=1, zorder=2,
                    label="Pareto front")  # fmt: skip
            ax.legend(fontsize=6, loc="upper right")
        ax.set_xlabel("FLOPs / dense", fontsize=8)
        ax.set_ylabel("peak memory / dense", fontsize=8)
        ax.set_title(f"{op}: {case}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.1)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
