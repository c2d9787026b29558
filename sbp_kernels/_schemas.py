"""Schemas of the `sbp` ops whose kernels live in Python (DESIGN.md 3.7).

The C++ extension declares the same strings with TORCH_LIBRARY (csrc/registration.cpp, checked
equal by tests/test_extension.py); this copy defines them when the extension is not built, so the
`torch` and `triton` backends work without it.
"""

SCHEMAS = {
    "linear": "linear(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, float grad_scale=1.0, "
    "str backend=\"auto\") -> Tensor",
    "pointwise_conv": "pointwise_conv(Tensor x, Tensor weight, Tensor? bias, Tensor keep_idx, "
    "float grad_scale=1.0, str backend=\"auto\") -> Tensor",
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, "
    "float? scale=None, str mode=\"qkv\", float grad_scale=1.0, str backend=\"auto\") -> Tensor",
    "attention_forward": "attention_forward(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal, "
    "float? scale, str mode, float grad_scale, str backend) -> (Tensor, Tensor)",
    "mlp": "mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, "
    "str activation=\"gelu\", float grad_scale=1.0, str backend=\"auto\") -> Tensor",
    "mlp_forward": "mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor keep_idx, "
    "str activation, float grad_scale, str backend) -> (Tensor, Tensor)",
}
