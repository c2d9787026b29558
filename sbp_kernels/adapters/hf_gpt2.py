"""Hugging Face GPT-2: GPT2Block (ln_1, GPT2Attention with its fused Conv1D c_attn and c_proj,
ln_2, GPT2MLP with Conv1D c_fc / c_proj and the tanh GELU written out) and the GPT2Model /
GPT2LMHeadModel roots.

Conv1D computes x @ weight + bias with a transposed weight; its SBP form runs sbp_kernels.linear
on weight.T (the same product). The attention goes through the "sbp" attention implementation
(causal, padding masks, attention dropout attn_pdrop); the MLP through the fused MLP op ("gelu_new"
as GPT-2 computes it, its resid dropout on kept rows); the LM head and loss fused (hf_common).
"""
from .common import convert_dropout, convert_mlp, convert_norm
from .hf_common import SPEC, ModelFamily, convert_attention_module, convert_model

MODULE = "transformers.models.gpt2.modeling_gpt2"
BLOCKS = (f"{MODULE}.GPT2Block",)
MLP_NAMES = ("c_fc", "act", "c_proj", None, "dropout")


class HFGPT2(ModelFamily):
    def convert(self, m, name, converter):
        if self._root(m):
            convert_model(m, name, converter, final_norm="ln_f")
            return
        if getattr(m, "crossattention", None) is not None:
            converter.dense(f"{name}.crossattention", m.crossattention, "cross-attention is not self-attention")
        for slot in ("ln_1", "ln_2"):
            convert_norm(getattr(m, slot), f"{name}.{slot}", converter)
        attn = m.attn
        convert_attention_module(attn, f"{name}.attn", converter)
        convert_dropout(attn.resid_dropout, f"{name}.attn.resid_dropout", converter.inner())
        convert_mlp(m.mlp, f"{name}.mlp", converter, names=MLP_NAMES)
        converter.recompute_block(m, SPEC)

    def root_options(self, root, args, kwargs):
        return {} if self._root(root) else None


ADAPTER = HFGPT2("transformers.gpt2", MODULE, BLOCKS)
