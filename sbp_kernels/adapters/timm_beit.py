"""timm's BEiT: its Block (layer-scale parameters gamma_1 / gamma_2 that the forward multiplies by)
and its Attention (q / v biases concatenated with a zero k bias into F.linear on the qkv weight,
a relative position bias table, an optional shared relative position bias from the model).

The attention runs its own forward with the functional calls routed to the sbp ops
(SBPIntercepted): the relative position bias goes into the sbp attention as an additive bias,
whose kept block is saved and which takes its gradient (so the table trains). SBPBeitBlock mirrors
the block's forward with the layer-scale products on kept rows; norms and the MLP are SBP; the
residual stream stays exact.
"""
from ..nn.base import SBPModule
from .common import forward_signature_is, is_class, library_class, scale_rows
from ..nn.recompute import RecomputeSpec, rows
from .timm_vit import TimmViT, convert_attention

BLOCKS = ("timm.models.beit.Block",)
ATTENTIONS = ("timm.models.beit.Attention",)
ROOTS = ("timm.models.beit.Beit",)
SPEC = RecomputeSpec(token_args={"shared_rel_pos_bias": rows(-2, -1)})


class SBPBeitBlock(SBPModule):
    """timm's BEiT Block with its layer-scale products on kept rows (see the module docstring)."""

    def forward(self, x, shared_rel_pos_bias=None):
        if not self._sbp_active() or self.gamma_1 is None:
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        x_attn = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        x = x + self.drop_path1(scale_rows(self, x_attn, self.gamma_1))
        return x + self.drop_path2(scale_rows(self, self.mlp(self.norm2(x)), self.gamma_2))


class TimmBeit(TimmViT):
    name = "timm.beit"
    attentions, roots, spec, layer_scales = ATTENTIONS, ROOTS, SPEC, ()

    def matches(self, m):
        return is_class(m, *BLOCKS, *ATTENTIONS)

    def convert(self, m, name, converter):
        if is_class(m, *ATTENTIONS):
            convert_attention(m, name, converter)
            return
        if not forward_signature_is(library_class(m, BLOCKS), ("x", "shared_rel_pos_bias")):
            converter.dense(name, m, "this timm version's BEiT Block.forward has another signature")
            return
        converter.swap(m, SBPBeitBlock)
        self.convert_block(m, name, converter)


ADAPTER = TimmBeit()
