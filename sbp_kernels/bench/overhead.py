"""sbp-bench --overhead: the host cost of SBP calls beside their dense counterparts (issue 14).

On tiny tensors, on the CPU with one torch thread, compute is negligible and what is timed is what
Python, the dispatcher and autograd spend per call: on a GPU, that host time decides whether the
GPU waits. Each row times a dense call and its SBP counterpart in the same run, alternating blocks
of repetitions so that the load of a shared machine hits both alike, and reports the medians of
the per-call times, their ratio SBP / dense and the issue's target where it sets one.
"""
import contextlib
import copy
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from .. import keepset
from ..nn import SBPLinear
from ..nn.convert import convert
from ..ops.attention import attention
from ..ops.linear import linear
from . import models, timing

KEEP = (0, 2, 4, 6)  # the fixed keep set of the op rows: 4 of 8 positions
KEEP_RATIO = 0.5  # of the converted ViT
VIT = dict(depth=12, dim=192, heads=3, img=32, patch=8, num_classes=10)  # vit_tiny_patch16_224's layout, 32 px
BLOCKS = 100  # dense and SBP alternate this many times per row (a ViT step: every 2 steps)


def _leaves(*shapes):
    return [torch.randn(shape, requires_grad=True) for shape in shapes]


def _linear():
    x, w, b = _leaves((2, 8, 16), (16, 16), (16,))
    keep = torch.tensor(KEEP)
    return (lambda: F.linear(x, w, b)), (lambda: linear(x, w, b, keep))


def _attention():
    q, k, v = _leaves(*[(1, 2, 8, 16)] * 3)
    keep = torch.tensor(KEEP)
    return (lambda: F.scaled_dot_product_attention(q, k, v)), (lambda: attention(q, k, v, keep))


def _with_backward(build):
    """build with each call followed by the backward of its output's sum."""

    def built():
        dense, sbp = build()
        return (lambda: dense().sum().backward()), (lambda: sbp().sum().backward())

    return built


def _module():
    dense = nn.Linear(16, 16)
    # from_linear, not convert: convert would open a step at every call of a converted root.
    sbp = SBPLinear.from_linear(copy.deepcopy(dense))
    (x,) = _leaves((2, 8, 16))
    return (lambda: dense(x)), (lambda: sbp(x))


def _train_step(model, x):
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def _vits():
    dense = models.vit(**VIT).train()
    return dense, convert(copy.deepcopy(dense), KEEP_RATIO), torch.randn(1, 3, VIT["img"], VIT["img"])


def _vit_step():
    dense, sbp, x = _vits()
    return _train_step(dense, x), _train_step(sbp, x)


def _compiled_vit_step():
    dense, sbp, x = _vits()
    dense_step, sbp_step = _train_step(torch.compile(dense), x), _train_step(torch.compile(sbp), x)
    grid = tuple(sbp.patch_embed.grid_size)
    n = sbp.num_prefix_tokens + math.prod(grid)

    def sbp_fn():
        # As a compiled training step runs (README): a new keep set every step, drawn outside the
        # graph, which takes it as an input.
        with keepset.step(keep_idx={n: keepset.draw(n, KEEP_RATIO, "grid", grid)}):
            sbp_step()

    return dense_step, sbp_fn


# (name, target ratio or None, repeats (full, quick), warm-up calls, build, scope of the SBP calls).
# build() -> (dense, sbp): each a call without arguments. The module row runs its SBP calls inside
# a step (a new one per block), as a converted model's layers run: the keep set is drawn once per
# step, the step's own cost is the ViT rows'.
ROWS = (
    ("linear fwd+bwd: sbp.linear / F.linear", 1.5, (5000, 500), 50, _with_backward(_linear), None),
    ("linear fwd: sbp.linear / F.linear", None, (5000, 500), 50, _linear, None),
    ("attention fwd+bwd: sbp.attention / SDPA", 2.0, (5000, 500), 50, _with_backward(_attention), None),
    ("attention fwd: sbp.attention / SDPA", None, (5000, 500), 50, _attention, None),
    ("module fwd in a step: SBPLinear / nn.Linear", 1.5, (5000, 500), 50, _module, keepset.step),
    ("ViT-tiny 12 blocks training step: convert / dense", 1.25, (200, 20), 3, _vit_step, None),
    ("ViT-tiny step under torch.compile: convert / dense", 1.15, (200, 10), 3, _compiled_vit_step, None),
)


def _graphs():
    return counters["stats"]["unique_graphs"]


def measure(name, target, repeats, warmup, build, scope):
    """One row: medians of `repeats` timed calls per side, dense and SBP in alternating blocks."""
    dense, sbp = build()
    scope = scope or contextlib.nullcontext
    for _ in range(warmup):
        dense()
    with scope():
        for _ in range(warmup):
            sbp()
    graphs = _graphs()
    dense_times, sbp_times = [], []
    for i in range(BLOCKS):
        n = repeats * (i + 1) // BLOCKS - repeats * i // BLOCKS
        dense_times += timing.cpu_times(dense, n)
        with scope():
            sbp_times += timing.cpu_times(sbp, n)
    compiled = _graphs() - graphs
    dense_us, sbp_us = statistics.median(dense_times) * 1e6, statistics.median(sbp_times) * 1e6
    ratio = sbp_us / dense_us
    return {
        "name": name,
        "dense_us": dense_us,
        "sbp_us": sbp_us,
        "ratio": ratio,
        "target": target,
        "met": None if target is None else ratio <= target,
        "repeats": repeats,
        # Compiling while timed would put compile time into the medians: the warm-up was too short.
        "note": f"{compiled} graphs compiled while timed" if compiled else None,
    }


def run(quick, repeats, say):
    """Every row (ROWS) on one CPU thread; repeats overrides the rows' own counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, target, counts, warmup, build, scope in ROWS:
            say(f"{name} ...")
            rows.append(measure(name, target, repeats or counts[quick], warmup, build, scope))
        return rows
    finally:
        torch.set_num_threads(threads)
