"""timm's Swin Transformer: SwinTransformerBlock (window attention with a relative position bias
and, in shifted blocks, the shifted-window mask) on [B, H, W, C] feature maps.

Window attention needs the same kept positions in every window (its batch is B x windows), so a
block draws its stage's keep set window-periodic (sampling.Windowed: one window pattern repeated
in every window) and hands its attention the pattern as the window sees it after the block's
cyclic shift; norm1, norm2 and the MLP use the stage's keep set itself, so the gradients of the
norms, the attention and the MLP flow through the same pixels. The attention runs its own forward
with the functional calls routed to the sbp ops (SBPIntercepted: the relative position bias and
the mask become the op's additive bias, the bias table takes its gradient). A block whose windows
do not tile its feature map (padding) has no such keep set: it runs with every position kept
(exact gradients, no saving), with one warning. PatchMerging between stages sits on the trunk
and stays dense.
"""
import torch

from .. import keepset
from ..nn.base import SBPModule
from ..sampling import Windowed
from .common import convert_norm, forward_signature_is, is_class, library_class
from .timm_vit import convert_attention, convert_block_mlp

BLOCKS = ("timm.models.swin_transformer.SwinTransformerBlock",)
STAGES = ("timm.models.swin_transformer.SwinTransformerStage",)


def window_keep(keep, grid, window, shift):
    """The keep set of one window (flat positions of wh x ww) of a window-periodic grid keep set,
    as the window sees it after the block's cyclic shift (torch.roll by -shift). Shapes do not
    depend on the values (torch.compile(fullgraph=True) with fixed keep sets)."""
    (h, w), (wh, ww) = grid, window
    count = keep.shape[0] * wh * ww // (h * w)  # kept positions per window
    in_window = (keep // w % wh) * ww + keep % w % ww
    mask = torch.zeros(wh * ww, dtype=torch.bool, device=keep.device).index_fill(0, in_window, True)
    mask = mask.view(wh, ww).roll(shifts=(-shift[0], -shift[1]), dims=(0, 1)).flatten()
    # the positions of mask's count True entries, sorted (a stable sort puts them first, in order)
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count].to(keep.dtype)


class SBPSwinBlock(SBPModule):
    """timm's SwinTransformerBlock with window-periodic keep sets (see the module docstring)."""

    def forward(self, x):
        if not self._sbp_active():
            return super().forward(x)
        _, h, w, _ = x.shape
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        if h % window[0] or w % window[1]:
            self._warn_fallback(f"the {window} windows do not tile the {h}x{w} map; every position is kept")
            with keepset.step(keep_ratio=1.0):
                return super().forward(x)
        keep = self._keep_idx(h * w, x.device, layout=Windowed((h, w), window))
        fixed = {h * w: keep, window[0] * window[1]: window_keep(keep, (h, w), window, shift)}
        with keepset.step(keep_idx=fixed):
            return super().forward(x)


class TimmSwin:
    name = "timm.swin"

    def matches(self, m):
        return is_class(m, *BLOCKS, *STAGES)

    def convert(self, m, name, converter):
        if is_class(m, *STAGES):
            if not isinstance(m.downsample, torch.nn.Identity):
                converter.dense(f"{name}.downsample", m.downsample,
                                "patch merging sits on the trunk between stages (SBP there would cut every earlier "
                                "block's gradient to the kept positions)")
            converter.visit(m.blocks, f"{name}.blocks", True)
            return
        if not forward_signature_is(library_class(m, BLOCKS), ("x",)):
            converter.dense(name, m, "this timm version's SwinTransformerBlock.forward has another signature")
            return
        converter.swap(m, SBPSwinBlock)
        convert_norm(m.norm1, f"{name}.norm1", converter, "channels_last")
        convert_norm(m.norm2, f"{name}.norm2", converter)
        convert_attention(m.attn, f"{name}.attn", converter)
        convert_block_mlp(m.mlp, f"{name}.mlp", converter)

    def root_options(self, root, args, kwargs):
        return None


ADAPTER = TimmSwin()
