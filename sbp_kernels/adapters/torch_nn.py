"""torch.nn's own layers: nn.TransformerEncoderLayer, nn.MultiheadAttention (self-attention),
nn.Linear and the 1x1 nn.Conv2d, wherever they are (the positions of a Linear are the dims between
batch and channels of its input; a 2-D input is [batch, features] and runs dense)."""
from torch import nn

from ..nn.attention import SBPMultiheadAttention
from ..nn.recompute import RecomputeSpec, rows
from ..nn.transformer import SBPTransformerEncoderLayer
from .common import convert_linear


def _plain(m, cls):
    return isinstance(m, cls) and all(
        getattr(type(m), f) is getattr(cls, f) or getattr(type(m), f) is getattr(_sbp_of(cls), f)
        for f in ("forward",) + (("_sa_block", "_ff_block") if cls is nn.TransformerEncoderLayer else ())
    )


def _sbp_of(cls):
    return {nn.TransformerEncoderLayer: SBPTransformerEncoderLayer, nn.MultiheadAttention: SBPMultiheadAttention}[cls]


class EncoderLayerSpec(RecomputeSpec):
    """nn.TransformerEncoderLayer: positions on dim 1 (batch_first) or 0; residual when pre-norm."""

    def dim_of(self, block, x):
        return 1 if block.self_attn.batch_first and x.dim() == 3 else 0


def encoder_layer_spec(layer):
    return EncoderLayerSpec(token_args={"src_mask": rows(-2, -1), "src_key_padding_mask": rows(-1)},
                            residual=layer.norm_first)


class TorchNN:
    name = "torch.nn"

    def matches(self, m):
        return (
            _plain(m, nn.TransformerEncoderLayer)
            or _plain(m, nn.MultiheadAttention)
            or isinstance(m, (nn.Linear, nn.Conv2d))
        )

    def convert(self, m, name, converter):
        if isinstance(m, nn.TransformerEncoderLayer):
            converter.swap(m, SBPTransformerEncoderLayer)  # its self_attn too
            converter.recompute_block(m, encoder_layer_spec(m))
        elif isinstance(m, nn.MultiheadAttention):
            converter.swap(m, SBPMultiheadAttention)  # out_proj is never called as a module
        elif not convert_linear(m, name, converter) and isinstance(m, nn.Linear):
            converter.dense(name, m, f"{type(m).__name__} overrides nn.Linear's forward")

    def opaque(self, m):
        """nn.MultiheadAttention calls no submodule (its out_proj weight is read directly)."""
        return isinstance(m, nn.MultiheadAttention)

    def root_options(self, root, args, kwargs):
        return None


ADAPTER = TorchNN()
