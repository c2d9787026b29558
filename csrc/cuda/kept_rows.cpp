// Torch binding of the CUDA kernel of sbp::kept_rows_backward (schema in csrc/registration.cpp;
// csrc/cpu/kept_rows.cpp is the CPU kernel and defines the semantics). Checks the arguments,
// allocates the outputs and runs, on the current CUDA stream: the gather of grad_out's kept rows
// (grad_scale applied there), the GEMMs on those compact rows (cuBLAS through at::mm), and the
// one-pass zero-filling scatter into grad_x. The kernels are in kept_rows_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "kept_rows_kernels.h"

namespace sbp {
namespace {

// The CUDA type with the bits of each ATen scalar type.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

cuda_kernels::Strides3 strides3(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "kept_rows_backward: ", kernel, " failed: ",
              cudaGetErrorString(err));
}

// dy_kept [B, n_keep, c_out] (contiguous) = grad_scale * grad_out[:, keep_idx, :].
template <typename scalar_t>
void gather(const at::Tensor& grad_out, const at::Tensor& keep_idx, double grad_scale,
            at::Tensor& dy_kept, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const T* in = reinterpret_cast<const T*>(grad_out.data_ptr<scalar_t>());
  T* out = reinterpret_cast<T*>(dy_kept.data_ptr<scalar_t>());
  const int64_t batch = grad_out.size(0), n = grad_out.size(1), c = grad_out.size(2);
  const int64_t n_keep = keep_idx.numel();
  check_launch(keep_idx.scalar_type() == at::kLong
                   ? cuda_kernels::gather_rows<T>(in, strides3(grad_out),
                                                  keep_idx.data_ptr<int64_t>(), batch, n, n_keep,
                                                  c, grad_scale, out, stream)
                   : cuda_kernels::gather_rows<T>(in, strides3(grad_out),
                                                  keep_idx.data_ptr<int32_t>(), batch, n, n_keep,
                                                  c, grad_scale, out, stream),
               "gather_rows");
}

// grad_x[:, r, :] = dx_kept[:, row_to_kept[r], :], or 0 where row_to_kept[r] < 0.
template <typename scalar_t>
void scatter(const at::Tensor& dx_kept, const at::Tensor& row_to_kept, at::Tensor& grad_x,
             cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  check_launch(cuda_kernels::scatter_rows_zero_fill<T>(
                   reinterpret_cast<const T*>(dx_kept.data_ptr<scalar_t>()), strides3(dx_kept),
                   row_to_kept.data_ptr<int32_t>(), grad_x.size(0), grad_x.size(1),
                   grad_x.size(2), reinterpret_cast<T*>(grad_x.data_ptr<scalar_t>()),
                   strides3(grad_x), stream),
               "scatter_rows_zero_fill");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_rows_backward_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& x_kept,
    const c10::optional<at::Tensor>& weight, const at::Tensor& keep_idx, double grad_scale,
    bool channels_first, int64_t c_in, std::array<bool, 3> needs) {
  const bool need_dx = needs[0], need_dw = needs[1], need_db = needs[2];
  TORCH_CHECK(grad_out.dim() == 3, "kept_rows_backward: expected grad_out [B, n, c_out]");
  TORCH_CHECK(!need_dw || (x_kept.has_value() && x_kept->dim() == 3),
              "kept_rows_backward: the weight gradient needs x_kept [B, n_keep, c_in]");
  TORCH_CHECK(!need_dx || (weight.has_value() && weight->dim() == 2),
              "kept_rows_backward: the input gradient needs weight [c_out, c_in]");
  TORCH_CHECK(keep_idx.dim() == 1 &&
                  (keep_idx.scalar_type() == at::kLong || keep_idx.scalar_type() == at::kInt),
              "kept_rows_backward: keep_idx must be a 1-D int64 or int32 tensor, got ",
              keep_idx.dim(), "-D ", keep_idx.scalar_type());
  TORCH_CHECK(grad_out.is_cuda(), "kept_rows_backward: grad_out must be a CUDA tensor");
  const auto check_operand = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == grad_out.device(), "kept_rows_backward: ", name, " is on ",
                t.device(), " but grad_out is on ", grad_out.device());
    TORCH_CHECK(t.scalar_type() == grad_out.scalar_type(), "kept_rows_backward: ", name, " is ",
                t.scalar_type(), " but grad_out is ", grad_out.scalar_type());
  };
  const int64_t batch = grad_out.size(0), n = grad_out.size(1), c_out = grad_out.size(2);
  const int64_t n_keep = keep_idx.numel();
  TORCH_CHECK(keep_idx.device() == grad_out.device(), "kept_rows_backward: keep_idx is on ",
              keep_idx.device(), " but grad_out is on ", grad_out.device());
  if (need_dw) {
    check_operand(*x_kept, "x_kept");
    TORCH_CHECK(x_kept->size(0) == batch && x_kept->size(1) == n_keep && x_kept->size(2) == c_in,
                "kept_rows_backward: x_kept ", x_kept->sizes(), " should be [", batch, ", ",
                n_keep, ", ", c_in, "]");
  }
  if (need_dx) {
    check_operand(*weight, "weight");
    TORCH_CHECK(weight->size(0) == c_out && weight->size(1) == c_in, "kept_rows_backward: weight ",
                weight->sizes(), " should be [", c_out, ", ", c_in, "]");
  }
  TORCH_CHECK(n_keep <= n && n <= std::numeric_limits<int32_t>::max(),
              "kept_rows_backward: n_keep = ", n_keep, " must be at most n = ", n,
              " (and n below 2^31)");

  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor idx = keep_idx.contiguous();
  const auto options = grad_out.options();
  // A gradient not asked for comes back as an empty tensor of its own (outputs must not alias).
  const auto none = [&] { return at::empty({0}, options); };

  at::Tensor dy_kept = at::empty({batch, n_keep, c_out}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "kept_rows_backward_gather",
      [&] { gather<scalar_t>(grad_out, idx, grad_scale, dy_kept, stream); });

  // GEMMs over the B * n_keep compact rows (cuBLAS, current stream); only the ones needed.
  const at::Tensor dy_rows = dy_kept.view({batch * n_keep, c_out});
  at::Tensor grad_weight = need_dw ? dy_rows.t().mm(x_kept->reshape({batch * n_keep, c_in})) : none();
  at::Tensor grad_bias = need_db ? dy_rows.sum(0) : none();
  if (!need_dx) return {none(), grad_weight, grad_bias};

  at::Tensor row_to_kept = at::empty({n}, options.dtype(at::kInt));
  check_launch(idx.scalar_type() == at::kLong
                   ? cuda_kernels::build_row_map(idx.data_ptr<int64_t>(), n_keep, n,
                                                 row_to_kept.data_ptr<int32_t>(), stream)
                   : cuda_kernels::build_row_map(idx.data_ptr<int32_t>(), n_keep, n,
                                                 row_to_kept.data_ptr<int32_t>(), stream),
               "build_row_map");
  const at::Tensor dx_kept = dy_rows.mm(*weight).view({batch, n_keep, c_in});
  // grad_x: [B, n, c_in] view of [B, c_in, n] (channels-first) or [B, n, c_in] storage.
  at::Tensor grad_x = channels_first ? at::empty({batch, c_in, n}, options).transpose(1, 2)
                                     : at::empty({batch, n, c_in}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "kept_rows_backward_scatter",
      [&] { scatter<scalar_t>(dx_kept, row_to_kept, grad_x, stream); });
  return {grad_x, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(sbp, CUDA, m) { m.impl("kept_rows_backward", &kept_rows_backward_cuda); }

}  // namespace sbp
