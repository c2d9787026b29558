// The eager faces of the torch backend in C++ (DESIGN.md 3; host cost per call): linear, layer
// norm, the MLP and, on CPU, attention, each a forward run below autograd plus a backward node
// (FaceNode) with the formula of its op in sbp_kernels/ops/ and reference.py, so an eager step runs
// no Python in backward and little in forward. The Python entry points (ops/*.py apply) call them when the torch backend runs the op
// eagerly (not while tracing; not with dropout, whose masks a recompute-mode replay takes in Python); the
// torch.library ops stay what torch.compile, export and opcheck see. The kept rows an op saves may
// be given (x_kept: the step's one gathered copy shared between ops reading the same tensor).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <limits>

#include "kept_rows.h"
#include "rows.h"

namespace sbp {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward node of an eager face: the tensors it saved and Formula, which holds the face's
// scalars and computes the input gradients. A hand-made node, as the ones autograd generates for
// ATen ops, costs a forward call about 1.8 us less than a torch::autograd::Function (no context
// dictionary of saved scalars, no output wrapping): a linear face 4.2 us against F.linear's 4.2
// (1 thread, tiny tensors).
template <typename Formula>
struct FaceNode final : torch::autograd::Node {
  Formula formula;
  std::vector<SavedVariable> saved;

  std::string name() const override { return Formula::name; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved) s.reset_data();
  }

  // Compiled autograd traces the nodes of a backward; these run C++ on concrete sizes and cannot be
  // traced. With torch._dynamo.config.compiled_autograd set before the forward the ops record their
  // Python faces instead (ops/_common.cpp_eager).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(false, Formula::name,
                                ": compiled autograd cannot trace the sbp ops' C++ eager faces; set "
                                "torch._dynamo.config.compiled_autograd = True before the forward (the ops then "
                                "record their Python faces) or compile the forward too");
  }

  variable_list apply(variable_list&& grads) override {
    // Each face has one differentiable output: no gradient for it, none for the inputs.
    if (!grads[0].defined()) return variable_list(num_outputs());
    std::vector<Tensor> tensors;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& s : saved) tensors.push_back(s.unpack(getptr()));
    }
    // A gradient no input needs in this backward (autograd.grad of one input) is not computed.
    std::vector<bool> wanted(num_outputs());
    for (size_t i = 0; i < wanted.size(); ++i) wanted[i] = task_should_compute_output(i);
    return formula.backward(tensors, grads, wanted);
  }
};

// The node of a face over `inputs` (the gradient edges, one per input, in order), or nullptr when no
// input needs a gradient. Forward-mode AD has no formula here: a dual input is an error.
template <typename Formula, typename... Inputs>
c10::intrusive_ptr<FaceNode<Formula>> make_node(const Inputs&... inputs) {
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(inputs) || ...),
              Formula::name, ": forward-mode AD is not supported by the sbp ops");
  if (!torch::autograd::compute_requires_grad(inputs...)) return nullptr;
  auto node = c10::make_intrusive<FaceNode<Formula>>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// Saves `tensors` on the node (undefined ones too: they unpack as undefined) and makes `outputs` its
// differentiable results.
template <typename Formula>
void connect(const c10::intrusive_ptr<FaceNode<Formula>>& node, std::initializer_list<Tensor> tensors,
             std::initializer_list<Tensor> outputs) {
  for (const auto& t : tensors) node->saved.emplace_back(t, false);
  for (const auto& out : outputs) torch::autograd::set_history(out, node);
  torch::autograd::fire_node_creation_hooks(node);
}

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

// A `Tensor?` argument of the faces' schemas.
using OptTensor = c10::optional<Tensor>;

Tensor opt(const OptTensor& t) { return t.value_or(Tensor()); }

c10::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

bool needs(const Tensor& t) { return t.defined() && t.requires_grad(); }

// A face's forward, and the rows it gathers to save, run below autograd and with grad mode off: the
// face records one node of its own, nothing of the ATen ops inside it, and the row copies of rows.h
// copy directly (they give way to differentiable ATen ops only in a backward with create_graph=True).
struct Unrecorded {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
};

