// C++ CPU kernel of sbp::kept_rows_backward (DESIGN.md 3.1 / 3.2), the backward of linear and
// pointwise conv on kept rows. Rows are positions; every tensor is read through its strides.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace sbp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_rows_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& x_kept,
    const c10::optional<at::Tensor>& weight, const at::Tensor& keep_idx, double grad_scale,
    bool channels_first, int64_t c_in, std::array<bool, 3> needs) {
  const bool need_dx = needs[0], need_dw = needs[1], need_db = needs[2];
  TORCH_CHECK(grad_out.dim() == 3, "kept_rows_backward: expected grad_out [B, n, c_out]");
  TORCH_CHECK(!need_dw || (x_kept.has_value() && x_kept->dim() == 3),
              "kept_rows_backward: the weight gradient needs x_kept [B, n_keep, c_in]");
  TORCH_CHECK(!need_dx || (weight.has_value() && weight->dim() == 2),
              "kept_rows_backward: the input gradient needs weight [c_out, c_in]");
  const int64_t batch = grad_out.size(0), n = grad_out.size(1), c_out = grad_out.size(2);
  const int64_t rows = batch * keep_idx.numel();
  // The only gather of grad_out: its kept rows, scaled once so every gradient carries grad_scale.
  at::Tensor dy_kept = grad_out.index_select(1, keep_idx);
  if (grad_scale != 1.0) dy_kept.mul_(grad_scale);
  // A gradient not asked for is an empty tensor of its own (outputs must not alias each other).
  const auto none = [&] { return at::empty({0}, grad_out.options()); };
  at::Tensor grad_weight = need_dw ? dy_kept.reshape({rows, c_out}).t().mm(x_kept->reshape({rows, c_in}))
                                   : none();
  at::Tensor grad_bias = need_db ? dy_kept.sum({0, 1}) : none();
  at::Tensor grad_x = none();
  if (need_dx) {
    // Allocated [B, c_in, n] (channels-first) or [B, n, c_in] and returned as a [B, n, c_in]
    // view; dropped rows are zero.
    grad_x = channels_first ? at::zeros({batch, c_in, n}, grad_out.options()).transpose(1, 2)
                            : at::zeros({batch, n, c_in}, grad_out.options());
    grad_x.index_copy_(1, keep_idx.to(at::kLong), at::matmul(dy_kept, *weight));
  }
  return {grad_x, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(sbp, CPU, m) { m.impl("kept_rows_backward", &kept_rows_backward_cpu); }

}  // namespace sbp
