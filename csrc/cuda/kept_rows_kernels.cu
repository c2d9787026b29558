// Plain CUDA kernels of sbp::kept_rows_backward (declared in kept_rows_kernels.h): the gather of
// the kept rows of grad_out, the row -> kept-index map, and the one-pass zero-filling scatter of
// grad_x. No torch headers, so `nvcc -c` checks this file on a machine without a GPU
// (scripts/check_cuda_sources.sh).
//
// Two kernel shapes, both grid-stride loops with 64-bit offsets:
// - copy_rows_kernel: destination columns unit-stride. One thread moves VEC consecutive columns
//   of one row (16-byte vectors when strides and pointers allow, else VEC = 1), consecutive
//   threads take consecutive column chunks, so loads and stores are coalesced along the columns.
// - copy_rows_tiled_kernel: 32 x 32 (row, column) tiles through shared memory, 32 x 8 threads;
//   the load runs its lanes along the source's fast axis and the store along the destination's,
//   for the cases where they differ (rows contiguous on one side, columns on the other).
#include "kept_rows_kernels.h"

#include <algorithm>

namespace sbp {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;   // copy_rows_kernel block size
constexpr int kTile = 32;       // copy_rows_tiled_kernel tile side (= blockDim.x)
constexpr int kTileRows = 8;    // copy_rows_tiled_kernel blockDim.y
constexpr int kBlocksPerSm = 8;

// Arithmetic type of each element type: float, or double for double.
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ double to_opmath(double x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> x);
template <>
__device__ __forceinline__ float from_opmath<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_opmath<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_opmath<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Source row of destination row k of the gather: idx[k], or -1 when out of range.
template <typename Index>
struct GatherRow {
  const Index* idx;
  int64_t n_rows;
  __device__ __forceinline__ int64_t operator()(int64_t k) const {
    const int64_t r = static_cast<int64_t>(idx[k]);
    return (r >= 0 && r < n_rows) ? r : -1;
  }
};

// Source row of destination row r of the scatter: its kept index, or -1 (a zero row).
struct MappedRow {
  const int32_t* row_to_kept;
  __device__ __forceinline__ int64_t operator()(int64_t r) const { return row_to_kept[r]; }
};

// dst[b, r, c] = scale * src[b, src_row(r), c] (0 where src_row(r) < 0), dst.col == 1.
// VEC > 1 needs src.col == 1, n_cols % VEC == 0 and VEC-aligned strides and pointers.
template <typename T, int VEC, typename RowFn>
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const T* __restrict__ src, Strides3 ss, T* __restrict__ dst, Strides3 ds,
                     RowFn src_row, int64_t batch, int64_t dst_rows, int64_t n_cols,
                     opmath_t<T> scale) {
  const int64_t chunks = n_cols / VEC;
  const int64_t total = batch * dst_rows * chunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t row = i / chunks;
    const int64_t c = (i - row * chunks) * VEC;
    const int64_t b = row / dst_rows;
    const int64_t r = row - b * dst_rows;
    const int64_t s = src_row(r);
    Vec<T, VEC> out;
    if (s >= 0) {
      const T* p = src + b * ss.batch + s * ss.row;
      if constexpr (VEC == 1) {
        out.v[0] = from_opmath<T>(to_opmath(p[c * ss.col]) * scale);
      } else {
        const Vec<T, VEC> in = *reinterpret_cast<const Vec<T, VEC>*>(p + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_opmath<T>(to_opmath(in.v[j]) * scale);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = from_opmath<T>(0);
    }
    *reinterpret_cast<Vec<T, VEC>*>(dst + b * ds.batch + r * ds.row + c) = out;
  }
}

// Same mapping as copy_rows_kernel for any strides, through 32 x 32 shared-memory tiles.
// SRC_ROWS_FAST: load lanes run along rows (source rows contiguous) and store lanes along
// columns (destination columns contiguous), else the other way round.
template <typename T, bool SRC_ROWS_FAST, typename RowFn>
__global__ void __launch_bounds__(kTile* kTileRows)
    copy_rows_tiled_kernel(const T* __restrict__ src, Strides3 ss, T* __restrict__ dst,
                           Strides3 ds, RowFn src_row, int64_t batch, int64_t dst_rows,
                           int64_t n_cols, opmath_t<T> scale) {
  __shared__ opmath_t<T> tile[kTile][kTile + 1];  // [row][col]; +1 keeps both phases conflict-free
  const int64_t row_tiles = (dst_rows + kTile - 1) / kTile;
  const int64_t col_tiles = (n_cols + kTile - 1) / kTile;
  const int64_t tiles = batch * row_tiles * col_tiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform per block: syncs are safe
    const int64_t bt = t / col_tiles;
    const int64_t c0 = (t - bt * col_tiles) * kTile;
    const int64_t b = bt / row_tiles;
    const int64_t r0 = (bt - b * row_tiles) * kTile;
    const T* src_b = src + b * ss.batch;
    for (int j = threadIdx.y; j < kTile; j += kTileRows) {
      const int rr = SRC_ROWS_FAST ? threadIdx.x : j;
      const int cc = SRC_ROWS_FAST ? j : threadIdx.x;
      const int64_t r = r0 + rr, c = c0 + cc;
      opmath_t<T> v = 0;
      if (r < dst_rows && c < n_cols) {
        const int64_t s = src_row(r);
        if (s >= 0) v = to_opmath(src_b[s * ss.row + c * ss.col]) * scale;
      }
      tile[rr][cc] = v;
    }
    __syncthreads();
    T* dst_b = dst + b * ds.batch;
    for (int j = threadIdx.y; j < kTile; j += kTileRows) {
      const int rr = SRC_ROWS_FAST ? j : threadIdx.x;
      const int cc = SRC_ROWS_FAST ? threadIdx.x : j;
      const int64_t r = r0 + rr, c = c0 + cc;
      if (r < dst_rows && c < n_cols) dst_b[r * ds.row + c * ds.col] = from_opmath<T>(tile[rr][cc]);
    }
    __syncthreads();
  }
}

