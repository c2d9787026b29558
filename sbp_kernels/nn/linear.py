"""Drop-in SBP modules for nn.Linear and the 1x1 nn.Conv2d.

In training mode with grad enabled the forward is exact and dense and the backward runs only on
the kept positions (sbp_kernels.linear / pointwise_conv / mlp); in eval mode, under no_grad /
inference_mode, or for inputs without a position axis, each module is exactly its dense
counterpart (the same calls, the same numbers). Parameters, state_dict keys and repr are those of
the torch module, so checkpoints load both ways.

`forward(x, keep_idx=None)`: with keep_idx None the keep set comes from `keepset.keep_idx_for`,
shared by every SBP layer of the same position count inside one `keepset.step()`; a given
keep_idx is checked and used as is (and ignored when the module runs dense).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..ops import linear as linear_op
from ..ops import pointwise_conv as pointwise_conv_op
from ..ops._common import autocast_inputs
from .base import SBPModule

__all__ = ["SBPConv1D", "SBPConv1x1", "SBPLinear", "check_pointwise", "linear_parts", "plain_linear"]


CONV1D = "transformers.pytorch_utils.Conv1D"  # x @ weight + bias, weight [in, out] (GPT-2)


def plain_linear(m):
    """Whether m computes x @ W^T + b as a plain nn.Linear (or its SBP form), or as Hugging Face's
    Conv1D (x @ weight + bias, its weight transposed)."""
    if isinstance(m, nn.Linear):
        return type(m).forward in (nn.Linear.forward, SBPLinear.forward)
    return any(f"{c.__module__}.{c.__qualname__}" == CONV1D for c in type(m).__mro__)


def linear_parts(m):
    """(weight [out, in], bias) of a plain_linear module (a view of Conv1D's weight)."""
    return (m.weight if isinstance(m, nn.Linear) else m.weight.t()), m.bias


class SBPConv1D(SBPModule):
    """Hugging Face's Conv1D (GPT-2's projections) through sbp_kernels.linear on weight.T (the same
    product, so the same numbers); positions on dim -2."""

    def forward(self, x):
        if x.dim() < 3 or not self._sbp_active():
            return super().forward(x)
        keep_idx = self._keep_idx(x.shape[-2], x.device)
        x, weight, bias = autocast_inputs(x, self.weight.t(), self.bias)
        return linear_op.apply(x, weight, bias, keep_idx, self.grad_scale, self.backend)


def _check_type(m, cls, name, forward_of=()):
    """m must be a `cls` whose forward is one of `forward_of` (a subclass with its own forward,
    say a LoRA or quantized layer, would be silently replaced by the plain math)."""
    if not isinstance(m, cls):
        raise TypeError(f"{name} must be an nn.{cls.__name__}, got {type(m).__name__}")
    if forward_of and type(m).forward not in forward_of:
        raise TypeError(
            f"{name} is a {type(m).__name__}, a {cls.__name__} subclass with its own forward; "
            f"only plain {cls.__name__} modules can be converted"
        )


class SBPLinear(SBPModule, nn.Linear):
    """nn.Linear whose backward keeps only the positions (dim -2 of x) of a keep set.

    Same constructor as nn.Linear plus keyword-only keep_ratio, strategy, grad_scale, backend
    (see SBPModule). The position axis is dim -2 of x: [batch, tokens, features] for a ViT. A
    2-D input without keep_idx is [batch, features] and runs dense.
    """

    def __init__(
        self, in_features, out_features, bias=True, device=None, dtype=None, *,
        keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto",
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    @classmethod
    def from_linear(cls, m, **settings):
        """An SBPLinear that SHARES m's Parameter objects (no copy): m and the result alias the
        same weight and bias, so an optimizer built over m's parameters before the conversion
        keeps working. `settings`: keep_ratio, strategy, grad_scale, backend. Keeps m's
        train / eval mode."""
        _check_type(m, nn.Linear, "m", (nn.Linear.forward, SBPLinear.forward))
        new = cls(m.in_features, m.out_features, m.bias is not None, device="meta", **settings)
        new.weight = m.weight
        new.bias = m.bias
        return new.train(m.training)

    def forward(self, x, keep_idx=None):
        # A 2-D input is [batch, features] (a classifier head), not positions: dense, unless the
        # caller names positions with keep_idx.
        ndim = x.dim()
        if ndim < 2 or (ndim == 2 and keep_idx is None) or not self._sbp_active():
            return F.linear(x, self.weight, self.bias)
        keep_idx = self._keep_idx(x.shape[-2], x.device, keep_idx)
        x, weight, bias = autocast_inputs(x, self.weight, self.bias)
        return linear_op.apply(x, weight, bias, keep_idx, self.grad_scale, self.backend)


def check_pointwise(conv):
    """ValueError naming the first attribute that makes conv more than a 1x1 pointwise conv."""
    same_or_valid = isinstance(conv.padding, str)  # "same" / "valid": both pad 0 for a 1x1 kernel
    checks = (
        ("kernel_size", tuple(conv.kernel_size) == (1, 1), "1 (a 1x1 kernel)"),
        ("stride", tuple(conv.stride) == (1, 1), "1"),
        ("padding", same_or_valid or tuple(conv.padding) == (0, 0), "0"),
        ("dilation", tuple(conv.dilation) == (1, 1), "1"),
        ("groups", conv.groups == 1, "1"),
        ("padding_mode", conv.padding_mode == "zeros", "'zeros'"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(
                f"SBPConv1x1 needs a pointwise conv: {name} must be {expected}, got {getattr(conv, name)!r}"
            )


class SBPConv1x1(SBPModule, nn.Conv2d):
    """1x1 nn.Conv2d whose backward keeps only the pixels of a keep set over the H*W positions.

    Same constructor as nn.Conv2d (kernel_size defaults to 1; anything but a pointwise conv
    raises ValueError) plus keyword-only keep_ratio, strategy, grad_scale, backend. Takes
    [B, C, H, W] in contiguous or channels_last format; an unbatched [C, H, W] is run as a batch
    of one.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size=1, stride=1, padding=0, dilation=1, groups=1,
        bias=True, padding_mode="zeros", device=None, dtype=None, *,
        keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto",
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )
        check_pointwise(self)
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    @classmethod
    def from_conv(cls, m, **settings):
        """An SBPConv1x1 sharing m's Parameter objects (see SBPLinear.from_linear). m must be a
        plain nn.Conv2d with a 1x1 kernel, stride 1, padding 0, dilation 1, groups 1 and
        padding_mode "zeros"; otherwise ValueError naming the attribute."""
        _check_type(m, nn.Conv2d, "m", (nn.Conv2d.forward, SBPConv1x1.forward))
        check_pointwise(m)
        new = cls(
            m.in_channels, m.out_channels, padding=m.padding, bias=m.bias is not None, device="meta",
            **settings,
        )
        new.weight = m.weight
        new.bias = m.bias
        return new.train(m.training)

    def forward(self, x, keep_idx=None):
        if x.dim() not in (3, 4) or not self._sbp_active():
            return super().forward(x)
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0), keep_idx).squeeze(0)
        keep_idx = self._keep_idx(x.shape[-2] * x.shape[-1], x.device, keep_idx, layout=tuple(x.shape[-2:]))
        x, weight, bias = autocast_inputs(x, self.weight, self.bias)
        return pointwise_conv_op.apply(x, weight, bias, keep_idx, self.grad_scale, self.backend)
