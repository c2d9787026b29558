"""sbp::attention (DESIGN.md 3.3): exact softmax attention whose backward runs on kept tokens only.

The forward is dense and exact and also returns the row log-sum-exp `lse` of the FULL softmax.
sbp::attention is a composite of sbp::attention_forward, which returns (out, lse) so that the
autograd formula can save the kept rows of both (setup_context sees inputs and outputs only):

- mode "qkv": saves q_K, k_K, v_K, o_K, lse_K (compact gathers along the token axis) and keep_idx:
  nothing of size n, so activation memory ~ r and backward work ~ r^2.
- mode "q" (the video SBP's drop-query): saves q_K, o_K, lse_K, and k and v whole; gradients
  reach k and v at every token through the kept queries.

The backward recomputes the exact probabilities P_ij = exp(scale q_i.k_j - lse_i) of the full
forward from the saved lse; see reference.attention_backward (torch backend) and
sbp_kernels/triton/attention.py (triton backend).

Triton limits: head dim 16..128 (any size: tiles are padded to the next power of two, so 64 and
128 run at full efficiency, and e.g. 48, 80, 96 at the cost of the padding), float16 / bfloat16 /
float32. Other cases fall back to torch under backend="auto" (one warning) and raise ValueError
when backend="triton" is asked for explicitly.
"""
import math
import numbers

import torch

from .. import backend as _backend
from .. import reference
from ..validation import check_grad_scale, check_keep_idx, check_like, check_tensor
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, gather_rows

MODES = ("qkv", "q")
TRITON_HEAD_DIMS = (16, 128)  # inclusive range of head dims the Triton kernels take
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535  # the Triton kernels put B * h on the CUDA grid's y axis


def attention(q, k, v, keep_idx, causal=False, scale=None, mode="qkv", grad_scale=1.0, *, backend="auto"):
    """softmax(scale * q @ k^T [causal mask]) @ v exactly; gradients only through tokens keep_idx.

    q, k, v [B, h, n, d] (same shape, dtype and device); keep_idx sorted unique token positions in
    [0, n); scale defaults to d ** -0.5; causal masks key j > query i in original positions.
    mode "qkv" (default): dq, dk, dv flow only between kept tokens and are 0 on dropped tokens.
    mode "q": only kept queries propagate gradients, to every key and value token.
    Every gradient is multiplied by grad_scale.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes=None)
    q, k, v = autocast_inputs(q, k, v)
    _check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend)  # before the op's own type checks
    return torch.ops.sbp.attention(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend)


def _check_scalars(causal, scale, mode, grad_scale, backend):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a positive real number or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


def _check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, h, n, d], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_like(t, q, name, "q")
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q [B, h, n, d] = {tuple(q.shape)}, got {tuple(t.shape)}"
            )
    if q.shape[-1] < 1:
        raise ValueError(f"q, k, v must have a head dim d >= 1, got shape {tuple(q.shape)}")
    check_keep_idx(keep_idx, q.shape[2], q.device)
    _check_scalars(causal, scale, mode, grad_scale, backend)


def _limits(q):
    """Shapes and dtypes the Triton kernels refuse (backend.resolve's limits callback)."""

    def limits(name):
        if name != "triton":
            return None
        d = q.shape[-1]
        lo, hi = TRITON_HEAD_DIMS
        if not lo <= d <= hi:
            return f"head dim d={d} is outside the {lo}..{hi} the Triton attention kernels support"
        if q.dtype not in TRITON_DTYPES:
            return f"dtype {q.dtype} is not supported by the Triton attention kernels (float16, bfloat16, float32)"
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            return "the Triton interpreter has no bfloat16"
        if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
            return f"B * h = {q.shape[0] * q.shape[1]} exceeds the {_MAX_GRID_Y} programs of a grid axis"
        return None

    return limits


def resolve_backend(backend, q):
    return _backend.resolve(backend, "attention", q.device, limits=_limits(q))


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _lse_dtype(dtype):
    # float32 (DESIGN 3.3) except for float64 inputs, whose gradients keep float64 precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_forward(q, k, v, causal, scale, backend):
    """(out, lse) of exact attention: the forward kernel choice, in one place.

    - triton backend (CUDA, or CPU under TRITON_INTERPRET=1): our Triton flash forward, which
      also writes lse (sbp_kernels/triton/attention.py).
    - torch backend on CPU: aten._scaled_dot_product_flash_attention_for_cpu, PyTorch's exact
      flash-style CPU kernel (online softmax, fp32 accumulation, O(n) memory) that returns lse.
    - torch backend elsewhere: reference.attention_forward, exact math in fp32 (float64 for
      float64) over blocks of query rows, so the n x n score matrix never exists at once.
    GPU note (not measured yet, no GPU in CI): PyTorch's CUDA flash kernel
    (aten._scaled_dot_product_flash_attention, fp16/bf16, returns lse) may beat the Triton forward
    on H100; compare the two with bench/ and swap the triton branch here if it does.
    """
    if backend == "triton":
        from ..triton import attention as triton_attention  # imported lazily: triton is optional

        return triton_attention.attention_forward(q, k, v, causal, scale)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()
    return reference.attention_forward(q, k, v, causal, scale)


@torch.library.impl("sbp::attention", "CompositeImplicitAutograd")
def _attention_composite(q, k, v, keep_idx, causal=False, scale=None, mode="qkv", grad_scale=1.0, backend="auto"):
    return torch.ops.sbp.attention_forward(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend)[0]


@torch.library.impl("sbp::attention_forward", "CompositeExplicitAutograd")
def _attention_forward_kernel(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend):
    _check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend)
    return dense_forward(q, k, v, causal, _scale(scale, q), resolve_backend(backend, q))


@torch.library.register_fake("sbp::attention_forward")
def _attention_forward_fake(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend):
    _check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, backend)
    out = q.new_empty(q.shape)
    return out, q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def attention_backward(backend, dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale):
    """(dq, dk, dv), full size [B, h, n, d], from the saved tensors with the chosen backend."""
    if backend == "torch":
        return reference.attention_backward(
            dout.index_select(2, keep_idx), q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx,
            dout.shape[2], causal, scale, mode, grad_scale,
        )
    from ..triton import attention as triton_attention  # imported lazily: triton is optional

    return triton_attention.attention_backward(
        dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale
    )


def _setup_context(ctx, inputs, output):
    q, k, v, keep_idx, causal, scale, mode, grad_scale, backend = inputs
    out, lse = output
    ctx.backend = resolve_backend(backend, q)
    ctx.causal, ctx.scale, ctx.mode, ctx.grad_scale = causal, _scale(scale, q), mode, grad_scale
    ctx.mark_non_differentiable(lse)
    def kept(t):  # compact gather of the kept tokens
        return gather_rows(t, keep_idx, 2, ctx.backend)

    # mode "qkv" saves nothing of size n; drop-query saves k and v whole (every key and value
    # token takes gradients).
    k_saved, v_saved = (kept(k), kept(v)) if mode == "qkv" else (k, v)
    ctx.save_for_backward(kept(q), k_saved, v_saved, kept(out), kept(lse), keep_idx)


def _backward(ctx, grad_out, _grad_lse):
    q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx = ctx.saved_tensors
    dq, dk, dv = attention_backward(
        ctx.backend, grad_out, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx,
        ctx.causal, ctx.scale, ctx.mode, ctx.grad_scale,
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sbp::attention_forward", _backward, setup_context=_setup_context)
