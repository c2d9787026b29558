"""Drop-in SBP modules for nn.Linear, 1x1 nn.Conv2d and a timm-style Mlp (fc1 -> act -> fc2).

In training mode with grad enabled the forward is exact and dense and the backward runs only on
the kept positions (sbp_kernels.linear / pointwise_conv / mlp); in eval mode, under no_grad /
inference_mode, or for inputs without a position axis, each module is exactly its dense
counterpart (the same calls, the same numbers). Parameters, state_dict keys and repr are those of
the torch module, so checkpoints load both ways.

`forward(x, keep_idx=None)`: with keep_idx None the keep set comes from `keepset.keep_idx_for`,
shared by every SBP layer of the same position count inside one `keepset.step()`; a given
keep_idx is used as is (and ignored when the module runs dense).
"""
import numbers

import torch.nn as nn
import torch.nn.functional as F

from ..ops.linear import linear as sbp_linear
from ..ops.mlp import mlp as sbp_mlp
from ..ops.pointwise_conv import pointwise_conv as sbp_pointwise_conv
from ..reference import ACTIVATIONS
from .base import SBPModule

__all__ = ["SBPLinear", "SBPConv1x1", "SBPMlp"]


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
        return sbp_linear(x, self.weight, self.bias, keep_idx, self.grad_scale, backend=self.backend)


def _check_pointwise(conv):
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
        _check_pointwise(self)
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    @classmethod
    def from_conv(cls, m, **settings):
        """An SBPConv1x1 sharing m's Parameter objects (see SBPLinear.from_linear). m must be a
        plain nn.Conv2d with a 1x1 kernel, stride 1, padding 0, dilation 1, groups 1 and
        padding_mode "zeros"; otherwise ValueError naming the attribute."""
        _check_type(m, nn.Conv2d, "m", (nn.Conv2d.forward, SBPConv1x1.forward))
        _check_pointwise(m)
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
        keep_idx = self._keep_idx(x.shape[-2] * x.shape[-1], x.device, keep_idx, layout=x.shape[-2:])
        return sbp_pointwise_conv(x, self.weight, self.bias, keep_idx, self.grad_scale, backend=self.backend)


# activation name -> module class building it (for SBPMlp.act and the reverse mapping).
_ACT_MODULES = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


def activation_name(act):
    """The sbp activation name of act: a name, or an nn.GELU (approximate "none" / "tanh"),
    nn.ReLU or nn.SiLU module. ValueError otherwise."""
    if isinstance(act, str):
        if act in ACTIVATIONS:
            return act
    elif type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    elif type(act) is nn.ReLU:
        return "relu"
    elif type(act) is nn.SiLU:
        return "silu"
    raise ValueError(
        f"act must be nn.GELU(), nn.GELU(approximate='tanh'), nn.ReLU(), nn.SiLU() or one of "
        f"{sorted(ACTIVATIONS)}, got {act!r}"
    )


def _check_no_op(m, name):
    """m.<name> (a dropout or norm slot of a timm Mlp) must do nothing."""
    sub = getattr(m, name, None)
    if sub is None or isinstance(sub, nn.Identity):
        return
    if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p == 0:
        return
    if isinstance(sub, numbers.Real) and not isinstance(sub, bool) and sub == 0:
        return
    raise ValueError(
        f"m.{name} must be None, nn.Identity or a dropout with p=0 to convert m to SBPMlp, got {sub!r}"
    )


class SBPMlp(SBPModule, nn.Module):
    """fc2(act(fc1(x))) with sbp_kernels.mlp: the hidden activation is saved for kept rows only.

    The parameter names are timm's Mlp's (fc1.weight, fc1.bias, fc2.weight, fc2.bias; fc1 and
    fc2 are nn.Linear submodules, act is the activation module), so state_dicts load both ways.
    activation: "gelu" (exact erf, nn.GELU()), "gelu_tanh", "relu" or "silu". bias: a bool, or a
    pair (fc1's, fc2's) as in timm. Positions are dim -2 of x.
    """

    def __init__(
        self, in_features, hidden_features=None, out_features=None, activation="gelu", bias=True,
        device=None, dtype=None, *, keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto",
    ):
        super().__init__()
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)
        activation = _check_activation_arg(activation)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = bias if isinstance(bias, (tuple, list)) else (bias, bias)
        self.fc1 = nn.Linear(in_features, hidden_features, bias1, device, dtype)
        self.activation = activation
        self.act = _ACT_MODULES[activation]()
        self.fc2 = nn.Linear(hidden_features, out_features, bias2, device, dtype)

    @classmethod
    def from_modules(cls, fc1, act, fc2, **settings):
        """An SBPMlp over the given modules, which it SHARES (fc1 and fc2 become its submodules:
        same Parameter objects, so an optimizer built before keeps working). fc1 / fc2: plain
        nn.Linear; act: nn.GELU (approximate "none" or "tanh"), nn.ReLU, nn.SiLU or a name.
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
        new.activation = name
        new.act = _ACT_MODULES[name]() if isinstance(act, str) else act
        new.fc2 = fc2
        return new.train(fc1.training)

    @classmethod
    def from_mlp(cls, m, **settings):
        """An SBPMlp sharing the fc1 / act / fc2 of any module that has them and computes
        fc2(act(fc1(x))) (timm's Mlp and the like). Its dropout slots (drop, drop1, drop2) must
        be absent, None, nn.Identity or p=0, and a norm slot absent or nn.Identity: ValueError
        naming the slot otherwise. Keeps m's train / eval mode."""
        for name in ("fc1", "act", "fc2"):
            if not hasattr(m, name):
                raise ValueError(f"m must have fc1, act and fc2 attributes, {type(m).__name__} has no {name}")
        for name in ("drop", "drop1", "drop2", "norm"):
            _check_no_op(m, name)
        return cls.from_modules(m.fc1, m.act, m.fc2, **settings).train(m.training)

    def forward(self, x, keep_idx=None):
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        if x.dim() < 2 or not self._sbp_active():
            return F.linear(ACTIVATIONS[self.activation][0](F.linear(x, w1, b1)), w2, b2)
        keep_idx = self._keep_idx(x.shape[-2], x.device, keep_idx)
        return sbp_mlp(
            x, w1, b1, w2, b2, keep_idx, self.activation, self.grad_scale, backend=self.backend
        )


def _check_activation_arg(activation):
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation
