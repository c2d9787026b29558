"""SBP forms of MLPs: fc1 -> act -> fc2 (SBPMlp) and down(act(gate(x)) * up(x)) (SBPGatedMlp).

In training mode with grad enabled they run sbp_kernels.mlp / gated_mlp, which save only x and
the hidden pre-activations of kept rows (and the dropout masks of kept rows as bool); otherwise
they are the dense MLP. SBPMlp is a module of its own (timm Mlp's parameter names, so state_dicts
load both ways) and the SBP form convert swaps any module with timm Mlp's attributes into (fc1,
act, drop1, norm, fc2, drop2): its positions are dim -2 of x, or the H*W pixels of a channels-last
[B, H, W, C] map (timm's ConvNeXt block), laid out (H, W). SBPGatedMlp is the SBP form of a gated
MLP whose parts are named by `gated_names` (timm's SwiGLU: fc1_g, fc1_x, fc2, act; Hugging Face's
LlamaMLP and kin: gate_proj, up_proj, down_proj, act_fn).
"""
import numbers

import torch.nn as nn
import torch.nn.functional as F

from ..ops import dropout as dropout_op
from ..ops import mlp as mlp_op
from ..ops._common import autocast_inputs
from ..reference import ACTIVATIONS, activation_of
from .base import SBPModule
from .linear import SBPLinear, _check_type, linear_parts, plain_linear

__all__ = ["Activation", "SBPGatedMlp", "SBPMlp", "activation_name", "dropout_p"]


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

    # The attribute names of (fc1, act, fc2, dropout after act, dropout after fc2): timm's Mlp's;
    # convert sets others for other libraries' MLPs (Hugging Face ViT: fc1, activation_fn, fc2;
    # GPT-2: c_fc, act, c_proj, -, dropout).
    mlp_names = ("fc1", "act", "fc2", "drop1", "drop2")

    @classmethod
    def from_mlp(cls, m, **settings):
        """An SBPMlp sharing the fc1 / act / fc2 of a module with timm Mlp's parts (a new module;
        convert changes the module itself instead). ValueError naming what does not fit."""
        reason = cls.unsupported(m)
        if reason is not None:
            raise ValueError(f"m cannot run as an SBPMlp: {reason}")
        new = cls.from_modules(m.fc1, m.act, m.fc2, **settings)
        for name in ("drop1", "drop2"):
            if isinstance(getattr(m, name, None), nn.Module):
                setattr(new, name, getattr(m, name))
        return new.train(m.training)

    @staticmethod
    def unsupported(m, names=mlp_names):
        """Why a module with these parts cannot run as SBPMlp (a reason), or None."""
        fc1, act, fc2, drop1, drop2 = names
        if not all(hasattr(m, name) for name in (fc1, act, fc2)):
            return f"it has no {fc1} / {act} / {fc2}"
        for name in (fc1, fc2):
            if not plain_linear(getattr(m, name, None)):
                return f"{name} is not a plain nn.Linear ({type(getattr(m, name, None)).__name__})"
        if not isinstance(getattr(m, "norm", None), (nn.Identity, type(None))):
            return f"it has a norm inside ({type(m.norm).__name__})"
        for name in (drop1, drop2):
            if dropout_p(getattr(m, name, None) if name else None) is None:
                return f"{name} is not a plain dropout ({type(getattr(m, name)).__name__})"
        if dropout_p(getattr(m, "drop", None)) is None:  # timm's older single dropout slot
            return "drop is not a plain dropout"
        try:
            activation_name(getattr(m, act))
        except ValueError:
            return f"its activation {type(getattr(m, act)).__name__} is none of {sorted(ACTIVATIONS)}"
        return None

    @property
    def activation(self):
        name = self.__dict__.get("_sbp_activation")
        if name is None:
            name = self.__dict__["_sbp_activation"] = activation_name(getattr(self, self.mlp_names[1]))
        return name

    def forward(self, x, keep_idx=None):
        fc1, _, fc2, drop1, drop2 = self.mlp_names
        drop1 = dropout_p(getattr(self, drop1, None) if drop1 else None) if self.training else 0.0
        drop2 = dropout_p(getattr(self, drop2, None) if drop2 else None) if self.training else 0.0
        if x.dim() < 2 or not self._sbp_active():
            return self._dense(x, drop1, drop2)
        shape = x.shape
        if x.dim() == 4:  # channels-last feature map [B, H, W, C]: the H*W pixels are the positions
            keep_idx = self._keep_idx(shape[1] * shape[2], x.device, keep_idx, layout=tuple(shape[1:3]))
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        else:
            keep_idx = self._keep_idx(shape[-2], x.device, keep_idx)
        x, w1, b1, w2, b2 = autocast_inputs(x, *linear_parts(getattr(self, fc1)), *linear_parts(getattr(self, fc2)))
        out = mlp_op.apply(x, w1, b1, w2, b2, keep_idx, self.activation, self.grad_scale, drop1, self.backend)
        if drop2:
            out = dropout_op.apply(out, keep_idx, drop2, self.backend)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _dense(self, x, drop1, drop2):
        fc1, act, fc2, _, _ = self.mlp_names
        h = getattr(self, act)(getattr(self, fc1)(x))
        if drop1:
            h = F.dropout(h, drop1, True)
        out = getattr(self, fc2)(h)
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


class SBPGatedMlp(SBPModule):
    """Mixin: a gated MLP down(drop(act(gate(x)) * up(x))) then drop2, through sbp_kernels.gated_mlp
    while SBP is active (positions on dim -2); the module itself otherwise. gated_names: the
    attribute names of (gate, up, down, activation)."""

    gated_names = ("fc1_g", "fc1_x", "fc2", "act")

    @staticmethod
    def unsupported(m, names):
        """Why m cannot run as SBPGatedMlp with these part names (a reason), or None."""
        gate, up, down, act = names
        for name in (gate, up, down):
            if not plain_linear(getattr(m, name, None)):
                return f"{name} is not a plain nn.Linear ({type(getattr(m, name, None)).__name__})"
        if not isinstance(getattr(m, "norm", None), (nn.Identity, type(None))):
            return f"it has a norm inside ({type(m.norm).__name__})"
        if dropout_p(getattr(m, "drop1", None)) != 0.0 or dropout_p(getattr(m, "drop2", None)) is None:
            return "it has a dropout between the gate product and the down projection"
        try:
            activation_name(getattr(m, act))
        except ValueError:
            return f"its activation {type(getattr(m, act)).__name__} is none of {sorted(ACTIVATIONS)}"
        return None

    def forward(self, x):
        if x.dim() < 3 or not self._sbp_active():
            return super().forward(x)
        gate, up, down, act = (getattr(self, name) for name in self.gated_names)
        activation = self.__dict__.get("_sbp_activation") or activation_name(act)
        self.__dict__["_sbp_activation"] = activation
        keep_idx = self._keep_idx(x.shape[-2], x.device)
        args = autocast_inputs(x, *linear_parts(gate), *linear_parts(up), *linear_parts(down))
        out = mlp_op.apply_gated(*args, keep_idx, activation, self.grad_scale, self.backend)
        drop2 = dropout_p(getattr(self, "drop2", None)) if self.training else 0.0
        return dropout_op.apply(out, keep_idx, drop2, self.backend) if drop2 else out
