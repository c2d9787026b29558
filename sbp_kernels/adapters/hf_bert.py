"""Hugging Face BERT: BertLayer (post-norm: self-attention through the attention interface, then
BertSelfOutput's dense -> dropout -> LayerNorm(+ input), the feed-forward intermediate dense ->
activation and BertOutput's dense -> dropout -> LayerNorm(+ input)) and the BertModel / Bert*
roots; a classifier's pooled token (position 0) is always kept.

The feed-forward runs through the fused MLP op (SBPBertLayer: the intermediate and output denses
are its two layers). With post-norm, the LayerNorms sit on the residual stream: a dropped token
gets no gradient through a converted layer at all (the papers' caveat for post-norm models).
grad_scale applies once per branch: at BertSelfOutput's dense and in the fused MLP.
"""
import inspect

from ..nn.base import SBPModule
from ..nn.mlp import activation_name
from ..ops import mlp as mlp_op
from ..ops._common import autocast_inputs
from .common import convert_dropout, convert_linear, convert_norm, convert_positionwise, library_class
from .hf_common import POST_NORM_SPEC, ModelFamily, convert_attention_module, convert_model

MODULE = "transformers.models.bert.modeling_bert"
LAYERS = (f"{MODULE}.BertLayer",)
# Heads that read the pooled token 0 (so does a BertModel with its pooler: a user's head on pooler_output).
POOLED = ("BertForSequenceClassification", "BertForMultipleChoice", "BertForNextSentencePrediction",
          "BertForPreTraining")


class SBPBertLayer(SBPModule):
    """BertLayer whose feed-forward is the fused MLP op (see the module docstring)."""

    def feed_forward_chunk(self, attention_output):
        if not self._sbp_active():
            return super().feed_forward_chunk(attention_output)
        fc1, out = self.intermediate.dense, self.output
        keep_idx = self._keep_idx(attention_output.shape[-2], attention_output.device)
        args = autocast_inputs(attention_output, fc1.weight, fc1.bias, out.dense.weight, out.dense.bias)
        act = self.__dict__.get("_sbp_activation") or activation_name(self.intermediate.intermediate_act_fn)
        hidden = mlp_op.apply(*args, keep_idx, act, self.grad_scale, 0.0, self.backend)
        return out.LayerNorm(out.dropout(hidden) + attention_output)


def _activation_known(act):
    try:
        activation_name(act)
    except ValueError:
        return False
    return True


class HFBert(ModelFamily):
    def convert(self, m, name, converter):
        if self._root(m):
            convert_model(m, name, converter, final_norm=None)
            return
        if getattr(m, "crossattention", None) is not None:
            converter.dense(f"{name}.crossattention", m.crossattention, "cross-attention is not self-attention")
        attention = m.attention
        convert_attention_module(attention.self, f"{name}.attention.self", converter.inner())
        self_out = attention.output
        convert_linear(self_out.dense, f"{name}.attention.output.dense", converter)
        convert_dropout(self_out.dropout, f"{name}.attention.output.dropout", converter)
        convert_norm(self_out.LayerNorm, f"{name}.attention.output.LayerNorm", converter)
        chunk = inspect.signature(library_class(m, LAYERS).feed_forward_chunk)
        if _activation_known(m.intermediate.intermediate_act_fn) and tuple(chunk.parameters) == ("self", "attention_output"):
            converter.swap(m, SBPBertLayer)
            # named once (the name is found by probing the activation: not at every call)
            m.__dict__["_sbp_activation"] = activation_name(m.intermediate.intermediate_act_fn)
        else:
            convert_positionwise(m.intermediate, f"{name}.intermediate", converter)
            convert_linear(m.output.dense, f"{name}.output.dense", converter)
        convert_dropout(m.output.dropout, f"{name}.output.dropout", converter)
        convert_norm(m.output.LayerNorm, f"{name}.output.LayerNorm", converter)
        converter.recompute_block(m, POST_NORM_SPEC)

    def root_options(self, root, args, kwargs):
        if not self._root(root):
            return None
        base = getattr(root, root.base_model_prefix, root)
        pooled = type(root).__name__ in POOLED or getattr(base, "pooler", None) is not None
        return {"always_keep": (0,)} if pooled else {}


ADAPTER = HFBert("transformers.bert", MODULE, LAYERS)