// --- linear ----------------------------------------------------------------------------------

// The backward of a linear over x [..., n, c_in] from the kept rows of x (saved[0], for the weight
// gradient), the weight (saved[1], for the input gradient) and keep_idx (saved[2]).
struct LinearGrad {
  static constexpr const char* name = "SbpLinearBackward";
  std::vector<int64_t> sizes;
  double scale;

  variable_list backward(const std::vector<Tensor>& saved, const variable_list& grads, const std::vector<bool>& wanted) const {
    const int64_t batch = leading(sizes), n = sizes[sizes.size() - 2], c_in = sizes.back();
    const Tensor& keep_idx = saved[2];
    const Tensor dy = grads[0].reshape({batch, n, grads[0].size(-1)});
    const Tensor x_kept = saved[0].defined() ? saved[0].reshape({batch, keep_idx.numel(), c_in}) : Tensor();
    auto [dx, dw, db] = kept_rows_backward_aten(dy, x_kept, saved[1], keep_idx, scale, false, c_in,
                                                {wanted[0], wanted[1], wanted[2]});
    return {dx.defined() ? dx.view(sizes) : dx, dw, db};
  }
};

Tensor linear_eager(const Tensor& x, const Tensor& weight, const OptTensor& bias_arg, const Tensor& keep_idx,
                    const OptTensor& x_kept, double grad_scale) {
  const Tensor bias = opt(bias_arg);
  auto node = make_node<LinearGrad>(x, weight, bias);
  Tensor out, saved_x;
  {
    Unrecorded guard;
    out = in_memory_order(x, [&](const Tensor& t) { return at::linear(t, weight, bias); });
    // The only activation saved: the kept rows of x, compact, and only for the weight gradient.
    if (node && needs(weight)) saved_x = x_kept.has_value() ? *x_kept : take_rows(x, keep_idx);
  }
  if (!node) return out;
  node->formula = {x.sizes().vec(), grad_scale};
  connect(node, {saved_x, needs(x) ? weight : Tensor(), keep_idx}, {out});
  return out;
}

// --- layer norm over the last dim ---------------------------------------------------------------

// The backward of a layer norm over the last dim from the kept rows of x (saved[0]), the weight and
// bias (saved[1], saved[2]) and keep_idx (saved[3]). Only the kept rows are saved: their statistics
// are recomputed from them (one pass over n_keep rows, 2 floats a row less to keep).
struct LayerNormGrad {
  static constexpr const char* name = "SbpLayerNormBackward";
  std::vector<int64_t> sizes;
  double eps;

  variable_list backward(const std::vector<Tensor>& saved, const variable_list& grads, const std::vector<bool>& wanted) const {
    const Tensor &x_kept = saved[0], &weight = saved[1], &bias = saved[2], &keep_idx = saved[3];
    const int64_t c = sizes.back();
    const auto stats = at::native_layer_norm(x_kept, {c}, weight, bias, eps);
    auto [dx, dw, db] = at::native_layer_norm_backward(
        take_rows(grads[0], keep_idx), x_kept, {c}, std::get<1>(stats), std::get<2>(stats), weight, bias,
        {wanted[0], wanted[1], wanted[2]});
    return {dx.defined() ? scatter_rows(dx, keep_idx, sizes) : dx, dw, db};
  }
};

