"""The Triton GEMMs every kept-rows backward is built from (linear, pointwise conv, fused MLP).

Activations are "row tensors" `[batch, positions, channels]` read through three strides (so NCHW /
channels_last conv gradients, transposed and expanded views are read in place); the rows of a
product are the flattened (batch, kept row) pairs, `batch * n_keep` of them. Two kernels:

- `_row_gemm_kernel`: `C[r, :] = scale * A[r, :] @ B` over the rows r, B a plain matrix (a
  weight). A's rows may be read at their original positions through `keep_idx` (`A_IDX`: no
  gathered copy of dy); C's rows may be written at their original positions (`C_IDX`), in which
  case the same launch has extra programs that write zeros into every dropped position, so `dx`
  comes out of ONE launch. An epilogue may multiply by `act'(H[r, :])` (`EPI_ACT`: the MLP's
  hidden gradient).
- `_weight_gemm_kernel`: `C = scale * act(A)^T @ B`, the reduction running over the rows, A the
  layer's input side (x, or the MLP's pre-activation h with `A_ACT`: act(h) is never
  materialised; it is the wgmma operand that may come from registers), B the gradient side (dy,
  read through `keep_idx` with `B_IDX`), and the row sums of B as the bias gradient
  (`HAS_BIAS`, by extra programs of the same launch). A weight gradient is a small output with a
  long reduction: when its tiles fill less than one wave of the GPU's multiprocessors the rows
  are split into `splits` chunks whose fp32 partial products `_split_sum_kernel` adds up in a
  fixed order (deterministic split-K).

keep_idx-gathered tiles of the weight GEMM are software-pipelined like plain ones: the gathered
row offsets of the next K step are loaded into registers one step ahead (loop-carried), so no
tile load depends on an index load of the same iteration. (When one did, Triton put the index and
the tile in single shared-memory buffers and waited for every cp.async at each K step.)

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
from .library import traceable

# activation name -> the code the kernels switch on (0 = none).
ACTIVATION_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}
# Multiprocessors of an H100 / H200: the split-K target where no GPU is at hand (CPU tests under
# the interpreter, the offline compile report), so they take the splits an H100 would.
HOPPER_SMS = 132


def autotuning():
    """Whether the Triton kernels autotune over their config lists (the default).

    SBP_TRITON_AUTOTUNE=0 gives each kernel ONE config that fits every supported dtype and head dim
    on H100 (shared memory checked by compiling for sm_90): a fresh GPU machine then compiles one
    variant per specialization instead of four, which is what keeps a GPU test run (dozens of
    dtype / head-dim / causal / mode specializations, fp32 FMA tiles taking seconds each to
    compile) within its time limit. Read once, when the kernels are defined.
    """
    return os.environ.get("SBP_TRITON_AUTOTUNE", "1") != "0"


def _configs():
    """Autotune configs of both GEMM kernels.

    Under the interpreter one small config keeps tests fast; with autotuning off, one config that
    fits fp64 too (3 stages of 64x32 + 32x64 fp64 tiles: 96 KiB of shared memory). Every listed
    tile compiles for sm_90 without spills, within 227 KiB of shared memory for 16-bit inputs, with
    wgmma for fp16 / bf16 (one or two warpgroups) and a pipelined main loop
    (`python -m sbp_kernels.kernel_report --check`); the autotuner drops any that do not fit
    (e.g. fp32 shared memory). No 128 x 256 tile: it spills in the MLP's act' epilogue, and its
    few tiles would make small weight gradients split further for every config.
    """
    if triton_interpreted():
        table = [(16, 16, 16, 1, 1)]
    elif not autotuning():
        table = [(64, 64, 32, 4, 3)]
    else:
        table = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in table
    ]


if triton_interpreted():

    def loop_bound(x):
        """A loop bound as a Python int. Triton's interpreter (3.6) holds runtime scalars as
        1-element numpy arrays, which numpy >= 2.4 refuses to turn into an int for range()."""
        return int(x.handle.data.reshape(-1)[0]) if isinstance(x, tl.tensor) else x

else:

    @triton.jit
    def loop_bound(x):
        """A loop bound (the identity when compiled; see the interpreter version)."""
        return x


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
def _tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, columns) of C's tile pid, in grouped order: GROUP_M row blocks share column blocks of
    B while they are in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


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
def _row_tile(
    pid, a_ptr, b_ptr, c_ptr, h_ptr, idx_ptr, M, N, K, rows_per_batch, scale,
    stride_ab, stride_ar, stride_ac, stride_bk, stride_bn,
    stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
    A_IDX: tl.constexpr, C_IDX: tl.constexpr, EPI_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # fp32 accumulation (fp64 for fp64 inputs: tl.dot of fp64 operands returns fp64).
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    a_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_ab, stride_ar, A_IDX)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] + offs_k[None, :] * stride_ac, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)

    acc = acc * scale
    mask_c = mask_m[:, None] & mask_n[None, :]
    if EPI_ACT != 0:
        h_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_hb, stride_hr, False)
        h = tl.load(h_ptr + h_rows[:, None] + offs_n[None, :] * stride_hc, mask=mask_c, other=0.0)
        acc = acc * _activation_grad(h.to(acc_ty), EPI_ACT)
    c_rows = _row_offsets(offs_m, rows_per_batch, idx_ptr, stride_cb, stride_cr, C_IDX)
    tl.store(c_ptr + c_rows[:, None] + offs_n[None, :] * stride_cc, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


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


# Keys: the sizes and every constexpr that changes the compiled loop (the autotuner adds the tensor
# dtypes itself). Nothing accumulates into an output, so benchmark runs need no reset_to_zero.
@triton.autotune(configs=_configs(), key=["M", "N", "K", "A_IDX", "C_IDX", "EPI_ACT", "DOT_PRECISION"])
@triton.jit
def _row_gemm_kernel(
    a_ptr, b_ptr, c_ptr, h_ptr, idx_ptr, keep_mask_ptr,
    M, N, K, rows_per_batch, positions, out_rows, scale,
    stride_ab, stride_ar, stride_ac, stride_bk, stride_bn,
    stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
    A_IDX: tl.constexpr, C_IDX: tl.constexpr, EPI_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Programs [0, gemm tiles) compute C tiles; with C_IDX the rest zero-fill dropped positions."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if pid < num_tiles:
        _row_tile(
            pid, a_ptr, b_ptr, c_ptr, h_ptr, idx_ptr, M, N, K, rows_per_batch, scale,
            stride_ab, stride_ar, stride_ac, stride_bk, stride_bn,
            stride_cb, stride_cr, stride_cc, stride_hb, stride_hr, stride_hc,
            A_IDX, C_IDX, EPI_ACT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )
    else:
        if C_IDX:
            _zero_tile(
                pid - num_tiles, c_ptr, keep_mask_ptr, N, positions, out_rows, stride_cb, stride_cr, stride_cc,
                BLOCK_M, BLOCK_N,
            )


@triton.jit
def _weight_tile(
    pid, split, a_ptr, b_ptr, c_ptr, idx_ptr, M, N, rows_per_batch, k_start, k_end, scale,
    stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc, stride_cs, stride_cm, stride_cn,
    A_ACT: tl.constexpr, B_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C tile of one split: A^T tile [BLOCK_M channels, BLOCK_K rows] @ B tile [BLOCK_K rows, BLOCK_N]."""
    offs_m, offs_n = _tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    b_rows = _row_offsets(k_start + tl.arange(0, BLOCK_K), rows_per_batch, idx_ptr, stride_bb, stride_br, B_IDX)
    for k0 in range(loop_bound(k_start), loop_bound(k_end), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a_rows = _row_offsets(offs_k, rows_per_batch, idx_ptr, stride_ab, stride_ar, False)
        a = tl.load(a_ptr + offs_m[:, None] * stride_ac + a_rows[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] + offs_n[None, :] * stride_bc, mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        # Gathered row offsets of the next K step, loaded one step ahead (see the module doc).
        b_rows = _row_offsets(offs_k + BLOCK_K, rows_per_batch, idx_ptr, stride_bb, stride_br, B_IDX)
        if A_ACT != 0:
            a = _activation(a.to(acc_ty), A_ACT).to(a_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)
    c_offs = split.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr + c_offs, (acc * scale).to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bias_block(
    block, split, b_ptr, bias_ptr, idx_ptr, N, rows_per_batch, k_start, k_end, scale,
    stride_bb, stride_br, stride_bc, stride_bias_s,
    B_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """bias[split, n] = scale * the sum of B's rows of the split, for BLOCK_N columns."""
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_ty = tl.float64 if b_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_ty)
    for k0 in range(loop_bound(k_start), loop_bound(k_end), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        b_rows = _row_offsets(offs_k, rows_per_batch, idx_ptr, stride_bb, stride_br, B_IDX)
        b = tl.load(b_ptr + b_rows[:, None] + offs_n[None, :] * stride_bc,
                    mask=(offs_k < k_end)[:, None] & mask_n[None, :], other=0.0)
        acc += b.to(acc_ty)
    bias = tl.sum(acc, axis=0) * scale
    tl.store(bias_ptr + split * stride_bias_s + offs_n, bias.to(bias_ptr.dtype.element_ty), mask=mask_n)


@triton.autotune(
    configs=_configs(), key=["M", "N", "K", "k_split", "A_ACT", "B_IDX", "HAS_BIAS", "DOT_PRECISION"],
)
@triton.jit
def _weight_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, idx_ptr,
    M, N, K, rows_per_batch, k_split, scale,
    stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc,
    stride_cs, stride_cm, stride_cn, stride_bias_s,
    A_ACT: tl.constexpr, B_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Split s = program_id(1) of C = scale * act(A)^T @ B over rows [s * k_split, (s + 1) * k_split):
    programs [0, tiles) compute C tiles; with HAS_BIAS the rest sum B's rows into the split's bias.

    The bias has programs of its own so the GEMM loop stays a plain pipelined loop: summing the
    pipelined B tile in it would give the tile a register user besides the wgmma, and Triton then
    allocates one shared-memory buffer too few (the next cp.async overwrites a tile that an
    in-flight wgmma still reads) and needs many more registers.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k_start = split * k_split
    k_end = tl.minimum(K, k_start + k_split)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if pid < num_tiles:
        _weight_tile(
            pid, split, a_ptr, b_ptr, c_ptr, idx_ptr, M, N, rows_per_batch, k_start, k_end, scale,
            stride_ab, stride_ar, stride_ac, stride_bb, stride_br, stride_bc, stride_cs, stride_cm, stride_cn,
            A_ACT, B_IDX, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )
    else:
        if HAS_BIAS:
            _bias_block(
                pid - num_tiles, split, b_ptr, bias_ptr, idx_ptr, N, rows_per_batch, k_start, k_end, scale,
                stride_bb, stride_br, stride_bc, stride_bias_s, B_IDX, BLOCK_N, BLOCK_K,
            )


@triton.jit
def _split_sum_kernel(
    part_ptr, bias_part_ptr, c_ptr, bias_ptr, M, N, splits, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """c[m, n] = sum over s = 0, 1, ... of part[s, m, n], in that order (deterministic); programs
    past the last block of c do the same for the bias from bias_part [splits, N]."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(M * N, BLOCK)
    if pid < c_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
        parts = part_ptr + offs
        for _ in range(0, splits):
            acc += tl.load(parts, mask=mask, other=0.0)
            parts += M * N
        c_offs = (offs // N).to(tl.int64) * stride_cm + (offs % N).to(tl.int64) * stride_cn
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            offs = (pid - c_blocks) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            acc = tl.zeros((BLOCK,), dtype=bias_part_ptr.dtype.element_ty)
            parts = bias_part_ptr + offs
            for _ in range(0, splits):
                acc += tl.load(parts, mask=mask, other=0.0)
                parts += N
            tl.store(bias_ptr + offs, acc.to(bias_ptr.dtype.element_ty), mask=mask)


def device_guard(t):
    """Makes t's GPU the current device, so Triton launches there on its current stream."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def unused(like):
    """A pointer argument the kernel never dereferences (its constexpr switch is off): an empty
    tensor of its own, never an alias of a tensor the kernel writes, which a traced launch
    (wrap_triton) could take for that output when it cannot analyse the kernel's stores."""
    return like.new_empty(0)


def dot_precision(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def row_gemm(a, weight, out, keep_idx, *, gather_a, scatter_out, scale=1.0, h=None, activation=None):
    """out rows = scale * (rows of a) @ weight [* act'(h rows)], one launch.

    a [B, n or n_keep, k] (its kept rows read through keep_idx when gather_a), weight [k, N],
    out [B, n or n_keep, N]: with scatter_out the kept rows land at keep_idx and every other
    position is zero-filled by the same launch. h [B, n_keep, N] compact, with activation
    (a name of ACTIVATION_CODES) the epilogue multiplies by act'(h).
    """
    keep_idx = keep_idx.contiguous()  # the kernel reads idx_ptr + k: a strided view would be misread
    M, N, K = a.shape[0] * keep_idx.shape[0], weight.shape[1], weight.shape[0]
    if M == 0 or N == 0:  # degenerate sizes (an empty batch, zero channels): no tiles to launch
        return out.zero_()
    positions = out.shape[1] if scatter_out else 1
    # Rows of batch * positions the zero-fill programs cover: none when every position is kept.
    out_rows = out.shape[0] * positions if scatter_out and keep_idx.shape[0] < positions else 0
    keep_mask = keep_idx
    if out_rows:
        # 1 on kept positions, 0 on dropped: what the zero-fill programs read (n bytes).
        keep_mask = torch.zeros(positions, dtype=torch.int8, device=out.device).index_fill_(0, keep_idx.long(), 1)
    h_strides = h.stride() if h is not None else (0, 0, 0)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles + triton.cdiv(out_rows, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(out):
        traceable(_row_gemm_kernel)[grid](
            a, weight, out, h if h is not None else unused(out), keep_idx, keep_mask,
            M, N, K, keep_idx.shape[0], positions, out_rows, float(scale),
            *a.stride(), *weight.stride(), *out.stride(), *h_strides,
            A_IDX=gather_a, C_IDX=scatter_out, EPI_ACT=ACTIVATION_CODES[activation] if activation else 0,
            DOT_PRECISION=dot_precision(a.dtype),
        )
    return out


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_SMS


def split_k(M, N, K, device):
    """(splits, k_split): the fewest row chunks that give every weight-GEMM config at least one
    wave of programs, each chunk a multiple of every config's BLOCK_K rows (so chunks hold whole
    K steps). One split when the tiles alone fill the GPU."""
    configs = _weight_gemm_kernel.configs
    tiles = min(triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"]) for c in configs)
    granule = max(c.kwargs["BLOCK_K"] for c in configs)
    want = triton.cdiv(_sm_count(device), tiles)
    k_split = triton.cdiv(triton.cdiv(max(K, 1), want), granule) * granule
    return triton.cdiv(max(K, 1), k_split), k_split


def weight_gemm(a, b, out, bias_out, keep_idx, *, gather_b, scale=1.0, activation=None):
    """out^T = scale * sum over rows of act(a[row])^T b[row]; bias_out = scale * sum over rows of b[row].

    a [B, n_keep, M] compact (passed through act, a name of ACTIVATION_CODES, as it is loaded),
    b [B, n or n_keep, N] (its kept rows read through keep_idx when gather_b); out [N, M] (a
    weight's gradient, any strides), bias_out [N] or None.
    """
    keep_idx = keep_idx.contiguous()  # the kernel reads idx_ptr + k
    M, N, K = a.shape[2], b.shape[2], a.shape[0] * keep_idx.shape[0]
    if M == 0 or N == 0 or K == 0:  # no tiles, or an empty sum
        out.zero_()
        if bias_out is not None:
            bias_out.zero_()
        return
    splits, k_split = split_k(M, N, K, out.device)
    c, bias_c = out.t(), bias_out
    if splits > 1:  # fp32 partials [splits, M, N] and [splits, N], added up below
        c = torch.empty((splits, M, N), dtype=torch.float32, device=out.device)
        bias_c = torch.empty((splits, N), dtype=torch.float32, device=out.device) if bias_out is not None else None
    c_strides = c.stride() if splits > 1 else (0, *c.stride())
    def grid(meta):
        blocks_n = triton.cdiv(N, meta["BLOCK_N"])
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * blocks_n
        return tiles + (blocks_n if bias_out is not None else 0), splits  # + the bias programs

    with device_guard(out):
        traceable(_weight_gemm_kernel)[grid](
            a, b, c, bias_c if bias_c is not None else unused(c), keep_idx,
            M, N, K, keep_idx.shape[0], k_split, float(scale),
            *a.stride(), *b.stride(), *c_strides, N if splits > 1 else 0,
            A_ACT=ACTIVATION_CODES[activation] if activation else 0, B_IDX=gather_b,
            HAS_BIAS=bias_out is not None, DOT_PRECISION=dot_precision(a.dtype),
        )
        if splits > 1:
            block = 64 if triton_interpreted() else 1024
            blocks = triton.cdiv(M * N, block) + (triton.cdiv(N, block) if bias_out is not None else 0)
            traceable(_split_sum_kernel)[(blocks,)](
                c, bias_c if bias_c is not None else unused(c), out.t(),
                bias_out if bias_out is not None else unused(out),
                M, N, splits, *out.t().stride(), HAS_BIAS=bias_out is not None, BLOCK=block,
            )


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
        traceable(_gather_rows_kernel)[grid](
            x3, keep_idx, out, rows, keep_idx.shape[0], inner, *x3.stride(), BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return out
