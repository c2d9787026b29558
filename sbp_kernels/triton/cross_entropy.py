"""Triton kernels of sbp::linear_cross_entropy (DESIGN.md 3.6): an LLM's head and its loss without
the [rows, vocab] logits.

Rows are the flattened (batch, position) pairs of h [B, n, c] (read through three strides, like
gemm.py's row tensors). A logit is accumulated in fp32, plus the bias, rounded to h's dtype as
F.linear's output is, and taken in fp32 from there, as the Hugging Face causal-LM loss upcasts it.

Forward, one launch and a few torch reductions:
- `_lse_kernel`, grid (row tiles, vocab splits): each program runs ONE software-pipelined loop
  over the (vocab tile, K step) pairs of its share of the vocabulary (the GEMM's K loop flattened
  over the vocab tiles, so the pipeline does not drain between tiles). After a tile's last K step
  its logits update the rows' running max and sum of exponentials (a flash forward over the vocab
  axis) and give up the target's logit. It writes the rows' log-sum-exp over its split
  [splits, rows] and the target logits [rows] (left NaN where no split holds the target: a target
  outside [0, vocab) that is not ignore_index makes the loss NaN). The splits make the grid a whole
  number of waves (within 5%): 4 x 2048 rows are only 64 row tiles for 132 multiprocessors.
- on the host: lse = logsumexp over the splits, loss = lse - target logit (0 on ignore_index rows)
  summed, divided by the count of targets for "mean": torch reductions, deterministic.

Backward on the kept rows, per chunk of the vocabulary (at most _CHUNK_ELEMENTS dlogits at once):
1. `_dlogits_kernel`: a kept-rows logits tile (K loop over c, pipelined) whose epilogue writes
   dlogits = (exp(logits - lse) - onehot(target)) * scale, 0 on ignore_index rows, in h's dtype;
   scale (grad_loss * grad_scale / count) is read from device memory: no host sync;
2. grad_weight[chunk] = dlogits^T @ h_K and grad_bias[chunk] = its column sums: gemm.weight_gemm
   (split-K when its tiles fill less than a wave), not launched for a frozen weight;
3. `_dh_kernel`: dh_K += dlogits @ weight[chunk], accumulated in fp32 over the chunks; the last
   chunk writes it at keep_idx in h's dtype, and zeros into every dropped row, in one launch.
Each product has an output far larger than a program holds ([kept rows, c] and [vocab, c], c =
2048..4096) and reduces over the other product's axis (vocab for dh, rows for dW), so one kernel
consuming each dlogits tile in both would add partial outputs across programs (atomics, not
deterministic, and tens of GB of traffic at a Llama head); a chunk of dlogits in h's dtype lets
each product be a plain GEMM with its whole reduction in one program, and bounds the memory.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 products are IEEE unless
torch.backends.cuda.matmul.allow_tf32 is set (like torch.matmul). Constants are kernel arguments.
Exposed as torch.library ops with fake kernels (`sbp::linear_cross_entropy_forward_triton`,
`sbp::linear_cross_entropy_backward_triton`; library.kernel_op: inductor sees the kernels on a
GPU); `unsupported()` says what the kernels cannot run.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemm
from .gemm import device_guard, dot_precision, loop_bound
from .linear import kept_rows_sum, not_needed
from .library import call, kernel_op, traceable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dlogits held at once by the backward (64 MiB in bf16): one chunk of the vocabulary for all kept
# rows; 8192 of Llama-3's 128256 classes at 4 x 1024 kept tokens.
_CHUNK_ELEMENTS = 1 << 25


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logits(acc, b_ptr, stride_b, cols, col_ok, h_ptr, HAS_BIAS: tl.constexpr):
    """fp32 logits of a tile: acc (+ bias), rounded to h's dtype as F.linear's output is."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.autotune(configs=gemm._configs(), key=["R", "V", "C", "splits", "HAS_BIAS", "DOT_PRECISION"])
