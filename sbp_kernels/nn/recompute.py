"""The recompute mode (DESIGN.md 4): a converted block that saves only what its kept rows cannot be
recomputed from, and recomputes its kept rows in backward.

SBPRecompute is a mixin convert adds to a block (`convert(..., recompute=True)`). In training with
grad, the block's forward runs as one autograd node:
- forward: the block's own (SBP) forward under no_grad, recording (replay.py): the exact output,
  and each attention's o_K and lse_K and each dropout's kept-rows mask. Saved: the kept rows of the
  block input (a block whose spec says so saves its input whole: ConvNeXt's depthwise conv reads
  neighbours), the records, and keep_idx.
- backward: the block's forward again on the kept rows alone, with grad, replaying the records
  (the attention returns o_K and backpropagates among the kept tokens; the dropouts apply their
  masks), then the kept rows' backward. The input gradient of dropped rows is the output gradient
  for a residual block (its shortcut) and 0 for a post-norm one.
The gradients are those of the plain SBP mode for the same keep set; memory per block is ~2 r d
per token (x_K and o_K) instead of every kept intermediate, and the work is one dense forward plus
r of a forward and backward, against checkpointing's two dense forwards and a backward.

How a family's block is cut (RecomputeSpec): where its positions are, which of its arguments carry
positions (masks, rotary embeddings: cut to the kept rows for the replay), whether it is residual,
and for a block with a neighbour-reading op its own replay.
"""
import inspect

import torch
import torch.utils._pytree as pytree

from .. import keepset, replay
from .base import SBPModule


class RecomputeSpec:
    """How to recompute a family's block on its kept rows.

    dim: the position axis of the block's input (1 for [B, n, C]; 0 for a sequence-first
    [n, B, C]; see dim_of); token_args: {argument name: a function (value, keep_idx, n) -> its kept
    part} for the arguments that carry positions (rows(...)); residual: dropped rows get the output
    gradient (a shortcut) rather than 0 (post-norm)."""

    def __init__(self, dim=1, token_args=None, residual=True):
        self.dim, self.token_args, self.residual = dim, dict(token_args or {}), residual

    def dim_of(self, block, x):
        return self.dim

    def positions(self, block, x, dim):
        """(n, layout) of the block's input x."""
        return x.shape[dim], None

    def save(self, x, keep_idx, dim):
        """What the block saves of its input: its kept rows."""
        return x.index_select(dim, keep_idx)

    def output_rows(self, dy, keep_idx, dim):
        """The kept rows of the output gradient, as the replay's output is laid out."""
        return dy.index_select(dim, keep_idx)

    def replay(self, block, saved, keep_idx, arguments):
        """(leaf inputs, output rows): the block on its kept rows, with grad."""
        x_kept = saved.detach().requires_grad_()
        first = next(iter(arguments))
        return [x_kept], _call(block, {**arguments, first: x_kept})

    def input_grad(self, dy, grads, keep_idx, dim, like):
        """The input gradient: the replay's on kept rows, the shortcut's (or 0) on dropped rows."""
        dx = dy.clone() if self.residual else dy.new_zeros(like)
        return dx.index_copy(dim, keep_idx, grads[0].to(dx.dtype))

    def cut(self, arguments, keep_idx, n):
        """The arguments of the replay: the position-carrying ones cut to the kept rows."""
        out = dict(arguments)
        for name, fn in self.token_args.items():
            if out.get(name) is not None:
                out[name] = fn(out[name], keep_idx, n)
        return out


def rows(*dims):
    """token_args entry: gather every given dim of size n (of a tensor or each tensor of a tuple)."""

    def cut(t, keep_idx, n):
        if isinstance(t, (tuple, list)):
            return type(t)(cut(u, keep_idx, n) for u in t)
        for dim in dims:
            if -t.dim() <= dim < t.dim() and t.shape[dim] == n:
                t = t.index_select(dim, keep_idx.to(t.device))
        return t

    return cut


