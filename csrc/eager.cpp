// The eager faces of the torch backend in C++ (DESIGN.md 3; host cost per call): linear, layer
// norm, the MLP and, on CPU, attention, each a C++ autograd Function with the formula of its op in
// sbp_kernels/ops/ and reference.py, so an eager step runs no Python in backward and little in
// forward. The Python entry points (ops/*.py apply) call them when the torch backend runs the op
// eagerly (not while tracing; not with dropout, whose masks a recompute-mode replay takes in Python); the
// torch.library ops stay what torch.compile, export and opcheck see. The kept rows an op saves may
// be given (x_kept: the step's one gathered copy shared between ops reading the same tensor).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "kept_rows.h"
#include "rows.h"

namespace sbp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// f(x) computed in x's memory order: a [..., B, n, c] view of a position-first [..., n, B, c]
// tensor gives such a view again (as the dense layer's result is laid out).
template <typename F>
Tensor in_memory_order(const Tensor& x, F f) {
  if (x.dim() >= 3 && !x.is_contiguous()) {
    const Tensor flipped = x.transpose(-2, -3);
    if (flipped.is_contiguous()) return f(flipped).transpose(-2, -3);
  }
  return f(x);
}

// The kept rows (dim -2) of a gradient scattered into zeros of `sizes` (the rows themselves when
// every row is kept).
Tensor scatter_rows(const Tensor& kept, const Tensor& keep_idx, at::IntArrayRef sizes) {
  if (kept.sizes() == sizes) return kept;
  return put_rows(at::zeros(sizes, kept.options()), kept, keep_idx);
}

int64_t leading(at::IntArrayRef sizes) {  // the product of the dims before the last two
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < sizes.size(); ++i) batch *= sizes[i];
  return batch;
}

// Optional inputs of a C++ autograd Function are std::optional (an undefined Tensor input is an error).
using OptTensor = c10::optional<Tensor>;

Tensor opt(const OptTensor& t) { return t.value_or(Tensor()); }

c10::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

bool needs(const Tensor& t) { return t.defined() && t.requires_grad(); }

// --- linear ----------------------------------------------------------------------------------

struct Linear : public torch::autograd::Function<Linear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias_arg,
                        const Tensor& keep_idx, const OptTensor& x_kept_arg, double grad_scale) {
    const Tensor bias = opt(bias_arg), x_kept = opt(x_kept_arg);
    const bool need_x = needs(x), need_w = needs(weight), need_b = needs(bias);
    Tensor saved_x;
    if (need_w) saved_x = x_kept.defined() ? x_kept : take_rows(x, keep_idx);
    ctx->save_for_backward({saved_x, need_x ? weight : Tensor(), keep_idx});
    ctx->saved_data["sizes"] = x.sizes().vec();
    ctx->saved_data["scale"] = grad_scale;
    ctx->saved_data["needs"] = c10::List<bool>({need_x, need_w, need_b});
    return in_memory_order(x, [&](const Tensor& t) { return at::linear(t, weight, bias); });
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto flags = ctx->saved_data["needs"].toBoolList();
    const int64_t batch = leading(sizes), n = sizes[sizes.size() - 2], c_in = sizes.back();
    const Tensor& keep_idx = saved[2];
    const Tensor dy = grads[0].reshape({batch, n, grads[0].size(-1)});
    const Tensor x_kept = saved[0].defined() ? saved[0].reshape({batch, keep_idx.numel(), c_in}) : Tensor();
    auto [dx, dw, db] = kept_rows_backward_aten(dy, x_kept, saved[1], keep_idx, ctx->saved_data["scale"].toDouble(),
                                                false, c_in, {flags.get(0), flags.get(1), flags.get(2)});
    return {dx.defined() ? dx.view(sizes) : dx, dw, db, Tensor(), Tensor(), Tensor()};
  }
};

Tensor linear_eager(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& keep_idx,
                    const c10::optional<Tensor>& x_kept, double grad_scale) {
  return Linear::apply(x, weight, bias, keep_idx, x_kept, grad_scale);
}

// --- layer norm over the last dim ---------------------------------------------------------------