Tensor layer_norm_eager(const Tensor& x, const OptTensor& weight_arg, const OptTensor& bias_arg, const Tensor& keep_idx,
                        const OptTensor& x_kept, double eps) {
  const Tensor weight = opt(weight_arg), bias = opt(bias_arg);
  const int64_t c = x.size(-1);
  auto node = make_node<LayerNormGrad>(x, weight, bias);
  Tensor out, saved_x;
  {
    Unrecorded guard;
    out = in_memory_order(x, [&](const Tensor& t) { return at::layer_norm(t, {c}, weight, bias, eps); });
    if (node) saved_x = x_kept.has_value() ? *x_kept : take_rows(x, keep_idx);
  }
  if (!node) return out;
  node->formula = {x.sizes().vec(), eps};
  connect(node, {saved_x, weight, bias, keep_idx}, {out});
  return out;
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

// The backward of fc2(act(fc1(x))) from the kept rows of x (saved[0], for fc1's weight gradient)
// and of the hidden pre-activation (saved[1]), w1 (saved[2], for the input gradient), w2 (saved[3])
// and keep_idx (saved[4]); the inputs are x, w1, b1, w2, b2.
struct MlpGrad {
  static constexpr const char* name = "SbpMlpBackward";
  std::vector<int64_t> sizes;
  int64_t act;
  double scale;

  variable_list backward(const std::vector<Tensor>& saved, const variable_list& grads, const std::vector<bool>& wanted) const {
    const Tensor &x_kept = saved[0], &h_kept = saved[1], &w1 = saved[2], &w2 = saved[3], &keep_idx = saved[4];
    const Tensor dy = scale_rows(take_rows(grads[0], keep_idx), grads[0], scale);
    Tensor dx, dw1, db1, dw2, db2;
    if (wanted[3]) dw2 = weight_grad(dy, activation(h_kept, act));
    if (wanted[4]) db2 = dy.flatten(0, -2).sum(0);
    if (wanted[0] || wanted[1] || wanted[2]) {
      const Tensor dh = activation_backward(at::matmul(dy, w2), h_kept, act);
      if (wanted[1]) dw1 = weight_grad(dh, x_kept);
      if (wanted[2]) db1 = dh.flatten(0, -2).sum(0);
      if (wanted[0]) dx = scatter_rows(at::matmul(dh, w1), keep_idx, sizes);
    }
    return {dx, dw1, db1, dw2, db2};
  }
};

Tensor mlp_eager(const Tensor& x, const Tensor& w1, const OptTensor& b1_arg, const Tensor& w2, const OptTensor& b2_arg,
                 const Tensor& keep_idx, const OptTensor& x_kept, int64_t act, double grad_scale) {
  const Tensor b1 = opt(b1_arg), b2 = opt(b2_arg);
  auto node = make_node<MlpGrad>(x, w1, b1, w2, b2);
  Tensor out, saved_x, saved_hidden;
  {
    Unrecorded guard;
    const Tensor hidden = in_memory_order(x, [&](const Tensor& t) { return at::linear(t, w1, b1); });
    out = in_memory_order(activation(hidden, act), [&](const Tensor& t) { return at::linear(t, w2, b2); });
    if (node) {
      if (needs(w1)) saved_x = x_kept.has_value() ? *x_kept : take_rows(x, keep_idx);
      saved_hidden = take_rows(hidden, keep_idx);
    }
  }
  if (!node) return out;
  node->formula = {x.sizes().vec(), act, grad_scale};
  connect(node, {saved_x, saved_hidden, needs(x) ? w1 : Tensor(), w2, keep_idx}, {out});
  return out;
}

// --- attention on CPU (mode "qkv", no dropout, no bias gradient) ---------------------------------

// The additive mask of a key padding mask [B, n] (True = a real token): [B, 1, 1, n].
Tensor padding_bias(const Tensor& key_padding_mask, at::ScalarType dtype) {
  return at::zeros(key_padding_mask.sizes(), key_padding_mask.options().dtype(dtype))
      .masked_fill(key_padding_mask.logical_not(), -std::numeric_limits<double>::infinity())
      .unsqueeze(1)
      .unsqueeze(1);
}

// The backward of attention on the kept query rows from the kept rows of q, k, v (saved[0..2]), of
// the output (saved[3]) and of the log-sum-exp (saved[4]), keep_idx (saved[5]) and the kept rows of
// the key padding mask (saved[6], when there is one). keep_idx is sorted: causal masking of the
// compact rows is causal masking in original positions.
struct AttentionGrad {
  static constexpr const char* name = "SbpAttentionBackward";
  bool causal;
  double scale;
  int64_t n;

  variable_list backward(const std::vector<Tensor>& saved, const variable_list& grads, const std::vector<bool>&) const {
    const Tensor &q_kept = saved[0], &keep_idx = saved[5], &valid = saved[6];
    const Tensor mask = valid.defined() ? padding_bias(valid, q_kept.scalar_type()) : Tensor();
    const Tensor lse = q_kept.scalar_type() == at::kDouble ? saved[4] : saved[4].to(at::kFloat);
    // The kept rows of the output gradient laid out [B, n_keep, h, d] as the output is (the flash
    // backward copies a gradient of any other layout).
    const Tensor& dout = grads[0];
    const Tensor dout_kept = take_rows_into(
        at::empty({dout.size(0), keep_idx.numel(), dout.size(1), dout.size(3)}, dout.options()).transpose(1, 2), dout,
        keep_idx);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dout_kept, q_kept, saved[1], saved[2], saved[3], lse, 0.0, causal, maybe(mask), scale);
    auto sizes = dq.sizes().vec();
    sizes[2] = n;
    if (keep_idx.numel() == n) return {dq, dk, dv};
    if (dk.sizes() == dq.sizes()) {  // no GQA: one zero-filled buffer holds the three gradients
      sizes.insert(sizes.begin(), 3);
      const Tensor grads_full = at::zeros(sizes, dq.options());
      return {put_rows(grads_full[0], dq, keep_idx), put_rows(grads_full[1], dk, keep_idx),
              put_rows(grads_full[2], dv, keep_idx)};
    }
    auto kv_sizes = dk.sizes().vec();
    kv_sizes[2] = n;
    return {scatter_rows(dq, keep_idx, sizes), scatter_rows(dk, keep_idx, kv_sizes), scatter_rows(dv, keep_idx, kv_sizes)};
  }
};

