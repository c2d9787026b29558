"""Triton kernels of sbp::attention (DESIGN.md 3.3): a flash forward that also writes the row
log-sum-exp, and a flash-attention-2 style backward on kept tokens.

Layout [B, h, n, d] with any strides; program axis 1 runs over the B * h heads, axis 0 over tiles.
Queries are always the kept tokens (compact index i < n_keep, original position keep_idx[i]).
Keys are the kept tokens too in mode "qkv" (k_K, v_K compact) and all n tokens in mode "q".

Backward, three launches, no gathered copy of dO and no zeros + scatter pass:

1. `_bwd_preprocess_kernel`, grid (cdiv(n_keep, BLOCK_R) + cdiv(n, BLOCK_R), B * h):
   the first programs compute D_i = dO_i . o_i (fp32) for kept rows, dO read through keep_idx;
   the others zero-fill the DROPPED rows of dq (and of dk, dv in mode "qkv") over tiles of
   original positions: each position p finds its lower bound in keep_idx by a vectorised binary
   search (log2(n_keep) gathered loads of the tiny index tensor) and is dropped unless
   keep_idx[lb] == p. Outputs are torch.empty: every row is written exactly once, kept rows by
   launches 2 and 3, dropped rows here.
2. `_bwd_dkdv_kernel`, grid (cdiv(n_keys, BLOCK_N), B * h): one key tile per program, holding
   dK, dV in fp32 registers while it loops over tiles of kept queries (P^T recomputed from the
   saved lse with exp2); writes dk, dv rows at their original positions (keep_idx[j] in mode
   "qkv", j in mode "q", where the grid covers all n key rows).
3. `_bwd_dq_kernel`, grid (cdiv(n_keep, BLOCK_M), B * h): one kept-query tile per program, looping
   over key tiles; writes dq rows at keep_idx[i].

Causal masking is in ORIGINAL positions: tiles load keep_idx for their kept rows / columns and mask
key pos > query pos. Fully masked tiles are skipped: keys and queries are sorted by position, so
the dK/dV loop starts at the first kept query at or after the tile's first key (that tile's own
compact start in mode "qkv", a scalar binary search in mode "q"), and the dQ loop stops after
the tile's last query position.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 products are IEEE unless
torch.backends.cuda.matmul.allow_tf32 is set (like torch.matmul). Head dims 16..128: tiles use the
next power of two with masked loads, so 16, 32, 64, 128 waste nothing. Constants are kernel
arguments (no module-level tl.constexpr globals, which break torch.compile).

Exposed as torch custom ops with fake kernels (`sbp::attention_forward_triton`,
`sbp::attention_backward_triton`), so torch.compile(fullgraph=True) traces code that calls them.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import triton_interpreted
from .gemm import autotuning, device_guard

_LOG2E = 1.4426950408889634


def _interp_config(**blocks):
    return [triton.Config(blocks, num_warps=1, num_stages=1)]


def _single_config(bm, bn, warps, stages):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)]


# Under SBP_TRITON_AUTOTUNE=0 (gemm.autotuning) each kernel gets one config of its list that fits
# every dtype up to head dim 128 on H100 (compiled for sm_90, fp32 at d = 128 needs at most 160 KiB
# (forward), 130 KiB (dK/dV), 169 KiB (dQ) of the 227 KiB of shared memory).


def _configs(single, table):
    """Autotune configs: one small tile under the interpreter, `single` when autotuning is off,
    else `table` rows (BLOCK_M, BLOCK_N, num_warps, num_stages); the autotuner skips any config
    that does not fit in shared memory."""
    if triton_interpreted():
        return _interp_config(BLOCK_M=16, BLOCK_N=16)
    if not autotuning():
        return _single_config(*single)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table
    ]


def _fwd_configs():
    # H100: head dim 64 likes 128 x 64 / 128 x 128 tiles; 128 needs the smaller ones.
    return _configs(
        (64, 32, 4, 4),
        [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4)],
    )


def _dkdv_configs():
    # (query tile, key tile): the fused-attention tutorial's H100 choice is 32 x 128.
    return _configs(
        (32, 64, 4, 4),
        [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3), (16, 64, 4, 4)],
    )


def _dq_configs():
    return _configs(
        (64, 32, 4, 4),
        [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 16, 4, 4)],
    )


def _row_block():
    return 16 if triton_interpreted() else 64


# ------------------------------------------------------------------------------------------------
# kernels

if triton_interpreted():

    def _bound(x):
        """A loop bound as a Python int. Triton 3.6's interpreter holds runtime scalars as
        1-element numpy arrays, which numpy >= 2.4 refuses to turn into an int for range()."""
        return int(x.handle.data.reshape(-1)[0]) if isinstance(x, tl.tensor) else x

else:

    @triton.jit
    def _bound(x):
        """A loop bound (the identity when compiled; see the interpreter version)."""
        return x


@triton.jit
def _lower_bound(idx_ptr, n_idx, target, N_ITER):
    """Vectorised lower bound: for each element of target, the count of idx values < target
    (idx sorted, n_idx long). N_ITER >= bit_length(n_idx) halving steps."""
    lo = tl.zeros(target.shape, dtype=tl.int32)
    hi = tl.zeros(target.shape, dtype=tl.int32) + n_idx
    for _ in range(_bound(N_ITER)):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(idx_ptr + mid, mask=active & (mid < n_idx), other=0)
        less = val < target
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & (val >= target), mid, hi)
    return lo


@triton.autotune(configs=_fwd_configs(), key=["N", "BLOCK_D", "CAUSAL", "DOT_PRECISION"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    H, N, HEAD_DIM,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * s_qb + off_h * s_qh
    K += off_b * s_kb + off_h * s_kh
    V += off_b * s_vb + off_h * s_vh
    O += off_b * s_ob + off_h * s_oh

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
    for start_n in range(0, _bound(hi), BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N
        kt = tl.load(K + cols[None, :].to(tl.int64) * s_kn + offs_d[:, None] * s_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        # Column 0 is valid for every row, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None].to(tl.int64) * s_vn + offs_d[None, :] * s_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    # natural-log lse: (m + log2 l) / log2(e)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)
    tl.store(O + rows[:, None].to(tl.int64) * s_on + offs_d[None, :] * s_od, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    DO, OK, KEEP, DELTA, DQ, DK, DV,
    s_dob, s_doh, s_don, s_dod, s_ob, s_oh, s_on, s_od,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    H, N, NK, HEAD_DIM, N_ITER, NUM_DELTA_TILES,
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
            tl.store(DK + off_b * s_kb + off_h * s_kh + pos64[:, None] * s_kn + offs_d[None, :] * s_kd, zeros, mask=zmask)
            tl.store(DV + off_b * s_vb + off_h * s_vh + pos64[:, None] * s_vn + offs_d[None, :] * s_vd, zeros, mask=zmask)


@triton.autotune(configs=_dkdv_configs(), key=["NK", "N_KEYS", "BLOCK_D", "CAUSAL", "MODE_Q", "DOT_PRECISION"])
@triton.jit
def _bwd_dkdv_kernel(
    QK, KS, VS, DO, LSEK, DELTA, KEEP, DK, DV, qk_scale, dk_scale, dv_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_don, s_dod, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
    H, NK, N_KEYS, HEAD_DIM, N_ITER,
    CAUSAL: tl.constexpr, MODE_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    QK += off_b * s_qb + off_h * s_qh
    KS += off_b * s_kb + off_h * s_kh
    VS += off_b * s_vb + off_h * s_vh
    DO += off_b * s_dob + off_h * s_doh
    LSEK += pid_bh.to(tl.int64) * NK
    DELTA += pid_bh.to(tl.int64) * NK

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # rows of k_saved / v_saved
    col_ok = cols < N_KEYS
    if MODE_Q:
        kpos = cols
    else:
        kpos = tl.load(KEEP + cols, mask=col_ok, other=0).to(tl.int32)
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
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(_bound(start_m), _bound(NK), BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < NK
        qpos = tl.load(KEEP + rows, mask=row_ok, other=0)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(QK + rows[:, None].to(tl.int64) * s_qn + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
        do = tl.load(DO + qpos[:, None].to(tl.int64) * s_don + offs_d[None, :] * s_dod, mask=q_mask, other=0.0)
        lse = tl.load(LSEK + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # Transposed scores: s^T [BLOCK_N, BLOCK_M] = k q^T.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        valid = col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            valid = valid & (kpos[:, None] <= qpos[None, :].to(tl.int32))
        pt = tl.where(valid, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)

    out_rows = kpos.to(tl.int64)
    out_mask = kv_mask
    tl.store(DK + off_b * s_dkb + off_h * s_dkh + out_rows[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             (dk * dk_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + off_b * s_dvb + off_h * s_dvh + out_rows[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             (dv * dv_scale).to(DV.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_dq_configs(), key=["NK", "N_KEYS", "BLOCK_D", "CAUSAL", "MODE_Q", "DOT_PRECISION"])
@triton.jit
def _bwd_dq_kernel(
    QK, KS, VS, DO, LSEK, DELTA, KEEP, DQ, qk_scale, dq_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_don, s_dod, s_dqb, s_dqh, s_dqn, s_dqd,
    H, NK, N_KEYS, HEAD_DIM,
    CAUSAL: tl.constexpr, MODE_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    KS += off_b * s_kb + off_h * s_kh
    VS += off_b * s_vb + off_h * s_vh

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
    for n0 in range(0, _bound(end_n), BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N_KEYS
        if MODE_Q:
            kpos = cols
        else:
            kpos = tl.load(KEEP + cols, mask=col_ok, other=0).to(tl.int32)
        kv_mask = col_ok[None, :] & d_ok[:, None]
        kt = tl.load(KS + cols[None, :].to(tl.int64) * s_kn + offs_d[:, None] * s_kd, mask=kv_mask, other=0.0)
        vt = tl.load(VS + cols[None, :].to(tl.int64) * s_vn + offs_d[:, None] * s_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = row_ok[:, None] & col_ok[None, :]
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


def _dot_precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def _check_4d(name, t, like):
    if t.dim() != 4 or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be a 4-D [B, h, n, d] tensor of dtype {like.dtype} on {like.device}, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _check_forward(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t, q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"head dim must be in 16..128 for the Triton attention kernels, got {q.shape[-1]}")


@torch.library.custom_op("sbp::attention_forward_triton", mutates_args=())
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    _check_forward(q, k, v)
    batch, heads, n, d = q.shape
    out = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    with device_guard(q):  # Triton launches on the current device's current stream
        _fwd_kernel[grid](
            q, k, v, out, lse, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, n, d,
            CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block_d(d),
        )
    return out, lse


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, causal, scale):
    _check_forward(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_forward(q, k, v, causal, scale):
    """(out [B, h, n, d], lse [B, h, n] fp32, natural log) of exact attention, flash style."""
    return torch.ops.sbp.attention_forward_triton(q, k, v, bool(causal), float(scale))


def _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode):
    _check_4d("dout", dout, q_kept)
    batch, heads, n, d = dout.shape
    n_keep = keep_idx.shape[0] if keep_idx.dim() == 1 else -1
    if keep_idx.dim() != 1 or keep_idx.dtype not in (torch.int64, torch.int32) or not 1 <= n_keep <= n:
        raise ValueError(f"keep_idx must be a 1-D int64/int32 tensor of 1..{n} positions, got "
                         f"{keep_idx.dtype} {tuple(keep_idx.shape)}")
    if mode not in ("qkv", "q"):
        raise ValueError(f"mode must be 'qkv' or 'q', got {mode!r}")
    n_keys = n_keep if mode == "qkv" else n
    for name, t, rows in (("q_kept", q_kept, n_keep), ("out_kept", out_kept, n_keep),
                          ("k_saved", k_saved, n_keys), ("v_saved", v_saved, n_keys)):
        _check_4d(name, t, q_kept)
        if tuple(t.shape) != (batch, heads, rows, d):
            raise ValueError(f"{name} must have shape {(batch, heads, rows, d)}, got {tuple(t.shape)}")
    if tuple(lse_kept.shape) != (batch, heads, n_keep) or lse_kept.dtype != torch.float32:
        raise ValueError(f"lse_kept must be float32 of shape {(batch, heads, n_keep)}, got "
                         f"{lse_kept.dtype} {tuple(lse_kept.shape)}")
    if not 16 <= d <= 128:
        raise ValueError(f"head dim must be in 16..128 for the Triton attention kernels, got {d}")


def _new_output(shape, like):
    """Uninitialised gradient storage: the kernels write every element (tests swap in NaN fill)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@torch.library.custom_op("sbp::attention_backward_triton", mutates_args=())
