"""sbp::linear_cross_entropy (DESIGN.md 3.6): an LLM's head and its loss in one op.

loss = cross_entropy(h @ weight.T + bias, target) over ALL positions, exactly (logits in float32 or float64,
as the Hugging Face causal-LM loss computes them), in chunks of rows so that the [rows, vocab]
logits never exist whole. Saved: the kept rows of h, their log-sum-exp and targets. The backward
recomputes the kept rows' logits chunk by chunk; gradients are those of the loss with dL/dlogits
zero on dropped rows (times grad_scale). reduction "mean" divides by the number of targets that
are not ignore_index (over all rows), "sum" does not.

Backends: "torch" (this file) and "triton" (sbp_kernels/triton/cross_entropy.py: the loss by a flash
forward over the vocabulary, the backward by chunks of the vocabulary; float16 / bfloat16 / float32).
"""
import numbers

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..validation import check_grad_scale, check_in_kernel, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, eager, gather_rows, needs_graph, own_keep_idx, traced

REDUCTIONS = ("mean", "sum")
_CHUNK_ELEMENTS = 1 << 23  # logits held at once (32 MiB in float32)


def linear_cross_entropy(h, weight, target, keep_idx, bias=None, ignore_index=-100, reduction="mean", grad_scale=1.0,
                         *, backend="auto"):
    """cross_entropy(h @ weight.T + bias, target) exactly, without materialising the logits;
    gradients only through positions keep_idx of dim -2.

    h [..., n, c], weight [vocab, c], bias [vocab] or None, target [..., n] int64 class indices.
    """
    h, weight, bias = autocast_inputs(h, weight, bias)
    check_args(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)


def apply(h, weight, target, keep_idx, bias=None, ignore_index=-100, reduction="mean", grad_scale=1.0, backend="auto"):
    """sbp.linear_cross_entropy on checked arguments (a step's keep set): the modules' entry point."""
    args = (h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)
    if not needs_graph(h, weight, bias):
        return _loss(*args)[0]
    if traced():
        return torch.ops.sbp.linear_cross_entropy(*args)
    return LinearCrossEntropyFunction.apply(*args)[0]


