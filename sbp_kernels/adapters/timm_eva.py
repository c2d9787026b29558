"""timm's EVA family (EVA, EVA02): EvaBlock and EvaBlockPostNorm with EvaAttention (rope, a
fused or split qkv projection, F.linear on the qkv weight with a concatenated q / k / v bias,
q / k norms, scale norm) and a SwiGLU, GluMlp or Mlp.

The attention runs its own forward with the functional calls routed to the sbp ops
(SBPIntercepted), so the F.linear on `qkv.weight` IS the SBP projection and rope, masks and
causal attention are honoured. The norms, the MLP (fused when it is a plain Mlp or SwiGLU,
tokenwise otherwise, e.g. EVA02's SwiGLU with a norm inside) and the layer-scale products
(gamma_1 / gamma_2, parameters the block multiplies by: SBPEvaBlock mirrors the block's forward
with those products tokenwise) are SBP; the residual stream stays exact.
"""
from ..nn.base import SBPModule
from ..nn.recompute import RecomputeSpec, rows
from .common import forward_signature_is, is_class, library_class, scale_rows
from .timm_vit import TimmViT, convert_attention



def _rope_rows(rope, keep_idx, n):
    """The rotary embedding of the kept patch tokens: rope covers the patches after the prefix
    tokens, which are always kept and come first."""
    prefix = n - rope.shape[-2]
    return rope.index_select(-2, keep_idx[prefix:].to(rope.device) - prefix)

BLOCKS = ("timm.models.eva.EvaBlock",)
POST_NORM_BLOCKS = ("timm.models.eva.EvaBlockPostNorm",)
ATTENTIONS = ("timm.models.eva.EvaAttention",)
ROOTS = ("timm.models.eva.Eva",)
SPEC = RecomputeSpec(token_args={"attn_mask": rows(-2, -1), "rope": _rope_rows})


class SBPEvaBlock(SBPModule):
    """timm's EvaBlock with its layer-scale products on kept rows (see the module docstring)."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if not self._sbp_active():
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = scale_rows(self, x_attn, self.gamma_1)
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = scale_rows(self, x_mlp, self.gamma_2)
        return x + self.drop_path2(x_mlp)


class TimmEva(TimmViT):
    name = "timm.eva"
    attentions, roots, spec, layer_scales = ATTENTIONS, ROOTS, SPEC, ()

    def matches(self, m):
        return is_class(m, *BLOCKS, *POST_NORM_BLOCKS, *ATTENTIONS)

    def convert(self, m, name, converter):
        if is_class(m, *ATTENTIONS):
            convert_attention(m, name, converter)
            return
        if is_class(m, *BLOCKS):
            if not forward_signature_is(library_class(m, BLOCKS), ("x", "rope", "attn_mask", "is_causal")):
                converter.dense(name, m, "this timm version's EvaBlock.forward has another signature")
                return
            converter.swap(m, SBPEvaBlock)
        self.convert_block(m, name, converter)


ADAPTER = TimmEva()
