// Declares every `sbp` op schema (DESIGN.md 3.7) and makes `import sbp_kernels._C` load them.
// Kernels are registered next to their code: csrc/cpu/*.cpp (CPU key), csrc/cuda/*.cpp (CUDA key);
// the public ops' forward kernels, fake kernels and autograd formulas live in sbp_kernels/ops/.
#include <Python.h>
#include <torch/library.h>

#ifndef SBP_TORCH_VERSION
#define SBP_TORCH_VERSION "unknown"
#endif

extern "C" {
// A module with no methods: importing it runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // Recorded so the Python side can warn when the installed torch differs from the build's.
  PyModule_AddStringConstant(module, "built_with_torch", SBP_TORCH_VERSION);
#ifdef SBP_WITH_CUDA
  PyModule_AddIntConstant(module, "built_with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "built_with_cuda", 0);
#endif
  return module;
}
}

TORCH_LIBRARY(sbp, m) {
  // Public ops and their *_forward parts; kernels in Python (sbp_kernels/_schemas.py holds the
  // same strings).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, float grad_scale=1.0, "
        "str backend=\"auto\") -> Tensor");
  m.def("pointwise_conv(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, float "
        "grad_scale=1.0, str backend=\"auto\") -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, float? "
        "scale=None, str mode=\"qkv\", float grad_scale=1.0, Tensor? key_padding_mask=None, "
        "Tensor? attn_bias=None, float dropout_p=0.0, str backend=\"auto\") -> Tensor");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal, float? "
        "scale, str mode, float grad_scale, Tensor? key_padding_mask, Tensor? attn_bias, "
        "float dropout_p, str backend) -> (Tensor, Tensor, Tensor)");
  m.def("mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, str "
        "activation=\"gelu\", float grad_scale=1.0, float dropout_p=0.0, str "
        "backend=\"auto\") -> Tensor");
  m.def("mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, "
        "str activation, float grad_scale, float dropout_p, str backend) -> (Tensor, Tensor, "
        "Tensor)");
  m.def("gated_mlp(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, Tensor "
        "w_down, Tensor? b_down, Tensor keep_idx, str activation=\"silu\", float "
        "grad_scale=1.0, str backend=\"auto\") -> Tensor");
  m.def("gated_mlp_forward(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? "
        "b_up, Tensor w_down, Tensor? b_down, Tensor keep_idx, str activation, float "
        "grad_scale, str backend) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor keep_idx, float eps=1e-05, "
        "str backend=\"auto\") -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor keep_idx, float eps=1e-06, float "
        "weight_offset=0.0, bool scale_in_float=False, str backend=\"auto\") -> Tensor");
  m.def("dropout(Tensor x, Tensor keep_idx, float p, str backend=\"auto\") -> Tensor");
  m.def("dropout_forward(Tensor x, Tensor keep_idx, float p, str backend) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy(Tensor h, Tensor weight, Tensor target, Tensor keep_idx, "
        "Tensor? bias=None, int ignore_index=-100, str reduction=\"mean\", float "
        "grad_scale=1.0, str backend=\"auto\") -> Tensor");
  m.def("linear_cross_entropy_forward(Tensor h, Tensor weight, Tensor target, Tensor keep_idx, "
        "Tensor? bias, int ignore_index, str reduction, float grad_scale, str backend) -> (Tensor, "
        "Tensor)");
  // The value check of a caller's keep_idx (keep_idx.cpp).
  m.def("check_keep_idx(Tensor keep_idx, int n, str name) -> ()");
  // The eager C++ autograd faces of the torch backend (eager.cpp; internal: the Python entry points
  // call them when the torch backend runs an op eagerly).
  m.def("linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, Tensor? x_kept, float grad_scale) "
        "-> Tensor");
  m.def("layer_norm_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor keep_idx, Tensor? x_kept, float eps) "
        "-> Tensor");
  m.def("mlp_eager(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, Tensor? x_kept, "
        "int activation, float grad_scale) -> Tensor");
  m.def("attention_eager(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal, float scale, "
        "Tensor? key_padding_mask) -> (Tensor, Tensor)");
  // Backward of linear and pointwise conv on kept rows ("cuda" backend): grad_out [B, n, c_out]
  // and x_kept [B, n_keep, c_in] are row views with any strides; x_kept is needed for the weight
  // gradient only, weight for the input gradient only. Returns (grad_x [B, n, c_in] laid out
  // channels-first when asked, grad_weight [c_out, c_in], grad_bias [c_out]); a gradient whose
  // `needs` flag (x, weight, bias) is false is not computed and comes back as an empty tensor.
  m.def("kept_rows_backward(Tensor grad_out, Tensor? x_kept, Tensor? weight, Tensor keep_idx, "
        "float grad_scale, bool channels_first, int c_in, bool[3] needs) -> (Tensor, Tensor, Tensor)");
}