def check_args(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend):
    check_tensor(h, "h", min_ndim=2)
    check_tensor(weight, "weight", ndim=2)
    check_like(weight, h, "weight", "h")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must have shape [vocab, {h.shape[-1]}] to match h's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        check_like(bias, h, "bias", "h")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_tensor(target, "target", dtypes=(torch.int64,))
    if tuple(target.shape) != tuple(h.shape[:-1]) or target.device != h.device:
        raise ValueError(
            f"target must be an int64 tensor of shape {tuple(h.shape[:-1])} (h without its last dim) on {h.device}, "
            f"got {tuple(target.shape)} on {target.device}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_keep_idx(keep_idx, h.shape[-2], h.device)
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


def _limits(h, weight):
    """Cases the Triton kernels refuse (backend.resolve's limits callback)."""

    def limits(name):
        if name != "triton":
            return None
        from ..triton import cross_entropy as triton_ce  # imported lazily: triton is optional

        return triton_ce.unsupported(h, weight)

    return limits


def resolve_backend(backend, h, weight):
    return _backend.resolve(backend, "linear_cross_entropy", h.device, limits=_limits(h, weight))


def _chunks(rows, vocab):
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _logits(h_rows, weight, bias):
    return F.linear(h_rows, weight, bias).to(_acc_dtype(h_rows.dtype))


def _acc_dtype(dtype):
    # float32 (the Hugging Face loss upcasts the logits), float64 for float64 inputs
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend):
    """(loss, lse of the kept rows [..., n_keep] in _acc_dtype): the loss chunk by chunk over the rows."""
    if resolve_backend(backend, h, weight) == "triton":
        from ..triton import cross_entropy as triton_ce  # imported lazily: triton is optional

        total, lse = triton_ce.forward(h, weight, target, bias, ignore_index, reduction)
        return total, lse.index_select(-1, keep_idx)
    c = h.shape[-1]
    h_rows, t_rows = h.reshape(target.numel(), c), target.reshape(-1)  # (rows explicit: c may be 0)
    lse = torch.empty(h_rows.shape[0], dtype=_acc_dtype(h.dtype), device=h.device)
    total = torch.zeros((), dtype=_acc_dtype(h.dtype), device=h.device)
    for rows in _chunks(h_rows.shape[0], weight.shape[0]):
        logits = _logits(h_rows[rows], weight, bias)
        lse[rows] = torch.logsumexp(logits, -1)
        total = total + F.cross_entropy(logits, t_rows[rows], ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        total = total / (t_rows != ignore_index).sum()
    return total, lse.view(target.shape).index_select(-1, keep_idx)


@torch.library.impl("sbp::linear_cross_entropy", "CompositeImplicitAutograd")
def _linear_cross_entropy_composite(h, weight, target, keep_idx, bias=None, ignore_index=-100, reduction="mean",
                                    grad_scale=1.0, backend="auto"):
    args = (h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)
    return torch.ops.sbp.linear_cross_entropy_forward(*args)[0]


@torch.library.impl("sbp::linear_cross_entropy_forward", "CompositeExplicitAutograd")
def _linear_cross_entropy_forward_kernel(*args):
    check_in_kernel(check_args, *args)
    return _loss(*args)


@torch.library.register_fake("sbp::linear_cross_entropy_forward")
def _linear_cross_entropy_forward_fake(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale,
                                       backend):
    check_args(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)
    return h.new_empty(()), h.new_empty((*target.shape[:-1], keep_idx.shape[0]), dtype=_acc_dtype(h.dtype))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The eager face of sbp::linear_cross_entropy_forward; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend):
        return _loss(h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, target, keep_idx, bias, ignore_index, reduction, grad_scale, backend = inputs
        ctx.backend = resolve_backend(backend, h, weight)
        ctx.h_shape, ctx.ignore_index, ctx.grad_scale = h.shape, ignore_index, grad_scale
        ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[4])
        ctx.mark_non_differentiable(output[1])
        count = (target != ignore_index).sum() if reduction == "mean" else None
        h_kept = gather_rows(h, keep_idx, -2, ctx.backend)
        t_kept = target.index_select(-1, keep_idx)
        ctx.save_for_backward(h_kept, t_kept, output[1], weight, bias, keep_idx, count)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        h_kept, t_kept, lse_kept, weight, bias, keep_idx, count = ctx.saved_tensors
        c = h_kept.shape[-1]
        h_rows, t_rows, lse_rows = h_kept.reshape(t_kept.numel(), c), t_kept.reshape(-1), lse_kept.reshape(-1)
        acc = _acc_dtype(h_kept.dtype)
        scale = grad_loss.to(acc) * ctx.grad_scale
        if count is not None:
            scale = scale / count
        need_h, need_w, need_b = ctx.needs
        if ctx.backend == "triton":
            from ..triton import cross_entropy as triton_ce  # imported lazily: triton is optional

            h3 = h_kept.reshape(-1, keep_idx.shape[0], c)
            grad_h, dw, db = triton_ce.backward(
                h3, weight, bias, t_kept.reshape(h3.shape[:2]), lse_kept.reshape(h3.shape[:2]), keep_idx,
                scale.reshape(1), ctx.h_shape[-2], ctx.ignore_index, ctx.needs,
            )
            return grad_h if grad_h is None else grad_h.view(ctx.h_shape), dw, None, None, db, None, None, None, None
        dh = torch.empty_like(h_rows) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for rows in _chunks(h_rows.shape[0], weight.shape[0]):
            # dL/dlogits = softmax - onehot(target), 0 for ignored targets (logits recomputed).
            logits = _logits(h_rows[rows], weight, bias)
            t = t_rows[rows]
            valid = t != ctx.ignore_index
            dlogits = torch.exp(logits - lse_rows[rows, None])
            # minus 1 at each valid row's target (no boolean indexing: shapes stay data-independent,
            # as FakeTensorMode needs; ignored rows add -0.0 and are zeroed next)
            dlogits.scatter_add_(1, torch.where(valid, t, 0)[:, None], -valid[:, None].to(dlogits.dtype))
            dlogits = dlogits * (valid[:, None] * scale)
            if need_h:
                dh[rows] = (dlogits.to(h_rows.dtype) @ weight).to(dh.dtype)
            if need_w:
                dw += dlogits.t() @ h_rows[rows].to(acc)
            if need_b:
                db += dlogits.sum(0)
        grad_h = None
        if need_h:
            grad_h = h_rows.new_zeros(ctx.h_shape).index_copy_(-2, keep_idx.long(), dh.view(*ctx.h_shape[:-2], keep_idx.shape[0], c))
        return (
            grad_h, None if dw is None else dw.to(weight.dtype), None, None, None if db is None else db.to(bias.dtype),
            None, None, None, None,
        )


torch.library.register_autograd(
    "sbp::linear_cross_entropy_forward", LinearCrossEntropyFunction.backward,
    setup_context=LinearCrossEntropyFunction.setup_context,
)
LinearCrossEntropyFunction = eager(LinearCrossEntropyFunction)
