"""timm's ConvNeXt: ConvNeXtBlock, with its MLP on channels-last pixels (timm's Mlp with timm's
GELU) or as 1x1 convolutions (conv_mlp), and a layer-scale parameter gamma the forward multiplies
by.

The positions are the H*W pixels of each stage, laid out (H, W) for grid sampling (one keep set
per stage size in a step). In a block, conv_dw (7x7 depthwise) reads neighbours and stays dense:
it gets the gradient of the kept pixels from the norm after it and saves its input whole, as it
must. The norm, the MLP (the fused op for the channels-last Mlp, tokenwise for the conv MLP) and
the gamma product (SBPConvNeXtBlock mirrors the block's forward with it on kept pixels) are SBP;
the shortcut stays exact. The stem and the downsample layers sit on the trunk, between stages:
SBP there would cut the gradient of every earlier block to the kept pixels, so they stay dense
(the downsample layers with one warning each).
"""
from torch import nn

from ..nn.base import SBPModule
from ..nn.recompute import RecomputeSpec
from .common import convert_norm, forward_signature_is, is_class, library_class, scale_rows
from .timm_vit import convert_block_mlp, recompute

BLOCKS = ("timm.models.convnext.ConvNeXtBlock",)
STAGES = ("timm.models.convnext.ConvNeXtStage",)


class SBPConvNeXtBlock(SBPModule):
    """timm's ConvNeXtBlock with its gamma product on kept pixels (see the module docstring)."""

    def forward(self, x):
        if not self._sbp_active() or self.gamma is None:
            return super().forward(x)
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = scale_rows(self, x, self.gamma, "channels_first")
        return self.drop_path(x) + self.shortcut(shortcut)


class ConvNeXtSpec(RecomputeSpec):
    """A ConvNeXt block recomputed on its kept pixels: it saves its input whole (the depthwise conv
    reads neighbours); the replay runs conv_dw on all of it (a cheap depthwise conv), then the norm,
    the MLP and the gamma product on the kept pixels only, laid out as a [B, K, 1, C] map (or
    [B, C, K, 1] for conv_mlp); the input gradient is the shortcut's plus conv_dw's."""

    def positions(self, block, x, dim):
        return x.shape[2] * x.shape[3], tuple(x.shape[2:])

    def save(self, x, keep_idx, dim):
        return x

    def output_rows(self, dy, keep_idx, dim):
        return dy.flatten(2).index_select(2, keep_idx)[..., None]  # [B, C, K, 1]

    def replay(self, block, saved, keep_idx, arguments):
        x = saved.detach().requires_grad_()
        conv = block.conv_dw(x).flatten(2).index_select(2, keep_idx)[..., None]  # [B, C, K, 1]
        if block.use_conv_mlp:
            y = block.mlp(block.norm(conv))
        else:
            y = block.mlp(block.norm(conv.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if block.gamma is not None:
            y = scale_rows(block, y, block.gamma, "channels_first")
        return [x], block.drop_path(y)

    def input_grad(self, dy, grads, keep_idx, dim, like):
        return dy + grads[0]


SPEC = ConvNeXtSpec()


class TimmConvNeXt:
    name = "timm.convnext"

    def matches(self, m):
        return is_class(m, *BLOCKS, *STAGES)

    def convert(self, m, name, converter):
        if is_class(m, *STAGES):
            if not isinstance(m.downsample, nn.Identity):
                converter.dense(f"{name}.downsample", m.downsample,
                                "it sits on the trunk between stages (SBP there would cut every earlier block's "
                                "gradient to the kept pixels)")
            converter.visit(m.blocks, f"{name}.blocks", True)
            return
        if not forward_signature_is(library_class(m, BLOCKS), ("x",)):
            converter.dense(name, m, "this timm version's ConvNeXtBlock.forward has another signature")
            return
        converter.swap(m, SBPConvNeXtBlock)
        positions = "channels_first" if m.use_conv_mlp else "channels_last"
        convert_norm(m.norm, f"{name}.norm", converter, positions)
        convert_block_mlp(m.mlp, f"{name}.mlp", converter, positions)
        if isinstance(m.shortcut, nn.Identity):
            recompute(m, converter, SPEC)

    def root_options(self, root, args, kwargs):
        return None


ADAPTER = TimmConvNeXt()