struct LayerNorm : public torch::autograd::Function<LayerNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight_arg, const OptTensor& bias_arg,
                        const Tensor& keep_idx, const OptTensor& x_kept_arg, double eps) {
    const Tensor weight = opt(weight_arg), bias = opt(bias_arg), x_kept = opt(x_kept_arg);
    const int64_t c = x.size(-1);
    const Tensor out = in_memory_order(x, [&](const Tensor& t) { return at::layer_norm(t, {c}, weight, bias, eps); });
    // Only the kept rows are saved; their statistics are recomputed from them in backward (one
    // pass over n_keep rows, 2 floats a row less to keep).
    ctx->save_for_backward({x_kept.defined() ? x_kept : take_rows(x, keep_idx), weight, bias, keep_idx});
    ctx->saved_data["sizes"] = x.sizes().vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["needs"] = c10::List<bool>({needs(x), needs(weight), needs(bias)});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto flags = ctx->saved_data["needs"].toBoolList();
    const Tensor &x_kept = saved[0], &weight = saved[1], &bias = saved[2], &keep_idx = saved[3];
    const int64_t c = sizes.back();
    const auto stats = at::native_layer_norm(x_kept, {c}, weight, bias, ctx->saved_data["eps"].toDouble());
    auto [dx, dw, db] = at::native_layer_norm_backward(
        take_rows(grads[0], keep_idx), x_kept, {c}, std::get<1>(stats), std::get<2>(stats), weight, bias,
        {flags.get(0), flags.get(1) && weight.defined(), flags.get(2) && bias.defined()});
    return {dx.defined() ? scatter_rows(dx, keep_idx, sizes) : dx, dw, db, Tensor(), Tensor(), Tensor()};
  }
};

Tensor layer_norm_eager(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& keep_idx, const c10::optional<Tensor>& x_kept, double eps) {
  return LayerNorm::apply(x, weight, bias, keep_idx, x_kept, eps);
}

// --- the MLP fc2(act(fc1(x))) --------------------------------------------------------------------

// The activation codes of sbp_kernels/ops/mlp.py (EAGER_ACTIVATIONS): gelu, gelu_tanh, relu, silu.
Tensor activation(const Tensor& h, int64_t code) {
  switch (code) {
    case 0: return at::gelu(h);
    case 1: return at::gelu(h, "tanh");
    case 2: return at::relu(h);
    default: return at::silu(h);
  }
}

Tensor activation_backward(const Tensor& grad, const Tensor& h, int64_t code) {
  switch (code) {
    case 0: return at::gelu_backward(grad, h);
    case 1: return at::gelu_backward(grad, h, "tanh");
    case 2: return at::threshold_backward(grad, h, 0);
    default: return at::silu_backward(grad, h);
  }
}

// sum over rows of dy^T x, both [..., rows, c]
Tensor weight_grad(const Tensor& dy, const Tensor& x) { return dy.flatten(0, -2).t().mm(x.flatten(0, -2)); }