template <typename Index>
__global__ void __launch_bounds__(kThreads)
    build_row_map_kernel(const Index* __restrict__ idx, int64_t n_keep, int64_t n_rows,
                         int32_t* __restrict__ row_to_kept) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n_keep;
       k += step) {
    const int64_t r = static_cast<int64_t>(idx[k]);
    if (r >= 0 && r < n_rows) row_to_kept[r] = static_cast<int32_t>(k);
  }
}

// Enough blocks to fill the device (kBlocksPerSm resident blocks of 256 threads per SM), fewer
// when there is less work; grid-stride loops cover the rest.
int grid_size(int64_t work_blocks) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // do not leave this query's error for the launch check
    sms = 128;
  }
  const int64_t max_blocks = int64_t{sms} * kBlocksPerSm;
  return static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, max_blocks)));
}

template <int VEC>
bool stride_ok(int64_t stride, int64_t size) {
  return size <= 1 || stride % VEC == 0;
}

template <int VEC, typename T>
bool pointer_ok(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC) == 0;
}

// Launches the row kernel, 16-byte vectorised when the layout allows. Needs ds.col == 1.
template <typename T, typename RowFn>
cudaError_t launch_copy_rows(const T* src, Strides3 ss, int64_t src_rows, T* dst, Strides3 ds,
                             RowFn src_row, int64_t batch, int64_t dst_rows, int64_t n_cols,
                             double scale, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorise = ss.col == 1 && n_cols % VEC == 0 && pointer_ok<VEC>(src) &&
                         pointer_ok<VEC>(dst) && stride_ok<VEC>(ss.batch, batch) &&
                         stride_ok<VEC>(ss.row, src_rows) && stride_ok<VEC>(ds.batch, batch) &&
                         stride_ok<VEC>(ds.row, dst_rows);
  const int64_t work = batch * dst_rows * (vectorise ? n_cols / VEC : n_cols);
  const int grid = grid_size((work + kThreads - 1) / kThreads);
  const opmath_t<T> op_scale = static_cast<opmath_t<T>>(scale);
  if (vectorise) {
    copy_rows_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(src, ss, dst, ds, src_row, batch,
                                                            dst_rows, n_cols, op_scale);
  } else {
    copy_rows_kernel<T, 1><<<grid, kThreads, 0, stream>>>(src, ss, dst, ds, src_row, batch,
                                                          dst_rows, n_cols, op_scale);
  }
  return cudaGetLastError();
}

