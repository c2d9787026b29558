"""SBPModule: the keep-set settings and logic every SBP module shares.

A mixin, listed before the torch module it extends (`class SBPLinear(SBPModule, nn.Linear)`), so
parameters, state_dict and repr stay those of the torch module. It holds

- keep_ratio (default 0.5): fraction of positions whose gradient is kept, in (0, 1];
- strategy (default "grid"): the sampler, one of sampling.STRATEGIES;
- grad_scale (default 1.0): multiplies every gradient the op produces (1 / keep_ratio makes the
  estimate unbiased);
- backend (default "auto"): passed to the ops (see sbp_kernels.backend).

Keep sets come from `keepset.keep_idx_for`, so all SBP layers that see the same position count
inside one `keepset.step()` share one keep set (DESIGN.md section 2).
"""
import warnings

import torch

from .. import keepset
from ..backend import check_name
from ..sampling import STRATEGIES, _check_ratio
from ..validation import check_grad_scale


class SBPModule:
    """Mixin with the SBP settings and `_keep_idx`; call `_init_sbp` in the subclass __init__."""

    # Class-level defaults, so a subclass works even before _init_sbp runs.
    keep_ratio = 0.5
    strategy = "grid"
    grad_scale = 1.0
    backend = "auto"

    def _init_sbp(self, keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto"):
        """Validates and sets the SBP settings (ValueError / TypeError naming the argument)."""
        _check_ratio(keep_ratio)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        check_grad_scale(grad_scale)
        check_name(backend)
        self.keep_ratio = keep_ratio
        self.strategy = strategy
        self.grad_scale = float(grad_scale)
        self.backend = backend

    def sbp_settings(self):
        """The settings as keyword arguments, e.g. to build another module with the same ones."""
        return {
            "keep_ratio": self.keep_ratio,
            "strategy": self.strategy,
            "grad_scale": self.grad_scale,
            "backend": self.backend,
        }

    def _sbp_active(self):
        """True when gradients are sub-sampled: training mode with grad enabled. In eval mode or
        under no_grad / inference_mode the module is exactly its dense counterpart."""
        return self.training and torch.is_grad_enabled()

    def _keep_idx(self, n, device, keep_idx=None, layout=None):
        """keep_idx when given (the op validates it), else the step's keep set for n positions
        (laid out as `layout` when the module knows it, e.g. a conv's (H, W))."""
        if keep_idx is not None:
            return keep_idx
        return keepset.keep_idx_for(n, device, self.keep_ratio, self.strategy, layout)

    def _warn_fallback(self, reason):
        """One warning per module and reason when a call has to run the dense path."""
        warned = self.__dict__.setdefault("_sbp_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"{type(self).__name__}: {reason}; running the dense forward and backward (no SBP)", stacklevel=3)

    def extra_repr(self):
        base = super().extra_repr()
        return (base + ", " if base else "") + f"keep_ratio={self.keep_ratio}, strategy={self.strategy!r}"
