"""sbp::attention (DESIGN.md 3.3): exact softmax attention whose backward runs on kept tokens only.

The forward is dense and exact and also returns the row log-sum-exp `lse` of the FULL softmax.
sbp::attention is a composite of sbp::attention_forward, which returns (out, lse, the kept rows of
the dropout mask) so that the autograd formula can save kept rows (setup_context sees inputs and
outputs only):

- mode "qkv": saves q_K, k_K, v_K, o_K, lse_K (compact gathers along the token axis) and keep_idx:
  nothing of size n, so activation memory ~ r and backward work ~ r^2.
- mode "q" (the video SBP's drop-query): saves q_K, o_K, lse_K, and k and v whole; gradients
  reach k and v at every token through the kept queries.

What the op takes besides: grouped-query attention (k, v with h_kv heads dividing h: query head j
reads kv head j // (h / h_kv), and no repeated copy is made or saved); a key padding mask [B, n]
(True = a real token); an additive bias broadcastable to [B, h, n, n] (BEiT's and Swin's relative
position bias, which may take a gradient: its kept block is saved); attention dropout (the mask is
drawn as the dense math path draws it, so the same seed gives the same mask on CPU, and its kept
block is saved as bool). A query whose keys are all masked gets out = 0 and lse = +inf.

The output is laid out [B, n, h, d] in memory (returned as its [B, h, n, d] view), as the models'
next step reshapes it to [B, n, h * d]: that reshape is a view, and the gather of o_K is shared
with the output projection's (keepset.Step.gather), so o_K is saved once.

Backends: "triton" (sbp_kernels/triton/attention.py: flash forward, kept-token backward; no bias
or dropout: those cases run torch) and "torch" (reference.py; on CPU the forward is PyTorch's own
flash kernel, aten._scaled_dot_product_flash_attention_for_cpu).
"""
import math

import torch

from .. import backend as _backend
from .. import keepset, reference, replay
from ..validation import check_grad_scale, check_in_kernel, check_keep_idx, check_like, check_tensor, is_real
from . import _library  # noqa: F401  (declares the schemas)
from ._common import autocast_inputs, cpp_eager, cpp_face, eager, gather_rows, needs_graph, own_keep_idx, traced

MODES = ("qkv", "q")

_ATTENTION_EAGER = cpp_face("attention_eager")


