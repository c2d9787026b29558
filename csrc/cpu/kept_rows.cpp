// C++ CPU kernel of sbp::kept_rows_backward (DESIGN.md 3.1 / 3.2), the backward of linear and
// pointwise conv on kept rows. Rows are positions; every tensor is read through its strides.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace sbp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_rows_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_kept, const at::Tensor& weight,
    const at::Tensor& keep_idx, double grad_scale, bool channels_first) {
  TORCH_CHECK(grad_out.dim() == 3 && x_kept.dim() == 3 && weight.dim() == 2,
              "kept_rows_backward: expected grad_out [B, n, c_out], x_kept [B, n_keep, c_in], "
              "weight [c_out, c_in]");
  const int64_t batch = grad_out.size(0), n = grad_out.size(1);
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  // The only gather of grad_out: its kept rows, scaled once so every gradient carries grad_scale.
  at::Tensor dy_kept = grad_out.index_select(1, keep_idx).mul_(grad_scale);
  at::Tensor grad_weight = dy_kept.reshape({-1, c_out}).t().mm(x_kept.reshape({-1, c_in}));
  at::Tensor grad_bias = dy_kept.sum({0, 1});
  // grad_x is allocated [B, c_in, n] (channels-first) or [B, n, c_in] and returned as a
  // [B, n, c_in] view; dropped rows are zero.
  at::Tensor grad_x = channels_first
                          ? at::zeros({batch, c_in, n}, grad_out.options()).transpose(1, 2)
                          : at::zeros({batch, n, c_in}, grad_out.options());
  grad_x.index_copy_(1, keep_idx.to(at::kLong), at::matmul(dy_kept, weight));
  return {grad_x, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(sbp, CPU, m) { m.impl("kept_rows_backward", &kept_rows_backward_cpu); }

}  // namespace sbp