template <typename T, bool SRC_ROWS_FAST, typename RowFn>
cudaError_t launch_copy_rows_tiled(const T* src, Strides3 ss, T* dst, Strides3 ds, RowFn src_row,
                                   int64_t batch, int64_t dst_rows, int64_t n_cols, double scale,
                                   cudaStream_t stream) {
  const int64_t tiles = batch * ((dst_rows + kTile - 1) / kTile) * ((n_cols + kTile - 1) / kTile);
  const int grid = grid_size(tiles);
  copy_rows_tiled_kernel<T, SRC_ROWS_FAST><<<grid, dim3(kTile, kTileRows), 0, stream>>>(
      src, ss, dst, ds, src_row, batch, dst_rows, n_cols, static_cast<opmath_t<T>>(scale));
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename Index>
cudaError_t gather_rows(const T* in, Strides3 in_strides, const Index* idx, int64_t batch,
                        int64_t n_rows, int64_t n_keep, int64_t n_cols, double scale, T* out,
                        cudaStream_t stream) {
  if (batch <= 0 || n_keep <= 0 || n_cols <= 0) return cudaSuccess;
  const Strides3 out_strides{n_keep * n_cols, n_cols, 1};
  const GatherRow<Index> src_row{idx, n_rows};
  if (in_strides.col == 1 || n_cols == 1) {
    return launch_copy_rows(in, in_strides, n_rows, out, out_strides, src_row, batch, n_keep,
                            n_cols, scale, stream);
  }
  // Columns strided (rows contiguous: NCHW grad_out, or a transposed view): tile transpose.
  return launch_copy_rows_tiled<T, true>(in, in_strides, out, out_strides, src_row, batch, n_keep,
                                         n_cols, scale, stream);
}

template <typename Index>
cudaError_t build_row_map(const Index* idx, int64_t n_keep, int64_t n_rows, int32_t* row_to_kept,
                          cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  // All bytes 0xFF: every int32 entry is -1.
  cudaError_t err = cudaMemsetAsync(row_to_kept, 0xFF, n_rows * sizeof(int32_t), stream);
  if (err != cudaSuccess || n_keep <= 0) return err;
  const int grid = grid_size((n_keep + kThreads - 1) / kThreads);
  build_row_map_kernel<Index><<<grid, kThreads, 0, stream>>>(idx, n_keep, n_rows, row_to_kept);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_rows_zero_fill(const T* src, Strides3 src_strides, const int32_t* row_to_kept,
                                   int64_t batch, int64_t n_rows, int64_t n_cols, T* out,
                                   Strides3 out_strides, cudaStream_t stream) {
  if (batch <= 0 || n_rows <= 0 || n_cols <= 0) return cudaSuccess;
  const MappedRow src_row{row_to_kept};
  // src has n_keep <= n_rows rows; its row stride only matters for vector alignment.
  if (out_strides.col == 1 || n_cols == 1) {
    return launch_copy_rows(src, src_strides, n_rows, out, out_strides, src_row, batch, n_rows,
                            n_cols, 1.0, stream);
  }
  // [B, C, n] storage (rows contiguous): tile transpose, stores coalesced along the rows.
  return launch_copy_rows_tiled<T, false>(src, src_strides, out, out_strides, src_row, batch,
                                          n_rows, n_cols, 1.0, stream);
}

#define SBP_INSTANTIATE_GATHER(T, Index)                                                        \
  template cudaError_t gather_rows<T, Index>(const T*, Strides3, const Index*, int64_t, int64_t, \
                                             int64_t, int64_t, double, T*, cudaStream_t);
#define SBP_INSTANTIATE(T)                                                                      \
  SBP_INSTANTIATE_GATHER(T, int32_t)                                                            \
  SBP_INSTANTIATE_GATHER(T, int64_t)                                                            \
  template cudaError_t scatter_rows_zero_fill<T>(const T*, Strides3, const int32_t*, int64_t,   \
                                                 int64_t, int64_t, T*, Strides3, cudaStream_t);

SBP_INSTANTIATE(float)
SBP_INSTANTIATE(double)
SBP_INSTANTIATE(__half)
SBP_INSTANTIATE(__nv_bfloat16)
template cudaError_t build_row_map<int32_t>(const int32_t*, int64_t, int64_t, int32_t*,
                                            cudaStream_t);
template cudaError_t build_row_map<int64_t>(const int64_t*, int64_t, int64_t, int32_t*,
                                            cudaStream_t);
#undef SBP_INSTANTIATE
#undef SBP_INSTANTIATE_GATHER

}  // namespace cuda_kernels
}  // namespace sbp
