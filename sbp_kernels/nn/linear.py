"""Drop-in SBP modules for nn.Linear, 1x1 nn.Conv2d and an MLP (fc1 -> act -> fc2).

In training mode with grad enabled the forward is exact and dense and the backward runs only on
the kept positions (sbp_kernels.linear / pointwise_conv / mlp); in eval mode, under no_grad /
inference_mode, or for inputs without a position axis, each module is exactly its dense
counterpart (the same calls, the same numbers). Parameters, state_dict keys and repr are those of
the torch module, so checkpoints load both ways.

`forward(x, keep_idx=None)`: with keep_idx None the keep set comes from `keepset.keep_idx_for`,
shared by every SBP layer of the same position count inside one `keepset.step()`; a given
keep_idx is checked and used as is (and ignored when the module runs dense).

SBPMlp is also the SBP form of any module with timm Mlp's attributes (fc1, act, drop1, norm, fc2,
drop2; convert swaps timm's Mlp into it, see base.swap): its positions are dim -2 of x, or the
H*W pixels of a channels-last [B, H, W, C] map (timm's ConvNeXt block), laid out (H, W).
"""
import numbers

import torch.nn as nn
import torch.nn.functional as F

from ..ops import dropout as dropout_op
from ..ops import linear as linear_op
from ..ops import mlp as mlp_op
from ..ops import pointwise_conv as pointwise_conv_op
from ..ops._common import autocast_inputs
from ..reference import ACTIVATIONS, activation_of
from .base import SBPModule

__all__ = ["Activation", "SBPLinear", "SBPConv1x1", "SBPMlp", "activation_name", "dropout_p"]


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
        if x.dim() < 2 or (x.dim() == 2 and keep_idx is None) or not self._sbp_active():
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


def activation_name(act):
    """The sbp activation name of act: a name of reference.ACTIVATIONS, or a module / function
    computing one of them exactly (nn.GELU, timm's GELU, Hugging Face's activations, ...).
    ValueError otherwise."""
    if isinstance(act, str) and act in ACTIVATIONS:
        return act
    name = None if isinstance(act, str) or not callable(act) else activation_of(act)
    if name is None:
        raise ValueError(
            f"act must compute one of {sorted(ACTIVATIONS)} exactly (nn.GELU(), nn.SiLU(), nn.ReLU(), ...) or be "
            f"one of those names, got {act!r}"
        )
    return name


def dropout_p(m):
    """The drop probability of a dropout slot (0 for None / Identity / a 0 float); None when it is
    something else (that then cannot be fused)."""
    if m is None or isinstance(m, nn.Identity):
        return 0.0
    if isinstance(m, nn.Dropout) and type(m).forward is nn.Dropout.forward:
        return m.p
    if isinstance(m, numbers.Real) and not isinstance(m, bool):
        return float(m)
    return None


class SBPMlp(SBPModule, nn.Module):
    """fc2(drop1(act(fc1(x)))) then drop2, with sbp_kernels.mlp: the hidden activation is saved
    for kept rows only (and the dropout masks of kept rows as bool).

    The parameter names are timm's Mlp's (fc1.weight, fc1.bias, fc2.weight, fc2.bias; fc1 and
    fc2 are nn.Linear submodules, act is the activation module), so state_dicts load both ways.
    activation: a name of reference.ACTIVATIONS ("gelu" (exact erf, nn.GELU()), "gelu_tanh",
    "relu", "silu", ...). bias: a bool, or a pair (fc1's, fc2's) as in timm. Positions are dim -2
    of x, or the H*W pixels of a 4-D channels-last x.
    """

    def __init__(
        self, in_features, hidden_features=None, out_features=None, activation="gelu", bias=True,
        device=None, dtype=None, *, keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto",
    ):
        super().__init__()
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = bias if isinstance(bias, (tuple, list)) else (bias, bias)
        self.fc1 = nn.Linear(in_features, hidden_features, bias1, device, dtype)
        self.act = Activation(activation)
        self.fc2 = nn.Linear(hidden_features, out_features, bias2, device, dtype)

    @classmethod
    def from_modules(cls, fc1, act, fc2, **settings):
        """An SBPMlp over the given modules, which it SHARES (fc1 and fc2 become its submodules:
        same Parameter objects, so an optimizer built before keeps working). fc1 / fc2: plain
        nn.Linear; act: an activation module (see activation_name) or a name.
        `settings`: keep_ratio, strategy, grad_scale, backend. Keeps fc1's train / eval mode."""
        _check_type(fc1, nn.Linear, "fc1", (nn.Linear.forward, SBPLinear.forward))
        _check_type(fc2, nn.Linear, "fc2", (nn.Linear.forward, SBPLinear.forward))
        if fc1.out_features != fc2.in_features:
            raise ValueError(
                f"fc2.in_features must equal fc1.out_features ({fc1.out_features}), got {fc2.in_features}"
            )
        name = activation_name(act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._init_sbp(**settings)
        new.fc1 = fc1
        new.act = Activation(name) if isinstance(act, str) else act
        new.fc2 = fc2
        return new.train(fc1.training)

    @staticmethod
    def unsupported(m):
        """Why a module with Mlp's attributes cannot run as SBPMlp (a reason), or None."""
        for name in ("fc1", "fc2"):
            sub = getattr(m, name, None)
            if not (isinstance(sub, nn.Linear) and type(sub).forward in (nn.Linear.forward, SBPLinear.forward)):
                return f"{name} is not a plain nn.Linear ({type(sub).__name__})"
        if not isinstance(getattr(m, "norm", None), (nn.Identity, type(None))):
            return f"it has a norm inside ({type(m.norm).__name__})"
        for name in ("drop1", "drop2"):
            if dropout_p(getattr(m, name, None)) is None:
                return f"{name} is not a plain dropout ({type(getattr(m, name)).__name__})"
        try:
            activation_name(m.act)
        except ValueError:
            return f"its activation {type(m.act).__name__} is none of {sorted(ACTIVATIONS)}"
        return None

    @property
    def activation(self):
        name = self.__dict__.get("_sbp_activation")
        if name is None:
            name = self.__dict__["_sbp_activation"] = activation_name(self.act)
        return name

    def forward(self, x, keep_idx=None):
        drop1 = dropout_p(getattr(self, "drop1", None)) if self.training else 0.0
        drop2 = dropout_p(getattr(self, "drop2", None)) if self.training else 0.0
        if x.dim() < 2 or not self._sbp_active():
            return self._dense(x, drop1, drop2)
        shape = x.shape
        if x.dim() == 4:  # channels-last feature map [B, H, W, C]: the H*W pixels are the positions
            keep_idx = self._keep_idx(shape[1] * shape[2], x.device, keep_idx, layout=tuple(shape[1:3]))
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        else:
            keep_idx = self._keep_idx(shape[-2], x.device, keep_idx)
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
        out = mlp_op.apply(x, w1, b1, w2, b2, keep_idx, self.activation, self.grad_scale, drop1, self.backend)
        if drop2:
            out = dropout_op.apply(out, keep_idx, drop2, self.backend)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _dense(self, x, drop1, drop2):
        h = self.act(self.fc1(x))
        if drop1:
            h = F.dropout(h, drop1, True)
        out = self.fc2(h)
        return F.dropout(out, drop2, True) if drop2 else out


class Activation(nn.Module):
    """The activation of reference.ACTIVATIONS called `name` (SBPMlp's act when given a name)."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name][0](x)

    def extra_repr(self):
        return self.name
