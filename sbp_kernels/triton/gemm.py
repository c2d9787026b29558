"""The Triton GEMM every kept-rows backward is built from (linear, pointwise conv, fused MLP).

One kernel, `_kept_gemm_kernel`, serves every product of the SBP backward. Activations are "row
tensors" `[batch, positions, channels]` read through three strides (so NCHW / channels_last conv
gradients, transposed and expanded views are read in place); the rows of a product are the
flattened (batch, kept row) pairs, `batch * n_keep` of them. The kernel has two shapes:

- row GEMM (`ROWS_ON_K=False`): `C[r, :] = scale * A[r, :] @ B` over the rows r, B a plain matrix
  (a weight). A's rows may be read at their original positions through `keep_idx` inside the tile
  loads (`A_IDX`: no gathered copy of dy); C's rows may be written at their original positions
  (`C_IDX`), in which case the same launch has extra programs that write zeros into every dropped
  position, so `dx` comes out of ONE launch. An epilogue may multiply by `act'(H[r, :])`
  (`EPI_ACT`: the MLP's hidden gradient).
- weight GEMM (`ROWS_ON_K=True`): `C = scale * A^T @ B`, the reduction running over the rows (A's
  read through `keep_idx` if `A_IDX`), B optionally passed through an activation as it is loaded
  (`B_ACT`: the MLP's `act(h_K)` is never materialised), and the row sums of A as a bias gradient
  (`HAS_BIAS`), written by the programs of the first column block.

Tiles accumulate in fp32 for fp32 / fp16 / bf16 inputs (fp64 for fp64 inputs); fp32 inputs use IEEE
products unless `torch.backends.cuda.matmul.allow_tf32` is set, like torch.matmul. Constants are
kernel arguments (no module-level tl.constexpr globals, which break torch.compile).
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

# activation name -> the code the kernels switch on (0 = none).
ACTIVATION_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


def autotuning():
    """Whether the Triton kernels autotune over their config lists (the default).

    SBP_TRITON_AUTOTUNE=0 gives each kernel ONE config that fits every supported dtype and head dim
    on H100 (shared memory checked by compiling for sm_90): a fresh GPU machine then compiles one
    variant per specialization instead of six, which is what keeps a GPU test run (dozens of
    dtype / head-dim / causal / mode specializations, fp32 FMA tiles taking seconds each to
    compile) within its time limit. Read once, when the kernels are defined.
    """
    return os.environ.get("SBP_TRITON_AUTOTUNE", "1") != "0"


def _configs():
    if triton_interpreted():
        # The interpreter runs programs one by one in numpy: one small config keeps tests fast.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
    if not autotuning():
        # Fits fp64 too (3 stages of 64x32 + 32x64 fp64 tiles: 96 KiB of shared memory).
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4)]
    # H100-friendly tiles; the autotuner drops any that do not fit (e.g. fp32 shared memory).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=5, num_warps=2),
    ]


@triton.jit
def _row_offsets(rows, rows_per_batch, idx_ptr, stride_batch, stride_row, HAS_IDX: tl.constexpr):
    """Element offsets of flattened rows r = b * rows_per_batch + k, at position idx[k] or k."""
    batch = rows // rows_per_batch
    k = rows % rows_per_batch  # always in range, so the index load needs no mask
    if HAS_IDX:
        pos = tl.load(idx_ptr + k).to(tl.int64)
    else:
        pos = k.to(tl.int64)
    return batch.to(tl.int64) * stride_batch + pos * stride_row


@triton.jit
def _activation(h, ACT: tl.constexpr):
    """act(h) in fp32 for the codes of ACTIVATION_CODES."""
    if ACT == 1:  # exact GELU
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        y = 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 3:  # ReLU
        y = tl.where(h > 0.0, h, 0.0)
    else:  # SiLU
        y = h * tl.sigmoid(h)
    return y


@triton.jit
def _activation_grad(h, ACT: tl.constexpr):
    """act'(h) in fp32 (ReLU: 1 where h > 0, else 0, like threshold_backward)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        d = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    elif ACT == 3:
        d = tl.where(h > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(h)
        d = s * (1.0 + h * (1.0 - s))
    return d


@triton.jit
def _gemm_tile(
    pid, a_ptr, b_ptr, c_ptr, h_ptr, bias_ptr, idx_ptr,
    M, N, K, rows_per_batch, scale,
    stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc,
    stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
    ROWS_ON_K: tl.constexpr, A_IDX: tl.constexpr, C_IDX: tl.constexpr,
    B_ACT: tl.constexpr, EPI_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share column blocks of B while they are in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # fp32 accumulation (fp64 for fp64 inputs: tl.dot of fp64 operands returns fp64).
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    bias_acc = tl.zeros((BLOCK_M,), dtype=acc_ty)
    if not ROWS_ON_K:
        a_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_ab, stride_ar, A_IDX)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if ROWS_ON_K:
            # A^T tile [BLOCK_M channels, BLOCK_K rows]; B tile [BLOCK_K rows, BLOCK_N channels].
            a_k = _row_offsets(offs_k, rows_per_batch, idx_ptr, stride_ab, stride_ar, A_IDX)
            a_offs = offs_m[:, None] * stride_ac + a_k[None, :]
            b_k = _row_offsets(offs_k, rows_per_batch, idx_ptr, stride_bb, stride_br, False)
            b_offs = b_k[:, None] + offs_n[None, :] * stride_bc
        else:
            a_offs = a_rows[:, None] + offs_k[None, :] * stride_ac
            b_offs = offs_k[:, None] * stride_br + offs_n[None, :] * stride_bc
        a = tl.load(a_ptr + a_offs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if B_ACT != 0:
            b = _activation(b.to(acc_ty), B_ACT).to(b_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias_acc += tl.sum(a.to(acc_ty), axis=1)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)

    acc = acc * scale
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ROWS_ON_K:
        c_offs = offs_m[:, None] * stride_cr + offs_n[None, :] * stride_cc
    else:
        if EPI_ACT != 0:
            h_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_hb, stride_hr, False)
            h = tl.load(h_ptr + h_rows[:, None] + offs_n[None, :] * stride_hc, mask=mask_c, other=0.0)
            acc = acc * _activation_grad(h.to(acc_ty), EPI_ACT)
        c_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_cb, stride_cr, C_IDX)
        c_offs = c_rows[:, None] + offs_n[None, :] * stride_cc
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
    if HAS_BIAS:
        if pid_n == 0:  # one column block stores the bias gradient (a scalar branch, not a mask)
            tl.store(bias_ptr + offs_m, (bias_acc * scale).to(bias_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _zero_tile(
    zpid, c_ptr, keep_mask_ptr, N, positions, out_rows, stride_cb, stride_cr, stride_cc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Zeros of the dropped positions in a [BLOCK_M rows of batch * positions, BLOCK_N] tile of C."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    rows = (zpid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (zpid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = rows % positions
    kept = tl.load(keep_mask_ptr + pos)  # pos < positions: in range
    row_offs = (rows // positions).to(tl.int64) * stride_cb + pos.to(tl.int64) * stride_cr
    mask = ((rows < out_rows) & (kept == 0))[:, None] & (offs_n < N)[None, :]
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
    tl.store(c_ptr + row_offs[:, None] + offs_n[None, :] * stride_cc, zeros, mask=mask)


# Key: the sizes and every constexpr that changes the compiled loop (the autotuner adds the tensor
# dtypes itself). Nothing accumulates into an output, so benchmark runs need no reset_to_zero.
@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "ROWS_ON_K", "A_IDX", "C_IDX", "EPI_ACT", "B_ACT", "HAS_BIAS", "DOT_PRECISION"],
)
@triton.jit
def _kept_gemm_kernel(
    a_ptr, b_ptr, c_ptr, h_ptr, bias_ptr, idx_ptr, keep_mask_ptr,
    M, N, K, rows_per_batch, positions, out_rows, scale,
    stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc,
    stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
    ROWS_ON_K: tl.constexpr, A_IDX: tl.constexpr, C_IDX: tl.constexpr,
    B_ACT: tl.constexpr, EPI_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Programs [0, gemm tiles) compute C tiles; with C_IDX the rest zero-fill dropped positions."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if pid < num_tiles:
        _gemm_tile(
            pid, a_ptr, b_ptr, c_ptr, h_ptr, bias_ptr, idx_ptr,
            M, N, K, rows_per_batch, scale,
            stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc,
            stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
            ROWS_ON_K, A_IDX, C_IDX, B_ACT, EPI_ACT, HAS_BIAS, DOT_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )
    else:
        if C_IDX:
            _zero_tile(
                pid - num_tiles, c_ptr, keep_mask_ptr, N, positions, out_rows, stride_cb, stride_cr, stride_cc,
                BLOCK_M, BLOCK_N,
            )


def device_guard(t):
    """Makes t's GPU the current device, so Triton launches there on its current stream."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(a, b, c, *, M, N, K, keep_idx, rows_on_k, a_idx=False, c_idx=False, b_act=0, h=None,
            epi_act=0, bias=None, scale=1.0):
    keep_idx = keep_idx.contiguous()  # the kernel reads idx_ptr + k: a strided view would be misread
    if M == 0 or N == 0:  # degenerate sizes (an empty batch, zero channels): no tiles to launch
        c.zero_()
        if bias is not None:
            rows = a.index_select(1, keep_idx) if a_idx else a
            bias.copy_(rows.sum((0, 1), dtype=torch.promote_types(rows.dtype, torch.float32)) * scale)
        return
    positions = c.shape[1] if c_idx else 1
    # Rows of batch * positions the zero-fill programs cover: none when every position is kept.
    out_rows = c.shape[0] * positions if c_idx and keep_idx.shape[0] < positions else 0
    keep_mask = None
    if out_rows:
        # 1 on kept positions, 0 on dropped: what the zero-fill programs read (n bytes).
        keep_mask = torch.zeros(positions, dtype=torch.int8, device=c.device).index_fill_(0, keep_idx.long(), 1)
    if rows_on_k:
        b_strides = b.stride()
        c_strides = (0, *c.stride())
    else:
        b_strides = (0, *b.stride())
        c_strides = c.stride()
    h_strides = h.stride() if h is not None else (0, 0, 0)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        if out_rows:
            tiles += triton.cdiv(out_rows, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles,)

    with device_guard(c):
        _kept_gemm_kernel[grid](
            a, b, c, h if h is not None else c, bias if bias is not None else c, keep_idx,
            keep_mask if keep_mask is not None else keep_idx,
            M, N, K, keep_idx.shape[0], positions, out_rows, float(scale),
            *a.stride(), *b_strides, *c_strides, *h_strides,
            ROWS_ON_K=rows_on_k, A_IDX=a_idx, C_IDX=c_idx, B_ACT=b_act, EPI_ACT=epi_act,
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
        )


def row_gemm(a, weight, out, keep_idx, *, gather_a, scatter_out, scale=1.0, h=None, activation=None):
    """out rows = scale * (rows of a) @ weight [* act'(h rows)], one launch.

    a [B, n or n_keep, k] (its kept rows read through keep_idx when gather_a), weight [k, N],
    out [B, n or n_keep, N]: with scatter_out the kept rows land at keep_idx and every other
    position is zero-filled by the same launch. h [B, n_keep, N] compact, with activation
    (a name of ACTIVATION_CODES) the epilogue multiplies by act'(h).
    """
    batch, n_keep = a.shape[0], keep_idx.shape[0]
    _launch(
        a, weight, out, M=batch * n_keep, N=weight.shape[1], K=weight.shape[0], keep_idx=keep_idx,
        rows_on_k=False, a_idx=gather_a, c_idx=scatter_out, h=h,
        epi_act=ACTIVATION_CODES[activation] if activation else 0, scale=scale,
    )
    return out


def weight_gemm(a, b, out, bias_out, keep_idx, *, gather_a, scale=1.0, activation=None):
    """out = scale * sum over rows of a[row]^T b[row], bias_out = scale * sum over rows of a[row].

    a [B, n or n_keep, M] (its kept rows read through keep_idx when gather_a), b [B, n_keep, N]
    compact, passed through act (a name of ACTIVATION_CODES) as it is loaded; out [M, N],
    bias_out [M] or None.
    """
    batch, n_keep = a.shape[0], keep_idx.shape[0]
    _launch(
        a, b, out, M=a.shape[2], N=b.shape[2], K=batch * n_keep, keep_idx=keep_idx, rows_on_k=True,
        a_idx=gather_a, b_act=ACTIVATION_CODES[activation] if activation else 0, bias=bias_out,
        scale=scale,
    )
    return out, bias_out


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, rows, n_keep, inner,
    stride_xb, stride_xr, stride_xc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, k, c] = x[b, idx[k], c]: strided reads, contiguous writes."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_rows = _row_offsets(offs_r, n_keep, idx_ptr, stride_xb, stride_xr, True)
    mask = (offs_r < rows)[:, None] & (offs_c < inner)[None, :]
    vals = tl.load(x_ptr + x_rows[:, None] + offs_c[None, :] * stride_xc, mask=mask)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * inner + offs_c[None, :], vals, mask=mask)


def gather_rows(x, keep_idx, dim):
    """x.index_select(dim, keep_idx) as a compact contiguous tensor, read in place through strides.

    Any x whose dims before `dim` and after `dim` each collapse into one strided dim (contiguous
    tensors, NCHW and channels_last [B, H*W, C] row views, ...); others go through index_select.
    """
    dim = dim % x.dim()
    outer = inner = 1
    for size in x.shape[:dim]:
        outer *= size
    for size in x.shape[dim + 1:]:
        inner *= size
    out_shape = (*x.shape[:dim], keep_idx.shape[0], *x.shape[dim + 1:])
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    try:
        x3 = x.view(outer, x.shape[dim], inner) if x.dim() != 3 or dim != 1 else x
    except RuntimeError:
        return x.index_select(dim, keep_idx)
    rows = outer * keep_idx.shape[0]
    keep_idx = keep_idx.contiguous()  # the kernel reads idx_ptr + k
    if rows == 0 or inner == 0:
        return out
    block_r, block_c = (16, 16) if triton_interpreted() else (32, min(128, triton.next_power_of_2(inner)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inner, block_c))
    with device_guard(out):
        _gather_rows_kernel[grid](
            x3, keep_idx, out, rows, keep_idx.shape[0], inner, *x3.stride(), BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return out
