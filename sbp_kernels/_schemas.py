"""Schemas of the `sbp` ops whose kernels live in Python (DESIGN.md 3).

The C++ extension declares the same strings with TORCH_LIBRARY (csrc/registration.cpp, checked
equal by tests/test_extension.py); this copy defines them when the extension is not built, so the
`torch` and `triton` backends work without it. Each `*_forward` op also returns what its public
op's backward saves (kept rows of intermediates, dropout masks of kept rows).
"""

SCHEMAS = {
    "linear": "linear(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, float grad_scale=1.0, "
    "str backend=\"auto\") -> Tensor",
    "pointwise_conv": "pointwise_conv(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, "
    "float grad_scale=1.0, str backend=\"auto\") -> Tensor",
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, float? scale=None, "
    "str mode=\"qkv\", float grad_scale=1.0, Tensor? key_padding_mask=None, Tensor? attn_bias=None, "
    "float dropout_p=0.0, str backend=\"auto\") -> Tensor",
    "attention_forward": "attention_forward(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal, "
    "float? scale, str mode, float grad_scale, Tensor? key_padding_mask, Tensor? attn_bias, float dropout_p, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    "mlp": "mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, "
    "str activation=\"gelu\", float grad_scale=1.0, float dropout_p=0.0, str backend=\"auto\") -> Tensor",
    "mlp_forward": "mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, "
    "str activation, float grad_scale, float dropout_p, str backend) -> (Tensor, Tensor, Tensor)",
    "gated_mlp": "gated_mlp(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, Tensor w_down, "
    "Tensor? b_down, Tensor keep_idx, str activation=\"silu\", float grad_scale=1.0, str backend=\"auto\") -> Tensor",
    "gated_mlp_forward": "gated_mlp_forward(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, "
    "Tensor w_down, Tensor? b_down, Tensor keep_idx, str activation, float grad_scale, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    "layer_norm": "layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor keep_idx, float eps=1e-05, "
    "str backend=\"auto\") -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor? weight, Tensor keep_idx, float eps=1e-06, float weight_offset=0.0, "
    "bool scale_in_float=False, str backend=\"auto\") -> Tensor",
    "dropout": "dropout(Tensor x, Tensor keep_idx, float p, str backend=\"auto\") -> Tensor",
    "dropout_forward": "dropout_forward(Tensor x, Tensor keep_idx, float p, str backend) -> (Tensor, Tensor)",
    "linear_cross_entropy": "linear_cross_entropy(Tensor h, Tensor weight, Tensor target, Tensor keep_idx, "
    "Tensor? bias=None, int ignore_index=-100, str reduction=\"mean\", float grad_scale=1.0, "
    "str backend=\"auto\") -> Tensor",
    "linear_cross_entropy_forward": "linear_cross_entropy_forward(Tensor h, Tensor weight, Tensor target, "
    "Tensor keep_idx, Tensor? bias, int ignore_index, str reduction, float grad_scale, str backend) "
    "-> (Tensor, Tensor)",
}
