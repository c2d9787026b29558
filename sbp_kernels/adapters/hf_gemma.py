"""Hugging Face Gemma (RMSNorms scaling by 1 + weight in float32, a GeGLU MLP (tanh GELU), scaled embeddings): its decoder layers and its model roots, through
hf_common (pre-norm decoder layers: fused norms, the "sbp" attention implementation, the fused gated
MLP; a causal LM's head and loss fused; a sequence classifier's last token always kept)."""
from .hf_common import DecoderFamily

ADAPTER = DecoderFamily("transformers.gemma", "transformers.models.gemma.modeling_gemma", "GemmaDecoderLayer")