@triton.jit
def _lse_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, tlogit_ptr,
    R, V, C, positions, splits,
    stride_hb, stride_hr, stride_hc, stride_wv, stride_wc, stride_b,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Rows [pid_m * BLOCK_M, +BLOCK_M) over vocab tiles [split * per, (split + 1) * per)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    h_rows = gemm._row_offsets(offs_m, positions, t_ptr, stride_hb, stride_hr, False)
    target = tl.load(t_ptr + offs_m, mask=mask_m, other=0)
    per = tl.cdiv(tl.cdiv(V, BLOCK_N), splits)
    first = split * per
    tiles = tl.minimum(per, tl.cdiv(V, BLOCK_N) - first)  # <= 0: an empty split
    k_steps = tl.cdiv(C, BLOCK_K)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, loop_bound(tiles * k_steps)):
        k_step = it % k_steps
        cols = (first + it // k_steps) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k_step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        col_ok = cols < V
        a = tl.load(h_ptr + h_rows[:, None] + offs_k[None, :] * stride_hc, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wv + offs_k[:, None] * stride_wc,
                    mask=col_ok[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if k_step == k_steps - 1:  # the tile's logits are complete: online max / sum-exp
            logits = _logits(acc, b_ptr, stride_b, cols, col_ok, h_ptr, HAS_BIAS)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            p = tl.math.exp2((logits - m_new[:, None]) * 1.4426950408889634)
            l_i = l_i * tl.math.exp2((m_i - m_new) * 1.4426950408889634) + tl.sum(p, 1)
            m_i = m_new
            t_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), 1)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tl.store(lse_ptr + split * R + offs_m, m_i + tl.log(l_i), mask=mask_m)  # -inf for an empty split
    mine = (target >= first * BLOCK_N) & (target < tl.minimum(first + tiles, tl.cdiv(V, BLOCK_N)) * BLOCK_N)
    tl.store(tlogit_ptr + offs_m, t_logit, mask=mask_m & mine & (target < V))


@triton.autotune(configs=gemm._configs(), key=["M", "N", "K", "HAS_BIAS", "DOT_PRECISION"])
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, d_ptr,
    M, N, K, rows_per_batch, v_start, ignore_index,
    stride_hb, stride_hr, stride_hc, stride_wv, stride_wc, stride_b, stride_dm,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """d[r, j] = (softmax(logits[r])[v] - (v == target[r])) * scale for kept rows r, classes
    v = v_start + j of the chunk (w_ptr, b_ptr point at class v_start)."""
    offs_m, offs_n = gemm._tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    h_rows = gemm._row_offsets(offs_m, rows_per_batch, t_ptr, stride_hb, stride_hr, False)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(h_ptr + h_rows[:, None] + offs_k[None, :] * stride_hc, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wv + offs_k[:, None] * stride_wc,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    logits = _logits(acc, b_ptr, stride_b, offs_n, mask_n, h_ptr, HAS_BIAS)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    target = tl.load(t_ptr + offs_m, mask=mask_m, other=0)
    row_scale = tl.where(target != ignore_index, tl.load(scale_ptr), 0.0)
    p = tl.math.exp2((logits - lse[:, None]) * 1.4426950408889634)
    d = (p - tl.where((v_start + offs_n)[None, :] == target[:, None], 1.0, 0.0)) * row_scale[:, None]
    tl.store(d_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :], d.to(d_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# c_ptr restored after each benchmarked config: with ACC_IN it is also acc_ptr, added to in place.
@triton.autotune(configs=gemm._configs(), key=["M", "N", "K", "ACC_IN", "C_IDX", "DOT_PRECISION"],
                 restore_value=["c_ptr"])
@triton.jit
def _dh_kernel(
    a_ptr, b_ptr, acc_ptr, c_ptr, idx_ptr, keep_mask_ptr,
    M, N, K, rows_per_batch, positions, out_rows,
    stride_am, stride_bk, stride_bn, stride_cb, stride_cr, stride_cc,
    ACC_IN: tl.constexpr, C_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = dlogits @ weight chunk (+ the fp32 sum of the earlier chunks, ACC_IN), rows written at
    keep_idx (C_IDX; the programs past the tiles zero-fill the dropped rows) or compact."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if pid < num_tiles:
        offs_m, offs_n = gemm._tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        mask_c = mask_m[:, None] & mask_n[None, :]
        if ACC_IN:
            acc += tl.load(acc_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask_c, other=0.0)
        c_rows = gemm._row_offsets(offs_m, rows_per_batch, idx_ptr, stride_cb, stride_cr, C_IDX)
        tl.store(c_ptr + c_rows[:, None] + offs_n[None, :] * stride_cc, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
    else:
        if C_IDX:
            gemm._zero_tile(pid - num_tiles, c_ptr, keep_mask_ptr, N, positions, out_rows, stride_cb, stride_cr,
                            stride_cc, BLOCK_M, BLOCK_N)


# ------------------------------------------------------------------------------------------------
# launchers


def unsupported(h, weight):
    """Why the Triton kernels cannot run linear_cross_entropy of h [..., n, c] with weight
    [vocab, c], or None when they can. The op layer falls back to torch on a reason."""
    if h.dtype not in DTYPES:
        return f"dtype {h.dtype} is not supported by the Triton cross-entropy kernels (float16, bfloat16, float32)"
    if h.dtype == torch.bfloat16 and h.device.type == "cpu":
        return "the Triton interpreter has no bfloat16"
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        return f"weight {tuple(weight.shape)} has no classes or no channels"
    return None


def _rows(t):
    """t [..., n, c] as a [B, n, c] view (a copy where the leading dims do not flatten)."""
    return t.reshape(-1, *t.shape[-2:]) if t.dim() != 3 else t


def _vocab_splits(row_tiles, vocab_tiles, sms):
    """Vocab splits per row tile: the fewest with which row_tiles * splits programs are a whole
    number of waves on `sms` multiprocessors within 5% (at most one split per vocab tile)."""
    if row_tiles >= 20 * sms:  # the last wave is at most 5% of the work
        return 1
    rounds = 1
    while True:
        splits = rounds * sms // row_tiles
        if splits >= vocab_tiles or (splits and splits * row_tiles >= 0.95 * rounds * sms):
            return max(1, min(splits, vocab_tiles))
        rounds += 1


def _check_forward(h, weight, target, bias):
    if h.dim() < 2 or h.dtype not in DTYPES or weight.dtype != h.dtype or weight.device != h.device \
            or weight.dim() != 2 or weight.shape[1] != h.shape[-1] or not weight.shape[0] or not h.shape[-1]:
        raise ValueError(f"h [..., n, c] and weight [vocab, c] must be float16 / bfloat16 / float32 tensors of one "
                         f"dtype and device with c, vocab > 0, got h {h.dtype} {tuple(h.shape)} and weight "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (bias.dtype != h.dtype or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be a [{weight.shape[0]}] {h.dtype} tensor, got {bias.dtype} {tuple(bias.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"target must be int64 of shape {tuple(h.shape[:-1])}, got {target.dtype} "
                         f"{tuple(target.shape)}")


@kernel_op("sbp::linear_cross_entropy_forward_triton")
def _forward_op(
    h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int, reduction: str
) -> Tuple[Tensor, Tensor]:
    return forward_kernels(h, weight, target, bias, ignore_index, reduction)


def forward_kernels(h, weight, target, bias, ignore_index, reduction):
    """The launch of the op above (also what the offline compile report replays): (loss float32,
    lse float32 of every row, target's shape)."""
    _check_forward(h, weight, target, bias)
    h3 = _rows(h)
    rows, vocab, c = h3.shape[0] * h3.shape[1], weight.shape[0], weight.shape[1]
    t_rows = target.reshape(-1).contiguous()
    valid = t_rows != ignore_index
    configs = _lse_kernel.configs
    splits = _vocab_splits(max(1, triton.cdiv(rows, max(cfg.kwargs["BLOCK_M"] for cfg in configs))),
                           triton.cdiv(vocab, max(cfg.kwargs["BLOCK_N"] for cfg in configs)), gemm._sm_count(h.device))
    lse_parts = torch.empty((splits, rows), dtype=torch.float32, device=h.device)
    t_logit = torch.full((rows,), float("nan"), dtype=torch.float32, device=h.device)
    if rows:
        with device_guard(h):
            traceable(_lse_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)](
                h3, weight, bias if bias is not None else weight, t_rows, lse_parts, t_logit,
                rows, vocab, c, h3.shape[1], splits, *h3.stride(), *weight.stride(),
                bias.stride(0) if bias is not None else 0,
                HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(h.dtype),
            )
    lse = torch.logsumexp(lse_parts, 0)
    loss = torch.where(valid, lse - t_logit, 0.0).sum()
    if reduction == "mean":
        loss = loss / valid.sum()
    return loss, lse.view(target.shape)


@_forward_op.register_fake
def _forward_fake(h, weight, target, bias, ignore_index, reduction):
    _check_forward(h, weight, target, bias)
    return h.new_empty((), dtype=torch.float32), h.new_empty(target.shape, dtype=torch.float32)


def forward(h, weight, target, bias, ignore_index, reduction):
    """(loss, lse [..., n]) of cross_entropy(h @ weight.T + bias, target), both float32: the loss
    over every row (summed, or divided by the count of targets that are not ignore_index)."""
    return call(_forward_op, h, weight, target, bias, int(ignore_index), reduction)


def _check_backward(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, needs):
    _check_forward(h_kept, weight, target_kept, bias)
    if h_kept.dim() != 3 or keep_idx.dim() != 1 or keep_idx.dtype not in (torch.int64, torch.int32) \
            or keep_idx.shape[0] != h_kept.shape[1] or not keep_idx.shape[0] <= positions:
        raise ValueError(f"h_kept must be [B, n_keep, c] with n_keep = len(keep_idx) <= {positions} positions "
                         f"(keep_idx 1-D int64 / int32), got {tuple(h_kept.shape)} and {keep_idx.dtype} "
                         f"{tuple(keep_idx.shape)}")
    if lse_kept.dtype != torch.float32 or lse_kept.shape != target_kept.shape:
        raise ValueError(f"lse_kept must be float32 of shape {tuple(target_kept.shape)}, got {lse_kept.dtype} "
                         f"{tuple(lse_kept.shape)}")
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(f"scale must be a float32 tensor of one element, got {scale.dtype} {tuple(scale.shape)}")
    if len(needs) != 3:
        raise ValueError(f"needs must hold 3 flags for (h, weight, bias), got {len(needs)}")


def _chunk_width(rows, vocab):
    """Classes per backward chunk: a multiple of every config's BLOCK_N, about _CHUNK_ELEMENTS
    dlogits."""
    granule = max(cfg.kwargs["BLOCK_N"] for cfg in _dlogits_kernel.configs)
    return min(vocab, max(granule, _CHUNK_ELEMENTS // max(rows, 1) // granule * granule))


@kernel_op("sbp::linear_cross_entropy_backward_triton")
def _backward_op(
    h_kept: Tensor, weight: Tensor, bias: Optional[Tensor], target_kept: Tensor, lse_kept: Tensor, keep_idx: Tensor,
    scale: Tensor, positions: int, ignore_index: int, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    return backward_kernels(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, ignore_index,
                            needs)


def backward_kernels(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, ignore_index, needs):
    """The launches of the op above (also what the offline compile report replays)."""
    _check_backward(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, needs)
    need_h, need_w, need_b = needs
    batch, n_keep, c = h_kept.shape
    rows, vocab = batch * n_keep, weight.shape[0]
    grad_h, grad_w, grad_b = (not_needed(h_kept) for _ in range(3))  # distinct: outputs may not alias
    if need_h:
        grad_h = h_kept.new_empty(batch, positions, c)
    if need_w:
        grad_w = weight.new_empty(weight.shape)
    if need_b:
        grad_b = weight.new_empty(vocab)
    if rows == 0:  # an empty batch: every gradient is an empty sum
        return tuple(g.zero_() for g in (grad_h, grad_w, grad_b))
    keep_idx = keep_idx.contiguous()  # the dh kernel reads idx_ptr + k
    t_rows, lse_rows = target_kept.reshape(-1).contiguous(), lse_kept.reshape(-1).contiguous()
    width = _chunk_width(rows, vocab)
    chunks = triton.cdiv(vocab, width)
    dlogits = h_kept.new_empty(rows, width)
    dh_sum = torch.empty((rows, c), dtype=torch.float32, device=h_kept.device) if need_h and chunks > 1 else None
    with device_guard(h_kept):
        for v0 in range(0, vocab, width):
            d = dlogits[:, :min(width, vocab - v0)]
            classes = slice(v0, v0 + d.shape[1])
            _launch_dlogits(h_kept, weight[classes], None if bias is None else bias[classes], t_rows, lse_rows, scale,
                            d, v0, ignore_index)
            d3 = d.view(batch, n_keep, d.shape[1])
            if need_w:
                gemm.weight_gemm(h_kept, d3, grad_w[classes], grad_b[classes] if need_b else None, keep_idx,
                                 gather_b=False)
            elif need_b:
                grad_b[classes] = kept_rows_sum(d3, keep_idx, 1.0, gather=False)
            if need_h:
                last = v0 + width >= vocab
                _launch_dh(d, weight[classes], dh_sum if v0 else None, grad_h if last else dh_sum.view(h_kept.shape),
                           keep_idx, last)
    return grad_h, grad_w, grad_b


def _launch_dlogits(h_kept, weight, bias, t_rows, lse_rows, scale, d, v_start, ignore_index):
    """d [rows, classes] = dlogits of the kept rows for weight's (and bias's) classes v_start, ..."""
    rows, classes = d.shape

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(classes, meta["BLOCK_N"]),)

    traceable(_dlogits_kernel)[grid](
        h_kept, weight, bias if bias is not None else weight, t_rows, lse_rows, scale, d,
        rows, classes, weight.shape[1], h_kept.shape[1], v_start, ignore_index,
        *h_kept.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, d.stride(0),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(d.dtype),
    )


def _launch_dh(d, weight, dh_sum, out, keep_idx, scatter):
    """out = d @ weight (+ dh_sum, fp32 [rows, c]) for the kept rows: out [B, n_keep, c] compact, or
    with `scatter` [B, n, c] written at keep_idx with zeros into the dropped rows, by one launch."""
    rows, c = d.shape[0], weight.shape[1]
    batch, positions = out.shape[:2]
    # Rows of batch * positions the zero-fill programs cover (none when every position is kept), and
    # what they read: 1 on kept positions.
    out_rows = batch * positions if scatter and keep_idx.shape[0] < positions else 0
    keep_mask = keep_idx
    if out_rows:
        keep_mask = torch.zeros(positions, dtype=torch.int8, device=out.device).index_fill_(0, keep_idx.long(), 1)

    def grid(meta):
        blocks_n = triton.cdiv(c, meta["BLOCK_N"])
        return (triton.cdiv(rows, meta["BLOCK_M"]) * blocks_n + triton.cdiv(out_rows, meta["BLOCK_M"]) * blocks_n,)

    traceable(_dh_kernel)[grid](
        d, weight, dh_sum if dh_sum is not None else d, out, keep_idx, keep_mask,
        rows, c, d.shape[1], keep_idx.shape[0], positions, out_rows, d.stride(0), *weight.stride(), *out.stride(),
        ACC_IN=dh_sum is not None, C_IDX=scatter, DOT_PRECISION=dot_precision(d.dtype),
    )


@_backward_op.register_fake
def _backward_fake(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, ignore_index, needs):
    _check_backward(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, needs)
    batch, _, c = h_kept.shape
    shapes = ((batch, positions, c), tuple(weight.shape), (weight.shape[0],))
    return tuple(h_kept.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def backward(h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, positions, ignore_index, needs):
    """Gradients of the loss through the kept rows: (grad_h [B, positions, c], zero on dropped rows;
    grad_weight; grad_bias), None for each one whose flag in needs is False (not computed).

    h_kept [B, n_keep, c], target_kept and lse_kept (float32) [B, n_keep], scale a float32 tensor of
    one element: dL/dloss * grad_scale (/ count of targets for "mean")."""
    needs = [bool(need) for need in needs]
    grads = call(
        _backward_op, h_kept, weight, bias, target_kept, lse_kept, keep_idx, scale, int(positions),
        int(ignore_index), needs,
    )
    return tuple(g if need else None for g, need in zip(grads, needs))
