// C++ CPU kernel of sbp::kept_rows_backward (DESIGN.md 3.1 / 3.2), the backward of linear and
// pointwise conv on kept rows (kept_rows.h). Rows are positions; tensors are read through strides.
#include <torch/library.h>

#include "../kept_rows.h"

namespace sbp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_rows_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& x_kept,
    const c10::optional<at::Tensor>& weight, const at::Tensor& keep_idx, double grad_scale,
    bool channels_first, int64_t c_in, std::array<bool, 3> needs) {
  auto [grad_x, grad_weight, grad_bias] = kept_rows_backward_aten(
      grad_out, x_kept.value_or(at::Tensor()), weight.value_or(at::Tensor()), keep_idx, grad_scale, channels_first,
      c_in, needs);
  // A gradient not asked for is an empty tensor of its own (outputs must not alias each other).
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, grad_out.options()); };
  return {or_empty(grad_x), or_empty(grad_weight), or_empty(grad_bias)};
}

TORCH_LIBRARY_IMPL(sbp, CPU, m) { m.impl("kept_rows_backward", &kept_rows_backward_cpu); }

}  // namespace sbp
