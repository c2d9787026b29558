"""Hugging Face Llama (RMSNorm norms, a SwiGLU MLP): its decoder layers and its model roots, through
hf_common (pre-norm decoder layers: fused norms, the "sbp" attention implementation, the fused gated
MLP; a causal LM's head and loss fused; a sequence classifier's last token always kept)."""
from .hf_common import DecoderFamily

ADAPTER = DecoderFamily("transformers.llama", "transformers.models.llama.modeling_llama", "LlamaDecoderLayer")