def _attention_backward_op(
    dout: Tensor, q_kept: Tensor, k_saved: Tensor, v_saved: Tensor, out_kept: Tensor, lse_kept: Tensor,
    keep_idx: Tensor, causal: bool, scale: float, mode: str, grad_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode)
    batch, heads, n, d = dout.shape
    n_keep = keep_idx.shape[0]
    mode_q = mode == "q"
    n_keys = n if mode_q else n_keep
    lse_kept = lse_kept.contiguous()
    keep_idx = keep_idx.contiguous()  # the kernels read KEEP + i
    dq, dk, dv = (_new_output((batch, heads, n, d), dout) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((batch, heads, n_keep), dtype=torch.float32, device=dout.device)
    block_d = _block_d(d)
    n_iter = n_keep.bit_length()
    precision = _dot_precision(dout.dtype)
    qk_scale = scale * _LOG2E
    bh = batch * heads

    block_r = _row_block()
    delta_tiles = triton.cdiv(n_keep, block_r)
    zero_tiles = triton.cdiv(n, block_r) if n_keep < n else 0
    with device_guard(dout):  # Triton launches on the current device's current stream
        _bwd_preprocess_kernel[(delta_tiles + zero_tiles, bh)](
            dout, out_kept, keep_idx, delta, dq, dk, dv,
            *dout.stride(), *out_kept.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            heads, n, n_keep, d, n_iter, delta_tiles,
            ZERO_KV=not mode_q, BLOCK_R=block_r, BLOCK_D=block_d,
        )
        _bwd_dkdv_kernel[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), bh)](
            q_kept, k_saved, v_saved, dout, lse_kept, delta, keep_idx, dk, dv,
            qk_scale, scale * grad_scale, grad_scale,
            *q_kept.stride(), *k_saved.stride(), *v_saved.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            heads, n_keep, n_keys, d, n_iter,
            CAUSAL=causal, MODE_Q=mode_q, DOT_PRECISION=precision, BLOCK_D=block_d,
        )
        _bwd_dq_kernel[lambda meta: (triton.cdiv(n_keep, meta["BLOCK_M"]), bh)](
            q_kept, k_saved, v_saved, dout, lse_kept, delta, keep_idx, dq,
            qk_scale, scale * grad_scale,
            *q_kept.stride(), *k_saved.stride(), *v_saved.stride(), *dout.stride(), *dq.stride(),
            heads, n_keep, n_keys, d,
            CAUSAL=causal, MODE_Q=mode_q, DOT_PRECISION=precision, BLOCK_D=block_d,
        )
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale):
    _check_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, mode)
    return dout.new_empty(dout.shape), dout.new_empty(dout.shape), dout.new_empty(dout.shape)


def attention_backward(dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, causal, scale, mode, grad_scale):
    """reference.attention_backward with Triton kernels, reading dO [B, h, n, d] (any strides)
    through keep_idx. Returns full-size (dq, dk, dv), zero on tokens that take no gradient."""
    return torch.ops.sbp.attention_backward_triton(
        dout, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, bool(causal), float(scale), mode,
        float(grad_scale),
    )
