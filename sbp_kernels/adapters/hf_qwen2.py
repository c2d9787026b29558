"""Hugging Face Qwen2 (RMSNorm norms, q / k / v biases, a SwiGLU MLP, sliding-window layers (configurable)): its decoder layers and its model roots, through
hf_common (pre-norm decoder layers: fused norms, the "sbp" attention implementation, the fused gated
MLP; a causal LM's head and loss fused; a sequence classifier's last token always kept)."""
from .hf_common import DecoderFamily

ADAPTER = DecoderFamily("transformers.qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer")
