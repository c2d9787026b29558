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
    value = record.get(key)
    if value is None:
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.2f}"
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