def _call(block, arguments):
    """The block's own forward (the class after SBPRecompute in its MRO) with bound arguments."""
    kwargs = dict(arguments)
    extra = kwargs.pop("kwargs", {})
    return super(SBPRecompute, block).forward(**kwargs, **extra)


class SBPRecompute(SBPModule):
    """Mixin: a block in recompute mode (see the module docstring); recompute_spec set by convert."""

    recompute_spec = None

    def forward(self, *args, **kwargs):
        spec = self.recompute_spec
        if spec is None or not self.training or not torch.is_grad_enabled() or replay.mode() is not None:
            return super().forward(*args, **kwargs)
        return _recompute(self, spec, args, kwargs)


@torch.compiler.disable  # its records live in Python: torch.compile runs around it (a graph break)
def _recompute(block, spec, args, kwargs):
    """The recompute-mode forward of a block (one autograd node, see the module docstring)."""
    arguments = dict(inspect.signature(super(SBPRecompute, block).forward).bind(*args, **kwargs).arguments)
    first, x = next(iter(arguments.items()))
    dim = spec.dim_of(block, x)
    n, layout = spec.positions(block, x, dim)
    keep_idx = block._keep_idx(n, x.device, layout=layout)
    leaves = [t for name, t in _tensors(arguments) if t.requires_grad and name != first]
    params = [p for p in block.parameters() if p.requires_grad]
    run = _Run(block, spec, arguments, first, keep_idx, n, dim)
    return _Recompute.apply(run, x, *leaves, *params)


def _tensors(arguments):
    for name, value in arguments.items():
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor):
                yield name, t


class _Run:
    """What the recompute node needs besides tensors: the block, its spec, its arguments (without
    its input, which is not kept alive), the keep set."""

    def __init__(self, block, spec, arguments, first, keep_idx, n, dim):
        self.block, self.spec, self.arguments, self.first = block, spec, arguments, first
        self.keep_idx, self.n, self.dim = keep_idx, n, dim


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, x, *leaves_and_params):
        record = replay.Record(run.keep_idx, run.n)
        with torch.no_grad(), replay.recording(record):
            out = _call(run.block, run.arguments)
        run.arguments = {**run.arguments, run.first: None}  # only the saved part of x lives on
        ctx.run, ctx.x_shape, ctx.n_records = run, x.shape, len(record.items)
        # The records go through save_for_backward too (saved-tensor hooks see them: memory
        # accounting, offloading), flattened.
        records, ctx.records_spec = pytree.tree_flatten(record.items)
        ctx.save_for_backward(run.spec.save(x, run.keep_idx, run.dim), run.keep_idx, *records)
        return out

    @staticmethod
    def backward(ctx, dy):
        saved, keep_idx, *records = ctx.saved_tensors
        run, spec = ctx.run, ctx.run.spec
        record = replay.Record(keep_idx, run.n)
        record.items = pytree.tree_unflatten(records, ctx.records_spec)
        leaves = [t for name, t in _tensors(run.arguments) if t.requires_grad and name != run.first]
        params = [p for p in run.block.parameters() if p.requires_grad]
        n_keep = keep_idx.shape[0]
        arguments = spec.cut(run.arguments, keep_idx, run.n)
        every_row = keepset.Step(keep_idx={n_keep: torch.arange(n_keep, device=keep_idx.device)})
        with torch.enable_grad(), replay.replaying(record), keepset.enter(every_row):
            inputs, out_rows = spec.replay(run.block, saved, keep_idx, arguments)
            grads = torch.autograd.grad(
                out_rows, inputs + leaves + params, spec.output_rows(dy, keep_idx, run.dim), allow_unused=True
            )
        dx = spec.input_grad(dy, grads, keep_idx, run.dim, ctx.x_shape)
        return (None, dx, *grads[len(inputs):])
