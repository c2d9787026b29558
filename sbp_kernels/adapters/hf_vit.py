"""Hugging Face ViT: ViTLayer (pre-norm: layernorm_before, ViTAttention with q / k / v / o
projections through the attention interface, a dropout, layernorm_after, ViTMLP) and the ViTModel /
ViTForImageClassification roots, whose steps lay out the patch grid after the CLS token (always
kept: the classifier reads it)."""
from .common import convert_dropout, convert_mlp, convert_norm
from .hf_common import SPEC, ModelFamily, convert_attention_module, convert_model

MODULE = "transformers.models.vit.modeling_vit"
LAYERS = (f"{MODULE}.ViTLayer",)
MLP_NAMES = ("fc1", "activation_fn", "fc2", None, None)


class HFViT(ModelFamily):
    def convert(self, m, name, converter):
        if self._root(m):
            convert_model(m, name, converter, final_norm="layernorm")
            return
        for slot in ("layernorm_before", "layernorm_after"):
            convert_norm(getattr(m, slot), f"{name}.{slot}", converter)
        convert_attention_module(m.attention, f"{name}.attention", converter)
        convert_dropout(m.dropout, f"{name}.dropout", converter)
        convert_mlp(m.mlp, f"{name}.mlp", converter, names=MLP_NAMES)
        converter.recompute_block(m, SPEC)

    def root_options(self, root, args, kwargs):
        if not self._root(root):
            return None
        config = root.config
        size, patch = config.image_size, config.patch_size
        pixels = kwargs.get("pixel_values", args[0] if args else None) if args is not None else None
        if pixels is not None:
            size = pixels.shape[-1]
        grid = size // patch
        return {"layouts": {1 + grid * grid: (grid, grid)}}


ADAPTER = HFViT("transformers.vit", MODULE, LAYERS)
