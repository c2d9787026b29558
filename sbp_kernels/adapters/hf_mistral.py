"""Hugging Face Mistral (RMSNorm norms, sliding-window attention (config.sliding_window), a SwiGLU MLP): its decoder layers and its model roots, through
hf_common (pre-norm decoder layers: fused norms, the "sbp" attention implementation, the fused gated
MLP; a causal LM's head and loss fused; a sequence classifier's last token always kept)."""
from .hf_common import DecoderFamily

ADAPTER = DecoderFamily("transformers.mistral", "transformers.models.mistral.modeling_mistral", "MistralDecoderLayer")
