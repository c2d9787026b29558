// The kept-rows backward of linear / pointwise conv in ATen ops (DESIGN.md 3.1 / 3.2), shared by the
// CPU kernel of sbp::kept_rows_backward (cpu/kept_rows.cpp) and the C++ autograd of the eager
// torch backend (eager.cpp). A gradient not asked for comes back undefined.
#pragma once
#include <ATen/ATen.h>

#include "rows.h"

#include <array>
#include <tuple>

namespace sbp {

// dy_kept (the kept rows of grad_out) times scale: in place, unless every row is kept and dy_kept is
// grad_out itself, which the caller still owns.
inline at::Tensor scale_rows(const at::Tensor& dy_kept, const at::Tensor& grad_out, double scale) {
  if (scale == 1.0) return dy_kept;
  return dy_kept.is_same(grad_out) ? dy_kept * scale : dy_kept.mul_(scale);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_rows_backward_aten(
    const at::Tensor& grad_out, const at::Tensor& x_kept, const at::Tensor& weight, const at::Tensor& keep_idx,
    double grad_scale, bool channels_first, int64_t c_in, std::array<bool, 3> needs) {
  const bool need_dx = needs[0], need_dw = needs[1], need_db = needs[2];
  TORCH_CHECK(grad_out.dim() == 3, "kept_rows_backward: expected grad_out [B, n, c_out]");
  TORCH_CHECK(!need_dw || (x_kept.defined() && x_kept.dim() == 3),
              "kept_rows_backward: the weight gradient needs x_kept [B, n_keep, c_in]");
  TORCH_CHECK(!need_dx || (weight.defined() && weight.dim() == 2),
              "kept_rows_backward: the input gradient needs weight [c_out, c_in]");
  const int64_t batch = grad_out.size(0), n = grad_out.size(1), c_out = grad_out.size(2);
  const int64_t rows = batch * keep_idx.numel();
  // The only gather of grad_out: its kept rows, scaled once so every gradient carries grad_scale.
  at::Tensor dy_kept = take_rows(grad_out, keep_idx);
  dy_kept = scale_rows(dy_kept, grad_out, grad_scale);
  at::Tensor grad_weight, grad_bias, grad_x;
  if (need_dw) grad_weight = dy_kept.reshape({rows, c_out}).t().mm(x_kept.reshape({rows, c_in}));
  if (need_db) grad_bias = dy_kept.sum({0, 1});
  if (need_dx) {
    // Allocated [B, c_in, n] (channels-first) or [B, n, c_in] and returned as a [B, n, c_in]
    // view; dropped rows are zero.
    grad_x = put_rows(channels_first ? at::zeros({batch, c_in, n}, grad_out.options()).transpose(1, 2)
                                     : at::zeros({batch, n, c_in}, grad_out.options()),
                      at::matmul(dy_kept, weight), keep_idx);
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace sbp
