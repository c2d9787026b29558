"""timm's Vision Transformer family: ViT, DeiT, DINOv2 (with registers and layer scale), and
every model built from timm.models.vision_transformer.Block.

A Block's branches become SBP, its residual stream stays exact:
- norm1 / norm2: the fused LayerNorm (or RMSNorm) op, tokenwise for other norms;
- attn: timm's Attention / AttentionRope run their own forward with scaled dot-product
  attention, the projections, q / k norms and dropouts routed to the sbp ops (SBPIntercepted),
  so attn_mask, is_causal, rope, grouped-query heads and attention dropout are honoured;
- ls1 / ls2 (layer scale, in place or not): tokenwise;
- mlp: the fused MLP op for timm's Mlp (dropouts included), tokenwise for other MLPs;
- drop_path1 / drop_path2 stay as they are (they save one value per sample).
The model's step lays out its patch grid after the class / register tokens, which are always
kept (root_options).
"""
from .. import replay
from ..nn.base import SBPModule
from ..nn.intercept import SBPIntercepted
from ..nn.recompute import RecomputeSpec, rows
from .common import convert_gated_mlp, convert_mlp, convert_norm, convert_positionwise, is_class

BLOCKS = ("timm.models.vision_transformer.Block",)
ATTENTIONS = ("timm.layers.attention.Attention", "timm.layers.attention.AttentionRope")
MLPS = ("timm.layers.mlp.Mlp",)
ROOTS = ("timm.models.vision_transformer.VisionTransformer",)
DROP_PATHS = ("timm.layers.drop.DropPath",)
SPEC = RecomputeSpec(token_args={"attn_mask": rows(-2, -1)})


class SBPDropPath(SBPModule):
    """timm's DropPath in a recompute-mode block: the per-sample mask drawn while recording (as
    timm draws it) is applied again while replaying, which draws nothing."""

    def forward(self, x):
        mode = replay.mode()
        if mode is None or not self.training or self.drop_prob == 0.0:
            return super().forward(x)
        if mode == "replay":
            return x * replay.current().take()
        keep = 1 - self.drop_prob
        random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep)
        replay.current().put(random_tensor)
        return x * random_tensor


def recompute(m, converter, spec):
    """Recompute mode for a timm block (with its drop paths) when convert asks for it."""
    if converter.recompute:
        for name, child in m.named_children():
            if is_class(child, *DROP_PATHS):
                converter.swap(child, SBPDropPath)
    converter.recompute_block(m, spec)


def convert_attention(m, name, converter):
    """A timm attention module: its own forward with the functional calls routed to sbp ops (its
    fused path, which calls F.scaled_dot_product_attention)."""
    converter.swap(m, SBPIntercepted)


def convert_block_mlp(m, name, converter, positions="rows"):
    """A block's MLP: fused when it is timm's Mlp (or a plain gated one), tokenwise otherwise."""
    if is_class(m, *MLPS):
        convert_mlp(m, name, converter, positions)
    elif not convert_gated_mlp(m, name, converter):
        convert_positionwise(m, name, converter, positions)


class TimmViT:
    """The ViT family; the BEiT and EVA adapters subclass it (their blocks have the same parts and
    their models the same patch layout), naming their own classes and spec."""

    name = "timm.vit"
    attentions, roots, spec = ATTENTIONS, ROOTS, SPEC
    layer_scales = ("ls1", "ls2")  # LayerScale modules (BEiT and EVA multiply by parameters instead)

    def matches(self, m):
        return is_class(m, *BLOCKS) or is_class(m, *ATTENTIONS)

    def convert(self, m, name, converter):
        if is_class(m, *self.attentions):
            convert_attention(m, name, converter)
            return
        self.convert_block(m, name, converter)

    def convert_block(self, m, name, converter):
        """A pre-norm block's parts: norm1, norm2, attn, the layer scales, mlp; then recompute."""
        for slot in ("norm1", "norm2"):
            convert_norm(getattr(m, slot), f"{name}.{slot}", converter)
        if is_class(m.attn, *self.attentions):
            convert_attention(m.attn, f"{name}.attn", converter)
        else:
            converter.dense(f"{name}.attn", m.attn, f"{type(m.attn).__name__} is not a timm attention this package knows")
        for slot in self.layer_scales:
            convert_positionwise(getattr(m, slot), f"{name}.{slot}", converter)
        convert_block_mlp(m.mlp, f"{name}.mlp", converter)
        recompute(m, converter, self.spec)

    def root_options(self, root, args, kwargs):
        if not is_class(root, *self.roots):
            return None
        return patch_options(root, args)


def patch_options(root, args):
    """The step options of a timm ViT-like root: the layout {n: (H', W')} of its prefix tokens then
    the patch grid of the image it is called with (dynamic image sizes included), and its prefix
    (class / register / distillation) tokens always kept, also when patch dropout leaves a token
    count without a layout."""
    embed = root.patch_embed
    grid = tuple(embed.grid_size)
    if args and getattr(root, "dynamic_img_size", False):
        h, w = args[0].shape[-2:]
        grid = (h // embed.patch_size[0], w // embed.patch_size[1])
    prefix = getattr(root, "num_prefix_tokens", 0)
    return {"layouts": {prefix + grid[0] * grid[1]: grid}, "always_keep": tuple(range(prefix))}


ADAPTER = TimmViT()