// Returns (out [B, h, n, d] laid out [B, n, h, d], o_K as the [B, n_keep, h * d] rows that the output
// projection reads: the step shares them with its gather; not differentiable).
std::tuple<Tensor, Tensor> attention_eager(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep_idx,
                                           bool causal, double scale, const OptTensor& key_padding_mask_arg) {
  const Tensor key_padding_mask = opt(key_padding_mask_arg);
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  auto node = make_node<AttentionGrad>(q, k, v);
  Tensor out, out_kept_rows;
  std::vector<Tensor> saved;  // q, k, v, out, lse: their kept rows; the mask's
  {
    Unrecorded guard;
    const Tensor mask = key_padding_mask.defined() ? padding_bias(key_padding_mask, q.scalar_type()) : Tensor();
    auto [flash_out, logsumexp] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, maybe(mask), scale);
    Tensor lse = logsumexp.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    if (key_padding_mask.defined()) {  // rows with every key masked: lse +inf (their output is 0)
      const Tensor valid = causal ? key_padding_mask.cumsum(1) : key_padding_mask.sum({1}, true).expand({batch, n});
      lse = lse.masked_fill(valid.eq(0).unsqueeze(1), std::numeric_limits<double>::infinity());
    }
    const Tensor rows = flash_out.transpose(1, 2).contiguous();  // [B, n, h, d]
    // A copy also when every row is kept: this output must not alias the first one.
    const Tensor row_view = rows.view({batch, n, heads * d});
    out_kept_rows = keep_idx.numel() == n ? row_view.clone() : take_rows(row_view, keep_idx);
    out = rows.transpose(1, 2);
    if (node) {
      saved = {take_rows(q, keep_idx), take_rows(k, keep_idx), take_rows(v, keep_idx),
               out_kept_rows.view({batch, keep_idx.numel(), heads, d}).transpose(1, 2),
               take_rows(lse.unsqueeze(-1), keep_idx).squeeze(-1),
               key_padding_mask.defined() ? take_rows(key_padding_mask.unsqueeze(-1), keep_idx).squeeze(-1) : Tensor()};
    }
  }
  if (!node) return {out, out_kept_rows};
  node->formula = {causal, scale, n};
  connect(node, {saved[0], saved[1], saved[2], saved[3], saved[4], keep_idx, saved[5]}, {out});
  return {out, out_kept_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(sbp, CompositeImplicitAutograd, m) {
  m.impl("linear_eager", &linear_eager);
  m.impl("layer_norm_eager", &layer_norm_eager);
  m.impl("mlp_eager", &mlp_eager);
  m.impl("attention_eager", &attention_eager);
}

}  // namespace sbp
