"""SBP wrappers for position-wise modules that would otherwise save full-size inputs.

- SBPTokenwise(module): runs any position-wise module (a LayerNorm, timm's LayerScale) through
  sbp_kernels.tokenwise in training, so only the kept positions' activations are saved; otherwise
  it is the module itself. It keeps the wrapped module's state_dict keys: the wrapper shares the
  module's parameter, buffer and child dicts instead of holding it as a child, so `norm1.weight`
  stays `norm1.weight` (not `norm1.module.weight`), the Parameter objects stay the same (an
  optimizer built before keeps working), `.to()` / `.half()` move them for both, and saving and
  loading go through the module's own `_save_to_state_dict` / `_load_from_state_dict`.
- SBPChannelsLastMlp: SBPMlp for channels-last feature maps [B, H, W, C] (timm's ConvNeXt block
  permutes NCHW -> NHWC before its norm and MLP): the H*W pixels are the positions, laid out as
  (H, W) for grid sampling.

Both take their keep set from SBPModule._keep_idx, so inside one `sbp_kernels.step` they share it
with every SBP layer of the same position count. grad_scale is not applied by SBPTokenwise: in a
block, the branch's linear / attention / MLP op applies it once.
"""
import torch
from torch import nn

from ..ops.tokenwise import tokenwise
from .base import SBPModule
from .linear import SBPMlp

__all__ = ["SBPTokenwise", "SBPChannelsLastMlp"]


class SBPTokenwise(SBPModule, nn.Module):
    """A position-wise module run through sbp_kernels.tokenwise while training (see module doc).

    module: any module computing each position independently (its forward is called with the
    full input, under no_grad, and with the kept positions, with a graph). channels_last: the
    input is a [B, H, W, C] feature map whose H*W pixels are the positions (laid out (H, W));
    otherwise positions are dim -2 of x ([B, N, C] tokens; a 2-D input is [batch, features] and
    runs dense). forward(x, keep_idx=None). Attribute reads the wrapper does not answer itself
    (eps, normalized_shape, ...) go to the module. A module that works in place (timm's LayerScale
    with inplace=True) cannot be wrapped: ValueError.
    """

    def __init__(self, module, *, channels_last=False, keep_ratio=0.5, strategy="grid", grad_scale=1.0,
                 backend="auto"):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, SBPModule):
            raise TypeError(f"module is already an SBP module ({type(module).__name__})")
        if getattr(module, "inplace", False) is True:
            raise ValueError(f"module must not work in place (inplace=True), got {module!r}")
        super().__init__()
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)
        object.__setattr__(self, "module", module)  # not a registered child: no "module." in keys
        # Shared, not copied: the wrapper and the module see the same parameters, buffers and
        # children, under the same names.
        object.__setattr__(self, "_parameters", module._parameters)
        object.__setattr__(self, "_buffers", module._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", module._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", module._modules)
        object.__setattr__(self, "_version", module._version)
        self.channels_last = bool(channels_last)
        self.train(module.training)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("module")
            if module is None:
                raise
            return getattr(module, name)

    def train(self, mode=True):
        super().train(mode)
        self.module.train(mode)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.module._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.module._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self):
        return f"{type(self).__name__}({self.module!r}, {self.extra_repr()})"

    def extra_repr(self):
        cl = ", channels_last=True" if self.channels_last else ""
        return f"keep_ratio={self.keep_ratio}, strategy={self.strategy!r}{cl}"

    def forward(self, x, keep_idx=None):
        if not self._sbp_active() or not isinstance(x, torch.Tensor):
            return self.module(x)
        if self.channels_last:
            if x.dim() != 4:
                return self.module(x)
            b, h, w, c = x.shape
            keep_idx = self._keep_idx(h * w, x.device, keep_idx, layout=(h, w))
            out = tokenwise(self.module, x.reshape(b, h * w, c), keep_idx, dim=1)
            return out.reshape(b, h, w, *out.shape[2:])
        if x.dim() < 2 or (x.dim() == 2 and keep_idx is None):
            return self.module(x)
        keep_idx = self._keep_idx(x.shape[-2], x.device, keep_idx)
        return tokenwise(self.module, x, keep_idx, dim=-2)


class SBPChannelsLastMlp(SBPMlp):
    """SBPMlp over the pixels of a channels-last feature map x [B, H, W, C] (timm's ConvNeXt
    block without conv_mlp): the H*W pixels are the positions, laid out as (H, W) for the keep
    set, and the [B, H*W, C] rows go through sbp_kernels.mlp. Other inputs behave as in SBPMlp
    (positions on dim -2). Same parameters and constructors (from_mlp, from_modules) as SBPMlp."""

    def forward(self, x, keep_idx=None):
        if x.dim() == 4 and self._sbp_active():
            b, h, w, c = x.shape
            keep_idx = self._keep_idx(h * w, x.device, keep_idx, layout=(h, w))
            return super().forward(x.reshape(b, h * w, c), keep_idx).reshape(b, h, w, -1)
        return super().forward(x, keep_idx)