def attention(q, k, v, keep_idx, causal=False, scale=None, mode="qkv", grad_scale=1.0, key_padding_mask=None,
              attn_bias=None, dropout_p=0.0, *, backend="auto"):
    """softmax(scale * q @ k^T + attn_bias [masks]) @ v exactly; gradients only through tokens keep_idx.

    q [B, h, n, d]; k, v [B, h_kv, n, d] with h_kv dividing h; keep_idx sorted unique token
    positions in [0, n); scale defaults to d ** -0.5; causal masks key j > query i in original
    positions; key_padding_mask [B, n] bool (True = a real token) or None; attn_bias None or an
    additive float bias broadcastable to [B, h, n, n]; dropout_p: attention dropout.
    mode "qkv" (default): dq, dk, dv flow only between kept tokens and are 0 on dropped tokens.
    mode "q": only kept queries propagate gradients, to every key and value token.
    Every gradient is multiplied by grad_scale.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes=None)
    q, k, v = autocast_inputs(q, k, v)
    check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend)


def apply(q, k, v, keep_idx, causal=False, scale=None, mode="qkv", grad_scale=1.0, key_padding_mask=None,
          attn_bias=None, dropout_p=0.0, backend="auto"):
    """sbp.attention on checked arguments (a step's keep set): the modules' entry point."""
    args = (q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend)
    if replay.mode() == "replay":
        return _replayed(q, k, v, causal, scale, key_padding_mask, attn_bias, dropout_p, backend)
    if traced():
        if not needs_graph(q, k, v, attn_bias):
            return _forward(*args)[0]
        return torch.ops.sbp.attention(*args)
    if not needs_graph(q, k, v, attn_bias):
        out, lse, drop_kept = _forward(*args)
        if replay.mode() == "record":
            replay.current().put((_kept_out(out, keep_idx), lse.index_select(2, keep_idx), drop_kept))
        return out
    if (q.is_cpu and mode == "qkv" and attn_bias is None and dropout_p == 0 and grad_scale == 1.0
            and cpp_eager(resolve_backend(backend, q, k, key_padding_mask))):
        out, out_kept_rows = _ATTENTION_EAGER(q, k, v, keep_idx, causal, _scale(scale, q), key_padding_mask)
        _share_kept_out(out, keep_idx, out_kept_rows)
        return out
    return AttentionFunction.apply(*args)[0]


def check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, h, n, d], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_like(t, q, name, "q")
    batch, heads, n, d = q.shape
    kv = k.shape[1]
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (batch, n, d) or kv < 1 or heads % kv:
        raise ValueError(
            f"k and v must have shape [B, h_kv, n, d] = [{batch}, h_kv, {n}, {d}] with h_kv dividing h={heads}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if d < 1:
        raise ValueError(f"q, k, v must have a head dim d >= 1, got shape {tuple(q.shape)}")
    check_keep_idx(keep_idx, n, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if not is_real(scale):
            raise TypeError(f"scale must be a positive real number or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_grad_scale(grad_scale)
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (batch, n) or key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must be a bool [B, n] = [{batch}, {n}] tensor on {q.device}, got "
                f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}"
            )
    if attn_bias is not None:
        check_tensor(attn_bias, "attn_bias")
        full = (batch, heads, n, n)
        shape = tuple(attn_bias.shape)
        if (
            attn_bias.device != q.device
            or not 2 <= len(shape) <= 4
            or any(s not in (1, f) for s, f in zip(shape, full[4 - len(shape):]))
        ):
            raise ValueError(
                f"attn_bias must be broadcastable to [B, h, n, n] = {list(full)} on {q.device}, got "
                f"{list(shape)} on {attn_bias.device}"
            )
    if not is_real(dropout_p) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    _backend.check_name(backend)


def _limits(q, k, key_padding_mask, attn_bias, dropout_p):
    """Cases the Triton kernels refuse (backend.resolve's limits callback)."""

    def limits(name):
        if name != "triton":
            return None
        if attn_bias is not None:
            return "the Triton attention kernels take no additive bias"
        if dropout_p > 0:
            return "the Triton attention kernels have no attention dropout"
        from ..triton import attention as triton_attention  # imported lazily: triton is optional

        return triton_attention.unsupported(q, k, key_padding_mask)

    return limits


def resolve_backend(backend, q, k, key_padding_mask=None, attn_bias=None, dropout_p=0.0):
    return _backend.resolve(backend, "attention", q.device, limits=_limits(q, k, key_padding_mask, attn_bias, dropout_p))


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _lse_dtype(dtype):
    # float32 (DESIGN 3.3) except for float64 inputs, whose gradients keep float64 precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bnhd(out):
    """out [B, h, n, d] as the view of a [B, n, h, d] buffer (a copy unless it is one already)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _no_key_rows(n, causal, key_padding_mask):
    """[B, 1, n] bool: query rows without any key to attend to (padding keys only), or None."""
    if key_padding_mask is None:
        return None
    valid = key_padding_mask.cumsum(1) if causal else key_padding_mask.sum(1, keepdim=True).expand(-1, n)
    return (valid == 0)[:, None]


def dense_forward(q, k, v, causal, scale, key_padding_mask, attn_bias, backend):
    """(out, lse) of exact attention without dropout: the forward kernel choice, in one place.

    - triton backend (CUDA, or CPU under TRITON_INTERPRET=1): our Triton flash forward, which
      also writes lse (sbp_kernels/triton/attention.py).
    - torch backend on CPU: aten._scaled_dot_product_flash_attention_for_cpu, PyTorch's exact
      flash-style CPU kernel (online softmax, fp32 accumulation, O(n) memory) that returns lse;
      masks and the bias go in as one additive mask.
    - torch backend elsewhere: reference.attention_forward, exact math in fp32 (float64 for
      float64) over blocks of query rows, so the n x n score matrix never exists at once.
    """
    if backend == "triton":
        from ..triton import attention as triton_attention  # imported lazily: triton is optional

        return triton_attention.attention_forward(q, k, v, causal, scale, key_padding_mask)
    if q.device.type != "cpu":
        out, lse = reference.attention_forward(q, k, v, causal, scale, key_padding_mask, attn_bias)
        return _bnhd(out), lse
    # the CPU kernel takes a 2-D or 4-D mask: a [h, n, n] bias (Swin's, BEiT's) gets its batch dim
    mask = attn_bias if attn_bias is None or attn_bias.dim() != 3 else attn_bias[None]
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]
        mask = pad if mask is None else mask + pad
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
    )
    lse = lse.to(_lse_dtype(q.dtype))
    empty = _no_key_rows(q.shape[2], causal, key_padding_mask)
    if empty is not None:  # rows with every key masked: out 0 (as the kernel gives), lse +inf
        lse = lse.masked_fill(empty, float("inf"))
    return _bnhd(out), lse.contiguous()


def _dropout_forward(q, k, v, causal, scale, key_padding_mask, attn_bias, dropout_p):
    """(out, lse, mask) with attention dropout, computed as PyTorch's math path does (softmax of
    the whole score matrix, then the dropout of its [B, h, n, n] probabilities), so that the same
    seed draws the same mask; torch backend only."""
    heads, kv = q.shape[1], k.shape[1]
    acc = _lse_dtype(q.dtype)
    k_r, v_r = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    s = (q.to(acc) @ k_r.to(acc).transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(acc)
    pos = torch.arange(q.shape[2], device=q.device)
    mask = reference._masked(pos, pos, causal, key_padding_mask)
    if mask is not None:
        s = s.masked_fill(mask.squeeze(2), float("-inf"))
    lse = torch.logsumexp(s, -1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    p_drop, keep = torch.native_dropout(torch.exp(s - lse[..., None]).to(q.dtype), dropout_p, True)
    return _bnhd(p_drop @ v_r), lse, keep


def _forward(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend):
    """(out, lse, kept rows of the dropout mask (empty without dropout))."""
    scale = _scale(scale, q)
    if dropout_p > 0:
        out, lse, drop_mask = _dropout_forward(q, k, v, causal, scale, key_padding_mask, attn_bias, dropout_p)
        kept = drop_mask.index_select(2, keep_idx)
        return out, lse, kept.index_select(3, keep_idx) if mode == "qkv" else kept
    be = resolve_backend(backend, q, k, key_padding_mask, attn_bias, dropout_p)
    out, lse = dense_forward(q, k, v, causal, scale, key_padding_mask, attn_bias, be)
    return out, lse, q.new_empty((0,), dtype=torch.bool)


@torch.library.impl("sbp::attention", "CompositeImplicitAutograd")
def _attention_composite(q, k, v, keep_idx, causal=False, scale=None, mode="qkv", grad_scale=1.0,
                         key_padding_mask=None, attn_bias=None, dropout_p=0.0, backend="auto"):
    return torch.ops.sbp.attention_forward(
        q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend
    )[0]


@torch.library.impl("sbp::attention_forward", "CompositeExplicitAutograd")
def _attention_forward_kernel(*args):
    check_in_kernel(check_args, *args)
    return _forward(*args)


@torch.library.register_fake("sbp::attention_forward")
def _attention_forward_fake(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias,
                            dropout_p, backend):
    check_args(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend)
    batch, heads, n, d = q.shape
    out = q.new_empty((batch, n, heads, d)).transpose(1, 2)
    lse = q.new_empty((batch, heads, n), dtype=_lse_dtype(q.dtype))
    n_keep = keep_idx.shape[0]
    mask_shape = (batch, heads, n_keep, n_keep if mode == "qkv" else n) if dropout_p > 0 else (0,)
    return out, lse, q.new_empty(mask_shape, dtype=torch.bool)


def attention_backward(backend, dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode,
                       grad_scale, key_padding_mask, bias_kept, drop_kept, dropout_p, bias_needs_grad=False):
    """(dq, dk, dv) full size and the gradient of the kept bias block, with the chosen backend."""
    if backend == "torch" and _cpu_flash_backward_applies(q_kept, mode, dropout_p, bias_needs_grad):
        return _cpu_flash_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale,
                                   grad_scale, key_padding_mask, bias_kept)
    if backend == "torch":
        return reference.attention_backward(
            dout.index_select(2, keep_idx), q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx,
            dout.shape[2], causal, scale, mode, grad_scale, key_padding_mask, bias_kept,
            drop_kept if dropout_p > 0 else None, dropout_p,
        )
    from ..triton import attention as triton_attention  # imported lazily: triton is optional

    grads = triton_attention.attention_backward(
        dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale,
        key_padding_mask,
    )
    return (*grads, None)


def _cpu_flash_backward_applies(q, mode, dropout_p, bias_needs_grad):
    return q.device.type == "cpu" and mode == "qkv" and dropout_p == 0 and not bias_needs_grad


def _cpu_flash_backward(dout, q_kept, k_kept, v_kept, out_kept, lse_kept, keep_idx, causal, scale, grad_scale,
                        key_padding_mask, bias_kept):
    """The torch backend's kept-token backward on CPU (mode "qkv", no dropout, no bias gradient):
    PyTorch's own fused flash-attention backward on the kept rows, given the saved lse of the FULL
    softmax, computes exactly the formulas of DESIGN.md 3.3 (P_ij = exp(scale q_i.k_j - lse_i) on
    kept keys, D_i = dO_i.o_i), in one call instead of the reference's blocks of ops. keep_idx is
    sorted, so causal masking of the compact rows is causal masking in original positions; the key
    padding mask and the bias go in as one additive mask. A keep set of all n rows (r = 1, or the
    compact rows of a replay) is 0..n-1: dO and the gradients are then used as they are, without a
    gathered copy or a scatter into zeros."""
    batch, heads, n = dout.shape[:3]
    every_row = keep_idx.shape[0] == n
    dout_kept = dout if every_row else dout.index_select(2, keep_idx)
    if grad_scale != 1.0:
        dout_kept = dout_kept * grad_scale
    mask = None if bias_kept is None else bias_kept.reshape((1,) * (4 - bias_kept.dim()) + tuple(bias_kept.shape))
    if key_padding_mask is not None:
        valid = key_padding_mask.index_select(1, keep_idx)
        pad = torch.zeros(valid.shape, dtype=q_kept.dtype, device=q_kept.device).masked_fill(~valid, float("-inf"))
        mask = pad[:, None, None, :] if mask is None else mask + pad[:, None, None, :]
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout_kept, q_kept, k_kept, v_kept, out_kept, lse_kept.to(torch.float32) if q_kept.dtype != torch.float64
        else lse_kept, 0.0, causal, attn_mask=None if mask is None else mask.to(q_kept.dtype), scale=scale,
    )
    if every_row:
        return (*grads, None)

    def full(t):  # the kept rows in zeros of the token axis
        return t.new_zeros((*t.shape[:2], n, t.shape[3])).index_copy_(2, keep_idx.long(), t)

    return (*map(full, grads), None)


def _share_kept_out(out, keep_idx, out_kept_rows):
    """Hands the C++ face's o_K rows to the step, for the output projection's gather to reuse."""
    step = keepset.current()
    if step is not None:
        batch, heads, n, d = out.shape
        step.gather(out.transpose(1, 2).reshape(batch, n, heads * d), keep_idx, 1, lambda *args: out_kept_rows)


def _kept_out(out, keep_idx, backend=None):
    """o_K, gathered from the [B, n, h * d] view that the output projection reads (one copy
    between them, keepset.Step.gather), as a [B, h, n_keep, d] view."""
    batch, heads, n, d = out.shape
    rows = out.transpose(1, 2).reshape(batch, n, heads * d)
    return gather_rows(rows, keep_idx, 1, backend).view(batch, -1, heads, d).transpose(1, 2)


def _replayed(q, k, v, causal, scale, key_padding_mask, attn_bias, dropout_p, backend):
    """Attention while a recorded block replays its kept rows (replay.py): the recorded o_K, with
    the kept-token backward on the recomputed q_K, k_K, v_K. A bias the block builds for all n
    positions (BEiT's relative position bias) is cut to the kept block here (differentiably: its
    table still takes the gradient)."""
    record = replay.current()
    out_kept, lse_kept, drop_kept = record.take()
    positions = record.keep_idx.to(q.device)
    if attn_bias is not None:
        for dim in (-2, -1):
            if attn_bias.shape[dim] == record.n and record.n != q.shape[2]:
                attn_bias = attn_bias.index_select(dim, positions)
    return AttentionReplay.apply(
        q, k, v, attn_bias, out_kept, lse_kept, drop_kept, causal, _scale(scale, q), key_padding_mask, dropout_p,
        backend,
    )


class AttentionReplay(torch.autograd.Function):
    """The recorded o_K as the output; backward: the op's kept-token backward (attention_backward,
    the backend chosen as the op chooses it) with every compact row kept. The kept positions are
    sorted, so causal masking of the compact rows is causal masking in the original positions; the
    key padding mask, the bias and the dropout mask come cut to the kept rows and keys."""

    @staticmethod
    def forward(q, k, v, attn_bias, out_kept, lse_kept, drop_kept, causal, scale, key_padding_mask, dropout_p,
                backend):
        return out_kept.view_as(out_kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_bias, out_kept, lse_kept, drop_kept, causal, scale, key_padding_mask, dropout_p, backend = inputs
        ctx.backend = resolve_backend(backend, q, k, key_padding_mask, attn_bias, dropout_p)
        ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
        ctx.bias_needs_grad = attn_bias is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(q, k, v, attn_bias, out_kept, lse_kept, drop_kept, key_padding_mask)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out_kept, lse_kept, drop_kept, key_padding_mask = ctx.saved_tensors
        every_row = torch.arange(q.shape[2], device=q.device)
        dq, dk, dv, dbias = attention_backward(
            ctx.backend, dout, q, k, v, out_kept, lse_kept, every_row, ctx.causal, ctx.scale, "qkv", 1.0,
            key_padding_mask, bias, drop_kept, ctx.dropout_p, ctx.bias_needs_grad,
        )
        return dq, dk, dv, dbias if ctx.bias_needs_grad else None, None, None, None, None, None, None, None, None


def _kept_bias(attn_bias, keep_idx, mode):
    """The bias at kept query rows and saved key columns (dims of size 1 stay)."""
    bias = attn_bias if attn_bias.shape[-2] == 1 else attn_bias.index_select(-2, keep_idx)
    if mode == "qkv" and bias.shape[-1] != 1:
        bias = bias.index_select(-1, keep_idx)
    return bias


def _full_bias_grad(dbias_kept, bias_shape, keep_idx, mode):
    """The kept block's gradient scattered into zeros of the bias's shape."""
    grad = dbias_kept
    if mode == "qkv" and bias_shape[-1] != 1:
        grad = grad.new_zeros((*grad.shape[:-1], bias_shape[-1])).index_copy_(-1, keep_idx.long(), grad)
    if bias_shape[-2] != 1:
        grad = grad.new_zeros((*grad.shape[:-2], bias_shape[-2], grad.shape[-1])).index_copy_(-2, keep_idx.long(), grad)
    return grad


class AttentionFunction(torch.autograd.Function):
    """The eager face of sbp::attention_forward; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend):
        return _forward(q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p,
                        backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, keep_idx, causal, scale, mode, grad_scale, key_padding_mask, attn_bias, dropout_p, backend = inputs
        out, lse, drop_kept = output
        ctx.backend = resolve_backend(backend, q, k, key_padding_mask, attn_bias, dropout_p)
        ctx.causal, ctx.scale, ctx.mode, ctx.grad_scale = causal, _scale(scale, q), mode, grad_scale
        ctx.dropout_p = dropout_p
        ctx.bias_needs_grad = attn_bias is not None and ctx.needs_input_grad[9]
        ctx.mark_non_differentiable(lse, drop_kept)
        batch, heads, n, d = q.shape

        def kept(t):  # compact gather of the kept tokens
            return gather_rows(t, keep_idx, 2, ctx.backend)

        # o_K is gathered from the [B, n, h * d] view that the output projection reads: one copy.
        out_rows = out.transpose(1, 2).reshape(batch, n, heads * d)
        out_kept = gather_rows(out_rows, keep_idx, 1, ctx.backend).view(batch, keep_idx.shape[0], heads, d)
        out_kept = out_kept.transpose(1, 2)
        # mode "qkv" saves nothing of size n; drop-query saves k and v whole (every key and value
        # token takes gradients).
        k_saved, v_saved = (kept(k), kept(v)) if mode == "qkv" else (k, v)
        bias_kept = None if attn_bias is None else _kept_bias(attn_bias, keep_idx, mode)
        ctx.bias_shape = None if attn_bias is None else attn_bias.shape
        ctx.save_for_backward(
            kept(q), k_saved, v_saved, out_kept, lse.index_select(2, keep_idx), keep_idx, key_padding_mask, bias_kept,
            drop_kept,
        )

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_mask):
        q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, key_padding_mask, bias_kept, drop_kept = ctx.saved_tensors
        dq, dk, dv, dbias = attention_backward(
            ctx.backend, grad_out, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, ctx.causal, ctx.scale,
            ctx.mode, ctx.grad_scale, key_padding_mask, bias_kept, drop_kept, ctx.dropout_p, ctx.bias_needs_grad,
        )
        if ctx.bias_needs_grad:
            dbias = _full_bias_grad(dbias, ctx.bias_shape, keep_idx, ctx.mode)
        else:
            dbias = None
        return dq, dk, dv, None, None, None, None, None, None, dbias, None, None


torch.library.register_autograd(
    "sbp::attention_forward", AttentionFunction.backward, setup_context=AttentionFunction.setup_context
)
AttentionFunction = eager(AttentionFunction)
AttentionReplay = eager(AttentionReplay)