struct Mlp : public torch::autograd::Function<Mlp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const OptTensor& b1_arg,
                        const Tensor& w2, const OptTensor& b2_arg, const Tensor& keep_idx, const OptTensor& x_kept_arg,
                        int64_t act, double grad_scale) {
    const Tensor b1 = opt(b1_arg), b2 = opt(b2_arg), x_kept = opt(x_kept_arg);
    const Tensor hidden = in_memory_order(x, [&](const Tensor& t) { return at::linear(t, w1, b1); });
    const Tensor out = in_memory_order(activation(hidden, act), [&](const Tensor& t) { return at::linear(t, w2, b2); });
    const bool need_x = needs(x), need_w1 = needs(w1);
    Tensor saved_x;
    if (need_w1) saved_x = x_kept.defined() ? x_kept : take_rows(x, keep_idx);
    ctx->save_for_backward({saved_x, take_rows(hidden, keep_idx), need_x ? w1 : Tensor(), w2, keep_idx});
    ctx->saved_data["sizes"] = x.sizes().vec();
    ctx->saved_data["act"] = act;
    ctx->saved_data["scale"] = grad_scale;
    ctx->saved_data["needs"] = c10::List<bool>({need_x, need_w1, needs(b1), needs(w2), needs(b2)});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto f = ctx->saved_data["needs"].toBoolList();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor &x_kept = saved[0], &h_kept = saved[1], &w1 = saved[2], &w2 = saved[3], &keep_idx = saved[4];
    const Tensor dy = scale_rows(take_rows(grads[0], keep_idx), grads[0], scale);
    Tensor dx, dw1, db1, dw2, db2;
    if (f.get(3)) dw2 = weight_grad(dy, activation(h_kept, act));
    if (f.get(4)) db2 = dy.flatten(0, -2).sum(0);
    if (f.get(0) || f.get(1) || f.get(2)) {
      const Tensor dh = activation_backward(at::matmul(dy, w2), h_kept, act);
      if (f.get(1)) dw1 = weight_grad(dh, x_kept);
      if (f.get(2)) db1 = dh.flatten(0, -2).sum(0);
      if (f.get(0)) dx = scatter_rows(at::matmul(dh, w1), keep_idx, sizes);
    }
    return {dx, dw1, db1, dw2, db2, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor mlp_eager(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                 const c10::optional<Tensor>& b2, const Tensor& keep_idx, const c10::optional<Tensor>& x_kept,
                 int64_t act, double grad_scale) {
  return Mlp::apply(x, w1, b1, w2, b2, keep_idx, x_kept, act, grad_scale);
}

// --- attention on CPU (mode "qkv", no dropout, no bias gradient) ---------------------------------

// The additive mask of a key padding mask [B, n] (True = a real token): [B, 1, 1, n].
Tensor padding_bias(const Tensor& key_padding_mask, at::ScalarType dtype) {
  return at::zeros(key_padding_mask.sizes(), key_padding_mask.options().dtype(dtype))
      .masked_fill(key_padding_mask.logical_not(), -std::numeric_limits<double>::infinity())
      .unsqueeze(1)
      .unsqueeze(1);
}

struct Attention : public torch::autograd::Function<Attention> {
  // Returns (out [B, h, n, d] laid out [B, n, h, d], o_K as the [B, n_keep, h * d] rows that the
  // output projection reads: the step shares them with its gather).
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& keep_idx, bool causal, double scale, const OptTensor& key_padding_mask_arg) {
    const Tensor key_padding_mask = opt(key_padding_mask_arg);
    const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
    const Tensor mask = key_padding_mask.defined() ? padding_bias(key_padding_mask, q.scalar_type()) : Tensor();
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, maybe(mask), scale);
    lse = lse.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    if (key_padding_mask.defined()) {  // rows with every key masked: lse +inf (their output is 0)
      const Tensor valid = causal ? key_padding_mask.cumsum(1) : key_padding_mask.sum({1}, true).expand({batch, n});
      lse = lse.masked_fill(valid.eq(0).unsqueeze(1), std::numeric_limits<double>::infinity());
    }
    const Tensor rows = out.transpose(1, 2).contiguous();  // [B, n, h, d]
    // A copy also when every row is kept: this output must not alias the first one.
    const Tensor row_view = rows.view({batch, n, heads * d});
    const Tensor out_kept_rows = keep_idx.numel() == n ? row_view.clone() : take_rows(row_view, keep_idx);
    const Tensor out_kept = out_kept_rows.view({batch, keep_idx.numel(), heads, d}).transpose(1, 2);
    ctx->save_for_backward({take_rows(q, keep_idx), take_rows(k, keep_idx), take_rows(v, keep_idx),
                            out_kept, take_rows(lse.unsqueeze(-1), keep_idx).squeeze(-1), keep_idx,
                            key_padding_mask.defined() ? take_rows(key_padding_mask.unsqueeze(-1), keep_idx).squeeze(-1) : Tensor()});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["n"] = n;
    ctx->mark_non_differentiable({out_kept_rows});
    return {rows.transpose(1, 2), out_kept_rows};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q_kept = saved[0], &keep_idx = saved[5], &valid = saved[6];
    const int64_t n = ctx->saved_data["n"].toInt();
    const Tensor mask = valid.defined() ? padding_bias(valid, q_kept.scalar_type()) : Tensor();
    const Tensor lse = q_kept.scalar_type() == at::kDouble ? saved[4] : saved[4].to(at::kFloat);
    // keep_idx is sorted: causal masking of the compact rows is causal masking in original positions.
    // The kept rows of the output gradient laid out [B, n_keep, h, d] as the output is (the flash
    // backward copies a gradient of any other layout).
    const Tensor dout = grads[0];
    const Tensor dout_kept = take_rows_into(
        at::empty({dout.size(0), keep_idx.numel(), dout.size(1), dout.size(3)}, dout.options()).transpose(1, 2), dout,
        keep_idx);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dout_kept, q_kept, saved[1], saved[2], saved[3], lse, 0.0,
        ctx->saved_data["causal"].toBool(), maybe(mask), ctx->saved_data["scale"].toDouble());
    auto sizes = dq.sizes().vec();
    sizes[2] = n;
    if (keep_idx.numel() == n) return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor()};
    if (dk.sizes() == dq.sizes()) {  // no GQA: one zero-filled buffer holds the three gradients
      sizes.insert(sizes.begin(), 3);
      const Tensor grads_full = at::zeros(sizes, dq.options());
      return {put_rows(grads_full[0], dq, keep_idx), put_rows(grads_full[1], dk, keep_idx),
              put_rows(grads_full[2], dv, keep_idx), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto kv_sizes = dk.sizes().vec();
    kv_sizes[2] = n;
    return {scatter_rows(dq, keep_idx, sizes), scatter_rows(dk, keep_idx, kv_sizes), scatter_rows(dv, keep_idx, kv_sizes),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_eager(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep_idx,
                                           bool causal, double scale, const c10::optional<Tensor>& key_padding_mask) {
  auto outputs = Attention::apply(q, k, v, keep_idx, causal, scale, key_padding_mask);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sbp, CompositeImplicitAutograd, m) {
  m.impl("linear_eager", &linear_eager);
  m.impl("layer_norm_eager", &layer_norm_eager);
  m.impl("mlp_eager", &mlp_eager);
  m.impl("attention_eager", &attention_eager);
}

}  // namespace sbp
