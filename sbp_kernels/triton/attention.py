"""Triton kernels of sbp::attention (DESIGN.md 3.3): a flash forward that also writes the row
log-sum-exp, and a flash-attention-2 style backward on kept tokens.

Layout q [B, h, n, d], k and v [B, h_kv, n, d] with any strides; h_kv divides h and query head j
reads kv head j // (h / h_kv) (grouped-query attention; no repeated copy of k, v is made). An
optional key padding mask [B, n] (True = a real token) masks key j for every query of sample b,
combined with causal masking in ORIGINAL positions. A query row whose keys are all masked gets
out = 0 and lse = +inf (as FlashAttention-2), so its backward probabilities are exactly 0.
Queries are always the kept tokens (compact index i < n_keep, original position keep_idx[i]).
Keys are the kept tokens too in mode "qkv" (k_K, v_K compact) and all n tokens in mode "q".

Forward: grid (cdiv(n, BLOCK_M), B * h); out is allocated [B, n, h, d] and returned as its
[B, h, n, d] transposed view, so `out.transpose(1, 2).reshape(B, n, h * d)` (the output
projection's input) is a view.

Backward, three launches, no gathered copy of dO and no zeros + scatter pass:

1. `_bwd_preprocess_kernel`, grid (cdiv(n_keep, BLOCK_R) + cdiv(n, BLOCK_R), B * h):
   the first programs compute D_i = dO_i . o_i (fp32) for kept rows, dO read through keep_idx;
   the others zero-fill the DROPPED rows of dq (and, by the first query head of each kv group,
   of dk, dv in mode "qkv") over tiles of original positions: each position p finds its lower
   bound in keep_idx by a vectorised binary search (log2(n_keep) gathered loads of the tiny index
   tensor) and is dropped unless keep_idx[lb] == p. Outputs are torch.empty: every row is written
   exactly once, kept rows by launches 2 and 3, dropped rows here.
2. `_bwd_dkdv_kernel`, grid (cdiv(n_keys, BLOCK_N), B * h_kv): one key tile per program, holding
   dK, dV in fp32 registers while ONE loop runs over the kept query tiles of every query head of
   its kv group (P^T recomputed from the saved lse with exp2); writes dk, dv rows at their
   original positions (keep_idx[j] in mode "qkv", j in mode "q", where the grid covers all n
   key rows).
3. `_bwd_dq_kernel`, grid (cdiv(n_keep, BLOCK_M), B * h): one kept-query tile per program, looping
   over key tiles; writes dq rows at keep_idx[i].

Fully masked tiles are skipped under causal masking: keys and queries are sorted by position, so
the dK/dV loop starts at the first kept query at or after the tile's first key (that tile's own
compact start in mode "qkv", a scalar binary search in mode "q"), and the dQ loop stops after
the tile's last query position.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 products are IEEE unless
torch.backends.cuda.matmul.allow_tf32 is set (like torch.matmul). Head dims 16..128: tiles use the
next power of two with masked loads, so 16, 32, 64, 128 waste nothing. Constants are kernel
arguments (no module-level tl.constexpr globals, which break torch.compile).

Exposed as torch.library ops with fake kernels (`sbp::attention_forward_triton`,
`sbp::attention_backward_triton`; library.kernel_op), so torch.compile(fullgraph=True) traces code
that calls them, and on a GPU inductor sees the kernels themselves.
`unsupported()` says which cases the kernels cannot run, for the op layer to fall back to torch.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import triton_interpreted
from .gemm import autotuning, device_guard, dot_precision, loop_bound
from .library import call, kernel_op, traceable

_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # B * h is the second grid axis
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 128)  # inclusive range of head dims the kernels take


def _configs(single, table):
    """Autotune configs: one small tile under the interpreter, `single` when autotuning is off,
    else `table` rows (BLOCK_M, BLOCK_N, num_warps, num_stages). Under SBP_TRITON_AUTOTUNE=0
    (gemm.autotuning) each kernel gets one config of its list that fits every dtype up to head dim
    128 on H100 (compiled for sm_90 by Triton 3.8, fp32 at d = 128 needs 136 KiB (forward), 137 KiB
    (dK/dV), 169 KiB (dQ) of the 227 KiB of shared memory); the autotuner skips any config that
    does not fit in shared memory. Every row compiles for sm_90 without spills, with wgmma for
    fp16 / bf16 and pipelined key / query loops (`python -m sbp_kernels.kernel_report --check`)."""
    if triton_interpreted():
        table = [(16, 16, 1, 1)]
    elif not autotuning():
        table = [single]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def _fwd_configs():
    # H100: head dim 64 likes 128 x 64 tiles; 128 x 128 (8 warps) and 128 x 64 (4 warps) spill at
    # head dim 128.
    return _configs(
        (64, 32, 4, 4),
        [(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4)],
    )


def _dkdv_configs():
    # (query tile, key tile): the fused-attention tutorial's H100 choice is 32 x 128. Key tiles of 64
    # rows take 8 warps, and 64 x 128 or 4-warp 32-row tiles spill at head dim 128 (dK, dV and the
    # key tile stay in registers).
    return _configs(
        (32, 64, 8, 3),
        [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 3), (16, 64, 4, 4)],
    )


def _dq_configs():
    return _configs(
        (64, 32, 4, 4),
        [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 16, 4, 4)],
    )


def _row_block():
    return 16 if triton_interpreted() else 64


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _lower_bound(idx_ptr, n_idx, target, N_ITER):
    """Vectorised lower bound: for each element of target, the count of idx values < target
    (idx sorted, n_idx long). N_ITER >= bit_length(n_idx) halving steps."""
    lo = tl.zeros(target.shape, dtype=tl.int32)
    hi = tl.zeros(target.shape, dtype=tl.int32) + n_idx
    for _ in range(loop_bound(N_ITER)):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(idx_ptr + mid, mask=active & (mid < n_idx), other=0)
        less = val < target
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & (val >= target), mid, hi)
    return lo


@triton.jit
def _real_keys(KPM, s_mn, kpos, key_ok, HAS_MASK: tl.constexpr):
    """key_ok and, with a key padding mask (the sample's row, uint8), its bit at positions kpos."""
    if HAS_MASK:
        key_ok = key_ok & (tl.load(KPM + kpos.to(tl.int64) * s_mn, mask=key_ok, other=0) != 0)
    return key_ok


@triton.autotune(configs=_fwd_configs(), key=["N", "BLOCK_D", "CAUSAL", "HAS_MASK", "DOT_PRECISION"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KPM, qk_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od, s_mb, s_mn,
    H, GROUP, N, HEAD_DIM,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * s_qb + off_h * s_qh
    K += off_b * s_kb + (off_h // GROUP) * s_kh
    V += off_b * s_vb + (off_h // GROUP) * s_vh
    O += off_b * s_ob + off_h * s_oh
    KPM += off_b * s_mb

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + rows[:, None].to(tl.int64) * s_qn + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
    else:
        hi = N
    for start_n in range(0, loop_bound(hi), BLOCK_N):
        cols = start_n + offs_n
        col_ok = _real_keys(KPM, s_mn, cols, cols < N, HAS_MASK)
        kt = tl.load(K + cols[None, :].to(tl.int64) * s_kn + offs_d[:, None] * s_kd,
                     mask=(cols < N)[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row without a valid key so far has m_new = -inf: subtract 0 instead (p = 0, no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None].to(tl.int64) * s_vn + offs_d[None, :] * s_vd,
                    mask=(cols < N)[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # Rows whose keys are all masked (l = 0): out = 0, lse = +inf. natural-log lse = (m + log2 l) ln 2.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)
    tl.store(O + rows[:, None].to(tl.int64) * s_on + offs_d[None, :] * s_od, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    DO, OK, KEEP, DELTA, DQ, DK, DV,
    s_dob, s_doh, s_don, s_dod, s_ob, s_oh, s_on, s_od,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    H, GROUP, N, NK, HEAD_DIM, N_ITER, NUM_DELTA_TILES,
    ZERO_KV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs [0, NUM_DELTA_TILES): D = rowsum(dO_K * o_K); the rest zero dropped rows."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if pid < NUM_DELTA_TILES:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < NK
        pos = tl.load(KEEP + rows, mask=row_ok, other=0).to(tl.int64)
        mask = row_ok[:, None] & d_ok[None, :]
        do = tl.load(DO + off_b * s_dob + off_h * s_doh + pos[:, None] * s_don + offs_d[None, :] * s_dod,
                     mask=mask, other=0.0).to(tl.float32)
        o = tl.load(OK + off_b * s_ob + off_h * s_oh + rows[:, None].to(tl.int64) * s_on + offs_d[None, :] * s_od,
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + pid_bh.to(tl.int64) * NK + rows, tl.sum(do * o, 1), mask=row_ok)
    else:
        zpos = (pid - NUM_DELTA_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
        lb = _lower_bound(KEEP, NK, zpos, N_ITER)
        found = tl.load(KEEP + lb, mask=lb < NK, other=-1)
        dropped = (zpos < N) & (found != zpos)
        zmask = dropped[:, None] & d_ok[None, :]
        pos64 = zpos.to(tl.int64)
        zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=DQ.dtype.element_ty)
        tl.store(DQ + off_b * s_qb + off_h * s_qh + pos64[:, None] * s_qn + offs_d[None, :] * s_qd, zeros, mask=zmask)
        if ZERO_KV:
            if off_h % GROUP == 0:  # one query head per kv group zeroes the group's dk, dv rows
                kv_h = off_h // GROUP
                tl.store(DK + off_b * s_kb + kv_h * s_kh + pos64[:, None] * s_kn + offs_d[None, :] * s_kd, zeros,
                         mask=zmask)
                tl.store(DV + off_b * s_vb + kv_h * s_vh + pos64[:, None] * s_vn + offs_d[None, :] * s_vd, zeros,
                         mask=zmask)


@triton.autotune(
    configs=_dkdv_configs(), key=["NK", "N_KEYS", "BLOCK_D", "CAUSAL", "MODE_Q", "HAS_MASK", "DOT_PRECISION"],
)
@triton.jit
def _bwd_dkdv_kernel(
    QK, KS, VS, DO, LSEK, DELTA, KEEP, KPM, DK, DV, qk_scale, dk_scale, dv_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_don, s_dod, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd, s_mb, s_mn,
    H_KV, GROUP, NK, N_KEYS, HEAD_DIM, N_ITER,
    CAUSAL: tl.constexpr, MODE_Q: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    kv_h = (pid_bh % H_KV).to(tl.int64)
    KS += off_b * s_kb + kv_h * s_kh
    VS += off_b * s_vb + kv_h * s_vh
    QK += off_b * s_qb
    DO += off_b * s_dob

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # rows of k_saved / v_saved
    col_ok = cols < N_KEYS
    if MODE_Q:
        kpos = cols
    else:
        kpos = tl.load(KEEP + cols, mask=col_ok, other=0).to(tl.int32)
    key_ok = _real_keys(KPM + off_b * s_mb, s_mn, kpos, col_ok, HAS_MASK)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(KS + cols[:, None].to(tl.int64) * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(VS + cols[:, None].to(tl.int64) * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Kept queries before the tile's first key position see none of its keys (causal): skip them.
    start_m = 0
    if CAUSAL:
        if MODE_Q:
            start_m = tl.sum(_lower_bound(KEEP, NK, tl.zeros([1], dtype=tl.int32) + start_n, N_ITER))
        else:
            start_m = start_n
    # One loop over (query head g of the group, query tile): the pipeline runs across heads.
    tiles_m = tl.cdiv(NK - start_m, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    qpos = tl.load(KEEP + start_m + offs_m, mask=start_m + offs_m < NK, other=0)
    for it in range(0, loop_bound(GROUP * tiles_m)):
        head = kv_h * GROUP + it // tiles_m
        rows = start_m + (it % tiles_m) * BLOCK_M + offs_m
        row_ok = rows < NK
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(QK + head * s_qh + rows[:, None].to(tl.int64) * s_qn + offs_d[None, :] * s_qd, mask=q_mask,
                    other=0.0)
        do = tl.load(DO + head * s_doh + qpos[:, None].to(tl.int64) * s_don + offs_d[None, :] * s_dod, mask=q_mask,
                     other=0.0)
        bh_rows = (off_b * H_KV * GROUP + head) * NK + rows  # rows of lse / delta [B, h, n_keep]
        lse = tl.load(LSEK + bh_rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh_rows, mask=row_ok, other=0.0)
        valid = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            valid = valid & (kpos[:, None] <= qpos[None, :].to(tl.int32))
        # Positions of the next iteration's queries, loaded one iteration ahead: dO's rows are
        # gathered through them, and a position load feeding the dO tile load in the same
        # iteration would keep Triton from pipelining it (cp.async wait for everything).
        next_rows = start_m + ((it + 1) % tiles_m) * BLOCK_M + offs_m
        qpos = tl.load(KEEP + next_rows, mask=next_rows < NK, other=0)
        # Transposed scores: s^T [BLOCK_N, BLOCK_M] = k q^T.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.where(valid, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)

    out_rows = kpos.to(tl.int64)
    tl.store(DK + off_b * s_dkb + kv_h * s_dkh + out_rows[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             (dk * dk_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * s_dvb + kv_h * s_dvh + out_rows[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             (dv * dv_scale).to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_dq_configs(), key=["NK", "N_KEYS", "BLOCK_D", "CAUSAL", "MODE_Q", "HAS_MASK", "DOT_PRECISION"],
)
@triton.jit
def _bwd_dq_kernel(
    QK, KS, VS, DO, LSEK, DELTA, KEEP, KPM, DQ, qk_scale, dq_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_don, s_dod, s_dqb, s_dqh, s_dqn, s_dqd, s_mb, s_mn,
    H, GROUP, NK, N_KEYS, HEAD_DIM,
    CAUSAL: tl.constexpr, MODE_Q: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    KS += off_b * s_kb + (off_h // GROUP) * s_kh
    VS += off_b * s_vb + (off_h // GROUP) * s_vh
    KPM += off_b * s_mb

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NK
    qpos = tl.load(KEEP + rows, mask=row_ok, other=0)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(QK + off_b * s_qb + off_h * s_qh + rows[:, None].to(tl.int64) * s_qn + offs_d[None, :] * s_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * s_dob + off_h * s_doh + qpos[:, None].to(tl.int64) * s_don + offs_d[None, :] * s_dod,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSEK + pid_bh.to(tl.int64) * NK + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * NK + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys after the tile's last query position are masked for all its rows (causal): stop there.
    end_n = N_KEYS
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, NK) - 1
        if MODE_Q:
            end_n = tl.load(KEEP + last).to(tl.int32) + 1
        else:
            end_n = last + 1
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, loop_bound(end_n), BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N_KEYS
        if MODE_Q:
            kpos = cols
        else:
            kpos = tl.load(KEEP + cols, mask=col_ok, other=0).to(tl.int32)
        key_ok = _real_keys(KPM, s_mn, kpos, col_ok, HAS_MASK)
        kv_mask = col_ok[None, :] & d_ok[:, None]
        kt = tl.load(KS + cols[None, :].to(tl.int64) * s_kn + offs_d[:, None] * s_kd, mask=kv_mask, other=0.0)
        vt = tl.load(VS + cols[None, :].to(tl.int64) * s_vn + offs_d[:, None] * s_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            valid = valid & (kpos[None, :] <= qpos[:, None].to(tl.int32))
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    tl.store(DQ + off_b * s_dqb + off_h * s_dqh + qpos[:, None].to(tl.int64) * s_dqn + offs_d[None, :] * s_dqd,
             (dq * dq_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------------
# launchers


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def unsupported(q, k, key_padding_mask=None):
    """Why the Triton kernels cannot run attention of q [B, h, n, d] over k [B, h_kv, n, d] (with
    this key padding mask), or None when they can. The op layer falls back to torch on a reason."""
    d = q.shape[-1]
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton attention kernels (float16, bfloat16, float32)"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "the Triton interpreter has no bfloat16"
    if not HEAD_DIMS[0] <= d <= HEAD_DIMS[1]:
        return f"head dim d={d} is outside the {HEAD_DIMS[0]}..{HEAD_DIMS[1]} the Triton attention kernels support"
    if q.dim() != 4 or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return (f"q {tuple(q.shape)} and k {tuple(k.shape)} are not [B, h, n, d] and [B, h_kv, n, d] with h_kv "
                "dividing h")
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"B * h = {q.shape[0] * q.shape[1]} exceeds the {_MAX_GRID_Y} programs of a grid axis"
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (q.shape[0], q.shape[2])):
        return f"key_padding_mask must be bool [B, n] = {[q.shape[0], q.shape[2]]}, got {key_padding_mask.dtype} " \
               f"{list(key_padding_mask.shape)}"
    return None


def _check_4d(name, t, like):
    if t.dim() != 4 or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be a 4-D [B, h, n, d] tensor of dtype {like.dtype} on {like.device}, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _check_head_dim_and_mask(d, key_padding_mask, batch, n, device):
    if not HEAD_DIMS[0] <= d <= HEAD_DIMS[1]:
        raise ValueError(f"head dim must be in 16..128 for the Triton attention kernels, got {d}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.device != device
                                         or tuple(key_padding_mask.shape) != (batch, n)):
        raise ValueError(f"key_padding_mask must be a bool [{batch}, {n}] tensor on {device}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")


def _check_forward(q, k, v, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t, q)
    batch, heads, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:] or not k.shape[1] \
            or heads % k.shape[1]:
        raise ValueError(f"k and v must be [B, h_kv, n, d] with h_kv dividing q's h: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_head_dim_and_mask(d, key_padding_mask, batch, n, q.device)


def _mask_args(key_padding_mask, like):
    """(pointer, batch stride, position stride) of the mask as uint8 (a view), or a dummy."""
    if key_padding_mask is None:
        return like, 0, 0
    mask = key_padding_mask.view(torch.uint8)
    return (mask, *mask.stride())


def _new_out(q):
    """out [B, h, n, d] stored [B, n, h, d]: the output projection reads it as a [B, n, h * d] view."""
    batch, heads, n, d = q.shape
    return q.new_empty((batch, n, heads, d)).transpose(1, 2)


@kernel_op("sbp::attention_forward_triton")
def _attention_forward_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, key_padding_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    return attention_forward_kernels(q, k, v, causal, scale, key_padding_mask)


def attention_forward_kernels(q, k, v, causal, scale, key_padding_mask):
    """The launch of the op above (also what the offline compile report replays)."""
    _check_forward(q, k, v, key_padding_mask)
    batch, heads, n, d = q.shape
    out = _new_out(q)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    mask, *mask_strides = _mask_args(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    with device_guard(q):  # Triton launches on the current device's current stream
        traceable(_fwd_kernel)[grid](
            q, k, v, out, lse, mask, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
            heads, heads // k.shape[1], n, d,
            CAUSAL=causal, HAS_MASK=key_padding_mask is not None, DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_D=_block_d(d),
        )
    return out, lse


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, causal, scale, key_padding_mask=None):
    _check_forward(q, k, v, key_padding_mask)
    return _new_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_forward(q, k, v, causal, scale, key_padding_mask=None):
    """(out [B, h, n, d] stored [B, n, h, d], lse [B, h, n] fp32, natural log, +inf on rows whose
    keys are all masked) of exact attention, flash style."""
    return call(_attention_forward_op, q, k, v, bool(causal), float(scale), key_padding_mask)


def _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode, key_padding_mask):
    _check_4d("dout", dout, q_kept)
    batch, heads, n, d = dout.shape
    n_keep = keep_idx.shape[0] if keep_idx.dim() == 1 else -1
    if keep_idx.dim() != 1 or keep_idx.dtype not in (torch.int64, torch.int32) or not 1 <= n_keep <= n:
        raise ValueError(f"keep_idx must be a 1-D int64/int32 tensor of 1..{n} positions, got "
                         f"{keep_idx.dtype} {tuple(keep_idx.shape)}")
    if mode not in ("qkv", "q"):
        raise ValueError(f"mode must be 'qkv' or 'q', got {mode!r}")
    kv_heads = k_saved.shape[1] if k_saved.dim() == 4 else -1
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k_saved must be [B, h_kv, n_keys, d] with h_kv dividing {heads}, got "
                         f"{tuple(k_saved.shape)}")
    n_keys = n_keep if mode == "qkv" else n
    for name, t, h, rows in (("q_kept", q_kept, heads, n_keep), ("out_kept", out_kept, heads, n_keep),
                             ("k_saved", k_saved, kv_heads, n_keys), ("v_saved", v_saved, kv_heads, n_keys)):
        _check_4d(name, t, q_kept)
        if tuple(t.shape) != (batch, h, rows, d):
            raise ValueError(f"{name} must have shape {(batch, h, rows, d)}, got {tuple(t.shape)}")
    if tuple(lse_kept.shape) != (batch, heads, n_keep) or lse_kept.dtype != torch.float32:
        raise ValueError(f"lse_kept must be float32 of shape {(batch, heads, n_keep)}, got "
                         f"{lse_kept.dtype} {tuple(lse_kept.shape)}")
    _check_head_dim_and_mask(d, key_padding_mask, batch, n, dout.device)


def _new_output(shape, like):
    """Uninitialised gradient storage: the kernels write every element (tests swap in NaN fill)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@kernel_op("sbp::attention_backward_triton")
def _attention_backward_op(
    dout: Tensor, q_kept: Tensor, k_saved: Tensor, v_saved: Tensor, out_kept: Tensor, lse_kept: Tensor,
    keep_idx: Tensor, causal: bool, scale: float, mode: str, grad_scale: float,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    return attention_backward_kernels(
        dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale,
        key_padding_mask,
    )


def attention_backward_kernels(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode,
                               grad_scale, key_padding_mask):
    """The launches of the op above (also what the offline compile report replays)."""
    _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode, key_padding_mask)
    batch, heads, n, d = dout.shape
    kv_heads = k_saved.shape[1]
    group = heads // kv_heads
    n_keep = keep_idx.shape[0]
    mode_q = mode == "q"
    n_keys = n if mode_q else n_keep
    lse_kept = lse_kept.contiguous()
    keep_idx = keep_idx.contiguous()  # the kernels read KEEP + i
    dq = _new_output((batch, heads, n, d), dout)
    dk, dv = (_new_output((batch, kv_heads, n, d), dout) for _ in range(2))
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((batch, heads, n_keep), dtype=torch.float32, device=dout.device)
    block_d = _block_d(d)
    n_iter = n_keep.bit_length()
    precision = dot_precision(dout.dtype)
    qk_scale = scale * _LOG2E
    mask, *mask_strides = _mask_args(key_padding_mask, dout)
    has_mask = key_padding_mask is not None

    block_r = _row_block()
    delta_tiles = triton.cdiv(n_keep, block_r)
    zero_tiles = triton.cdiv(n, block_r) if n_keep < n else 0
    with device_guard(dout):  # Triton launches on the current device's current stream
        traceable(_bwd_preprocess_kernel)[(delta_tiles + zero_tiles, batch * heads)](
            dout, out_kept, keep_idx, delta, dq, dk, dv,
            *dout.stride(), *out_kept.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            heads, group, n, n_keep, d, n_iter, delta_tiles,
            ZERO_KV=not mode_q, BLOCK_R=block_r, BLOCK_D=block_d,
        )
        traceable(_bwd_dkdv_kernel)[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), batch * kv_heads)](
            q_kept, k_saved, v_saved, dout, lse_kept, delta, keep_idx, mask, dk, dv,
            qk_scale, scale * grad_scale, grad_scale,
            *q_kept.stride(), *k_saved.stride(), *v_saved.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            *mask_strides, kv_heads, group, n_keep, n_keys, d, n_iter,
            CAUSAL=causal, MODE_Q=mode_q, HAS_MASK=has_mask, DOT_PRECISION=precision, BLOCK_D=block_d,
        )
        traceable(_bwd_dq_kernel)[lambda meta: (triton.cdiv(n_keep, meta["BLOCK_M"]), batch * heads)](
            q_kept, k_saved, v_saved, dout, lse_kept, delta, keep_idx, mask, dq,
            qk_scale, scale * grad_scale,
            *q_kept.stride(), *k_saved.stride(), *v_saved.stride(), *dout.stride(), *dq.stride(), *mask_strides,
            heads, group, n_keep, n_keys, d,
            CAUSAL=causal, MODE_Q=mode_q, HAS_MASK=has_mask, DOT_PRECISION=precision, BLOCK_D=block_d,
        )
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode,
                             grad_scale, key_padding_mask=None):
    _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode, key_padding_mask)
    kv_shape = (dout.shape[0], k_saved.shape[1], *dout.shape[2:])
    return dout.new_empty(dout.shape), dout.new_empty(kv_shape), dout.new_empty(kv_shape)


def attention_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale,
                       key_padding_mask=None):
    """reference.attention_backward with Triton kernels, reading dO [B, h, n, d] (any strides)
    through keep_idx; key_padding_mask is the FULL [B, n] mask. Returns full-size dq [B, h, n, d]
    and dk, dv [B, h_kv, n, d] (summed over the query heads of each kv group), zero on tokens
    that take no gradient."""
    return call(
        _attention_backward_op, dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, bool(causal),
        float(scale), mode, float(grad_scale), key_padding_mask,
    )
