// Plain CUDA kernels (no torch headers) behind the CUDA kernel of sbp::kept_rows_backward, the
// backward of linear and pointwise conv on kept rows (DESIGN.md 3.1 / 3.2, 4). Tensors are raw
// pointers with int64 strides in elements; every launcher runs on the given stream and returns
// the launch's cudaError_t. Instantiated for T in {float, double, __half, __nv_bfloat16} and
// Index in {int32_t, int64_t} in kept_rows_kernels.cu; csrc/cuda/kept_rows.cpp is the torch
// binding.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace sbp {
namespace cuda_kernels {

// Strides, in elements, of a [batch, rows, cols] view.
struct Strides3 {
  int64_t batch, row, col;
};

// out[b, k, c] = scale * in[b, idx[k], c] for b < batch, k < n_keep, c < n_cols, computed in
// float (double for double).
// `in` is [batch, n_rows, n_cols] read through `in_strides`; `out` is a contiguous
// [batch, n_keep, n_cols] buffer. Coalesced (and 16-byte vectorised when aligned) along the
// columns when in_strides.col == 1, through a shared-memory tile transpose otherwise (e.g. rows
// contiguous, the NCHW pointwise-conv case). An index outside [0, n_rows) gives a zero row; the
// Python layer validates keep sets, this only guarantees no out-of-bounds access.
template <typename T, typename Index>
cudaError_t gather_rows(const T* in, Strides3 in_strides, const Index* idx, int64_t batch,
                        int64_t n_rows, int64_t n_keep, int64_t n_cols, double scale, T* out,
                        cudaStream_t stream);

// row_to_kept[r] = k where idx[k] == r, -1 for rows not in idx (r < n_rows). `row_to_kept` is an
// int32 buffer of n_rows elements that the caller allocates (so n_keep <= INT32_MAX). Indices
// outside [0, n_rows) are ignored. Two async steps on `stream`: a memset to -1, then one kernel.
template <typename Index>
cudaError_t build_row_map(const Index* idx, int64_t n_keep, int64_t n_rows, int32_t* row_to_kept,
                          cudaStream_t stream);

// Writes every element of out [batch, n_rows, n_cols] (through `out_strides`), in one launch:
// out[b, r, :] = src[b, row_to_kept[r], :] for kept rows and 0 for the others. `src` is
// [batch, n_keep, n_cols] read through `src_strides`. Coalesced along the columns when
// out_strides.col == 1 ([B, n, C] storage) and along the rows through a shared-memory tile
// transpose otherwise ([B, C, n] storage).
template <typename T>
cudaError_t scatter_rows_zero_fill(const T* src, Strides3 src_strides, const int32_t* row_to_kept,
                                   int64_t batch, int64_t n_rows, int64_t n_cols, T* out,
                                   Strides3 out_strides, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace sbp
