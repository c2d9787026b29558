"""Hugging Face Qwen3 (RMSNorm norms, per-head q / k RMSNorms on [B, n, h, d] (positions on dim 1), a SwiGLU MLP): its decoder layers and its model roots, through
hf_common (pre-norm decoder layers: fused norms, the "sbp" attention implementation, the fused gated
MLP; a causal LM's head and loss fused; a sequence classifier's last token always kept)."""
from .hf_common import DecoderFamily

ADAPTER = DecoderFamily("transformers.qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer")
