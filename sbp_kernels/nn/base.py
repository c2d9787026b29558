"""SBPModule: the keep-set settings and logic every SBP module shares, and the class swap that
converts a module in place.

SBPModule is a mixin, listed before the torch module it extends (`class SBPLinear(SBPModule,
nn.Linear)`), so parameters, state_dict and repr stay those of the torch module. It holds

- keep_ratio (default 0.5): fraction of positions whose gradient is kept, in (0, 1];
- strategy (default "grid"; convert's default "auto"): the sampler, one of sampling.SETTING_STRATEGIES;
- grad_scale (default 1.0): multiplies every gradient the op produces (1 / keep_ratio makes the
  estimate unbiased);
- backend (default "auto"): passed to the ops (see sbp_kernels.backend).

Keep sets come from `keepset.keep_idx_for`, so all SBP layers that see the same position count
inside one `keepset.step()` share one keep set (DESIGN.md section 2).

`swap(module, cls)` converts a module IN PLACE by changing its class to an SBP class (cls itself
when the module is exactly cls's torch base, else a subclass of both cls and the module's own
class, made once per pair): the module keeps its identity, parameters, buffers, hooks and
state_dict, `isinstance(module, TheLibraryClass)` stays true, and `restore(model)` (convert.py)
undoes it.
"""
import warnings

import torch

from .. import keepset, replay
from ..backend import check_name
from ..sampling import SETTING_STRATEGIES, check_ratio
from ..validation import check_grad_scale, check_keep_idx

SETTINGS = ("keep_ratio", "strategy", "grad_scale", "backend")


def check_settings(keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto"):
    """Validates SBP settings (ValueError / TypeError naming the argument); returns them as a dict."""
    check_ratio(keep_ratio)
    if strategy not in SETTING_STRATEGIES:
        raise ValueError(f"strategy must be one of {SETTING_STRATEGIES}, got {strategy!r}")
    check_grad_scale(grad_scale)
    check_name(backend)
    return {"keep_ratio": keep_ratio, "strategy": strategy, "grad_scale": float(grad_scale), "backend": backend}


class SBPModule:
    """Mixin with the SBP settings and `_keep_idx`; call `_init_sbp` in the subclass __init__."""

    # Class-level defaults, so a subclass works even before _init_sbp runs.
    keep_ratio = 0.5
    strategy = "grid"
    grad_scale = 1.0
    backend = "auto"

    def _init_sbp(self, keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto"):
        """Validates and sets the SBP settings (ValueError / TypeError naming the argument)."""
        self.__dict__.update(check_settings(keep_ratio, strategy, grad_scale, backend))

    def sbp_settings(self):
        """The settings as keyword arguments, e.g. to build another module with the same ones."""
        return {name: getattr(self, name) for name in SETTINGS}

    def _sbp_active(self):
        """True when gradients are sub-sampled: training mode with grad enabled. In eval mode or
        under no_grad / inference_mode the module is exactly its dense counterpart. A training-mode
        forward without grad inside a step may be a reentrant checkpoint's, which recomputes it in
        backward: the step is remembered for that (keepset.remember_for_replay)."""
        if not self.training:
            return False
        if torch.is_grad_enabled() or replay.mode() == "record":  # a recompute-mode block records
            return True
        if keepset.current() is not None:
            keepset.remember_for_replay()
        return False

    def _keep_idx(self, n, device, keep_idx=None, layout=None):
        """keep_idx when given (its values are checked), else the step's keep set for n positions
        (laid out as `layout` when the module knows it, e.g. a conv's (H, W))."""
        if keep_idx is not None:
            check_keep_idx(keep_idx, n, device)
            return keep_idx
        return keepset.keep_idx_for(n, device, self.keep_ratio, self.strategy, layout)

    def _warn_fallback(self, reason):
        """One warning per module and reason when a call has to run the dense path."""
        warned = self.__dict__.setdefault("_sbp_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(
                f"{type(self).__name__}: {reason}; running the dense forward and backward (no SBP)", stacklevel=3
            )

    def __reduce_ex__(self, protocol):
        # Classes made by sbp_class cannot be found by name: pickle them as (cls, base).
        for (cls, base), made in _classes.items():
            if made is type(self):
                return _rebuild, (cls, base), self.__dict__
        return super().__reduce_ex__(protocol)

    def extra_repr(self):
        base = super().extra_repr()
        return (base + ", " if base else "") + f"keep_ratio={self.keep_ratio}, strategy={self.strategy!r}"


_classes = {}


def sbp_class(cls, base):
    """The SBP class of a `base` module: cls itself when base is cls's own torch base (or cls),
    else a class deriving from both (cls's forward, base's everything else), made once."""
    if issubclass(base, cls):
        return base
    if base in cls.__bases__:
        return cls
    key = (cls, base)
    if key not in _classes:
        name = base.__name__ if base.__name__.startswith("SBP") else f"SBP{base.__name__}"
        _classes[key] = type(name, (cls, base), {"__module__": cls.__module__})
    return _classes[key]


def _rebuild(cls, base):
    """Unpickles a module of a class made by sbp_class (its state follows, set by __setstate__)."""
    new_cls = sbp_class(cls, base)
    return new_cls.__new__(new_cls)


def swap(module, cls, **settings):
    """Converts `module` in place into an SBP module of class cls (see sbp_class); returns it.
    Settings: keep_ratio, strategy, grad_scale, backend."""
    base = type(module)
    new_cls = sbp_class(cls, base)
    if new_cls is not base:
        module.__dict__.setdefault("_sbp_restore_class", base)
        module.__class__ = new_cls
    module._init_sbp(**settings)
    return module
