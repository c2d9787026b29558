"""convert(model): turn a whole model's layers into SBP modules, in place, checkpoint-compatibly.

Every replacement SHARES the replaced module's Parameter objects and keeps its state_dict keys and
values, so an optimizer built before the conversion keeps updating the model and checkpoints load
both ways. What is converted (each when `layers` accepts it, see convert):

- nn.TransformerEncoderLayer -> SBPTransformerEncoderLayer (the whole layer: norms, attention,
  feed-forward, one keep set);
- nn.MultiheadAttention -> SBPMultiheadAttention (its out_proj is never called as a module, so
  convert does not look inside an nn.MultiheadAttention it leaves dense);
- nn.Linear -> SBPLinear (positions on dim -2 of its input);
- a 1x1, stride-1 nn.Conv2d -> SBPConv1x1 (other convs stay as they are);
- timm, found by duck typing (class name and attributes; timm is never imported):
  - ViT `Block` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2): attn ->
    SBPSelfAttention, mlp -> SBPMlp, norm1 / norm2 / ls1 / ls2 -> SBPTokenwise (same state_dict
    keys); anything it cannot convert as a whole is converted piecewise;
  - `Attention` (qkv, proj, num_heads) -> SBPSelfAttention; `Mlp` (fc1, act, fc2) -> SBPMlp;
  - `ConvNeXtBlock` (conv_dw, norm, mlp, drop_path; not conv_mlp): norm -> SBPTokenwise and
    mlp -> SBPChannelsLastMlp over the H*W pixels of its NHWC input, laid out (H, W). conv_dw
    (7x7 depthwise) and the layer-scale product with gamma stay dense. With conv_mlp, its 1x1
    convs become SBPConv1x1.

A converted ViT Block or ConvNeXt block also opens a step around its own forward when none is
open, so that used alone it still shares one keep set among its parts.

Finally convert installs on the root module a forward pre-hook and an always-called forward hook
that open `sbp_kernels.step(layout=layout)` around each call of the root, unless a step is already
open (the user's own `with sbp_kernels.step(...)` wins): all SBP layers that see the same position
count in one forward share one keep set, and the next forward draws a fresh one.
"""
import numbers
import threading
import warnings

from torch import nn

from .. import keepset
from ..backend import check_name
from ..sampling import STRATEGIES, _check_ratio
from ..validation import check_grad_scale
from .attention import SBPMultiheadAttention, SBPSelfAttention
from .base import SBPModule
from .linear import SBPConv1x1, SBPLinear, SBPMlp, _check_pointwise
from .tokenwise import SBPChannelsLastMlp, SBPTokenwise
from .transformer import SBPTransformerEncoderLayer

__all__ = ["convert"]

_VIT_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_CONVNEXT_ATTRS = ("conv_dw", "norm", "mlp", "drop_path")


def convert(model, keep_ratio=0.5, strategy="grid", layers=None, *, layout=None, grad_scale=1.0, backend="auto"):
    """Converts model's layers to SBP modules in place and returns the model.

    keep_ratio, strategy, grad_scale, backend: the SBP settings of every converted module (see
    SBPModule). layers: None (convert everything convertible) or a callable
    (qualified_name, module) -> bool, asked top-down: a module it accepts is converted, or, when
    it is not convertible itself (a container, a custom block), everything convertible inside it
    is; a module it rejects is left as it is and its children are asked in turn. E.g.
    `lambda name, m: name.startswith("layers.") and int(name.split(".")[1]) >= 2` converts whole
    layers 2+ of an nn.TransformerEncoder. SBP modules already there are skipped, so convert is
    idempotent. layout: the (H, W) / (T, H, W) layout of the step opened at each forward of the
    root (see sbp_kernels.step: extra leading tokens, such as a class token, are always kept);
    for a timm-like VisionTransformer (patch_embed.grid_size) it defaults to that grid.

    When the root itself is convertible (convert(nn.Linear(...))), the returned module is its SBP
    replacement (sharing its parameters); otherwise it is `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_ratio(keep_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_grad_scale(grad_scale)
    check_name(backend)
    if layers is not None and not callable(layers):
        raise TypeError(f"layers must be None or a callable (name, module) -> bool, got {type(layers).__name__}")
    if layout is None:
        layout = _vit_grid(model)
    layout = _check_layout(layout)
    converter = _Converter(
        {"keep_ratio": keep_ratio, "strategy": strategy, "grad_scale": grad_scale, "backend": backend}, layers
    )
    model = converter.visit(model, "", accepted=layers is None)
    _install_step_hooks(model, layout)
    return model


def _check_layout(layout):
    if layout is None:
        return None
    if (
        not isinstance(layout, (tuple, list))
        or not 1 <= len(layout) <= 3
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in layout)
    ):
        raise ValueError(f"layout must be None or a tuple of 1 to 3 positive ints, got {layout!r}")
    return tuple(int(s) for s in layout)


def _vit_grid(model):
    """patch_embed.grid_size of a timm-like VisionTransformer, else None."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    try:
        return _check_layout(tuple(grid)) if grid is not None else None
    except (TypeError, ValueError):
        return None


# --- recognising modules ---------------------------------------------------------------------


def _is_plain(m, cls):
    return isinstance(m, cls) and type(m).forward is cls.forward


def _duck(m, class_name, attrs):
    return type(m).__name__ == class_name and all(hasattr(m, a) for a in attrs)


def _is_timm_attention(m):
    return (
        _duck(m, "Attention", ("qkv", "proj", "num_heads"))
        and isinstance(m.qkv, nn.Linear)
        and isinstance(m.proj, nn.Linear)
    )


def _is_timm_mlp(m):
    return _duck(m, "Mlp", ("fc1", "act", "fc2")) and isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)


def _kind(m):
    """What convert makes of m as a whole, or None."""
    if isinstance(m, nn.TransformerEncoderLayer):
        return "encoder_layer" if all(
            getattr(type(m), f) is getattr(nn.TransformerEncoderLayer, f) for f in ("forward", "_sa_block", "_ff_block")
        ) else None
    if _is_plain(m, nn.MultiheadAttention):
        return "mha"
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:  # NonDynamicallyQuantizableLinear too
        return "linear"
    if _is_plain(m, nn.Conv2d):
        try:
            _check_pointwise(m)
        except ValueError:
            return None
        return "conv1x1"
    if _duck(m, "Block", _VIT_BLOCK_ATTRS):
        return "vit_block"
    if _duck(m, "ConvNeXtBlock", _CONVNEXT_ATTRS):
        return "convnext_block"
    if _is_timm_attention(m):
        return "timm_attention"
    if _is_timm_mlp(m):
        return "timm_mlp"
    return None


class _Converter:
    def __init__(self, settings, layers):
        self.settings, self.layers = settings, layers

    def visit(self, m, name, accepted):
        """m converted (a new module, or m changed in place), its subtree visited as needed."""
        if isinstance(m, SBPModule):
            return m
        if not accepted:
            accepted = bool(self.layers(name, m))
        kind = _kind(m)
        if accepted and kind is not None:
            new = getattr(self, "_" + kind)(m, name)
            if new is not None:
                return new
        if kind == "mha":  # its submodules are not called as modules: nothing to do inside
            return m
        self.visit_children(m, name, accepted)
        return m

    def visit_children(self, m, name, accepted):
        for child_name, child in list(m.named_children()):
            new = self.visit(child, f"{name}.{child_name}" if name else child_name, accepted)
            if new is not child:
                setattr(m, child_name, new)

    def _warn(self, name, m, err):
        warnings.warn(
            f"sbp_kernels.convert: {name or 'the root'} ({type(m).__name__}) is not converted as a whole "
            f"({err}); converting its parts",
            stacklevel=4,
        )

    # One method per kind: the replacement, or None to fall back to visiting the children.
    def _encoder_layer(self, m, name):
        return SBPTransformerEncoderLayer.from_module(m, **self.settings)

    def _mha(self, m, name):
        return SBPMultiheadAttention.from_module(m, **self.settings)

    def _linear(self, m, name):
        return SBPLinear.from_linear(m, **self.settings)

    def _conv1x1(self, m, name):
        return SBPConv1x1.from_conv(m, **self.settings)

    def _timm_attention(self, m, name):
        try:
            return SBPSelfAttention.from_module(m, **self.settings)
        except (TypeError, ValueError) as err:
            self._warn(name, m, err)
            return None

    def _timm_mlp(self, m, name, cls=SBPMlp):
        try:
            return cls.from_mlp(m, **self.settings)
        except (TypeError, ValueError) as err:
            self._warn(name, m, err)
            return None

    def _tokenwise(self, block, attr, channels_last=False):
        sub = getattr(block, attr)
        if isinstance(sub, (nn.Identity, SBPModule)) or not isinstance(sub, nn.Module):
            return
        if getattr(sub, "inplace", False) is True:  # e.g. LayerScale(inplace=True): stays dense
            return
        settings = {"keep_ratio": self.settings["keep_ratio"], "strategy": self.settings["strategy"]}
        setattr(block, attr, SBPTokenwise(sub, channels_last=channels_last, **settings))

    def _vit_block(self, m, name):
        for attr, is_kind, convert_sub in (
            ("attn", _is_timm_attention, self._timm_attention),
            ("mlp", _is_timm_mlp, self._timm_mlp),
        ):
            sub = getattr(m, attr)
            new = convert_sub(sub, f"{name}.{attr}") if is_kind(sub) else None
            if new is not None:
                setattr(m, attr, new)
            elif not isinstance(sub, SBPModule):
                self.visit_children(sub, f"{name}.{attr}", True)
        for attr in ("norm1", "ls1", "norm2", "ls2"):
            self._tokenwise(m, attr)
        _install_step_hooks(m, None)
        return m

    def _convnext_block(self, m, name):
        if getattr(m, "use_conv_mlp", False):  # NCHW norm and 1x1-conv MLP: the generic rules
            return None
        if _is_timm_mlp(m.mlp):
            new = self._timm_mlp(m.mlp, f"{name}.mlp", cls=SBPChannelsLastMlp)
            if new is not None:
                m.mlp = new
        elif not isinstance(m.mlp, SBPModule):
            warnings.warn(
                f"sbp_kernels.convert: {name}.mlp ({type(m.mlp).__name__}) of a ConvNeXtBlock is not a timm "
                f"Mlp; it stays dense",
                stacklevel=4,
            )
        self._tokenwise(m, "norm", channels_last=True)
        _install_step_hooks(m, None)
        return m


# --- one step per forward of the root ----------------------------------------------------------


class _StepScope:
    """Opens keepset.step(layout=...) at the root's forward unless a step is open, closes it after.

    Picklable and deep-copyable (the per-thread stack of open steps is not copied)."""

    def __init__(self, layout):
        self.layout = layout
        self._local = threading.local()

    def __getstate__(self):
        return {"layout": self.layout}

    def __setstate__(self, state):
        self.__init__(state["layout"])

    def _stack(self):
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def open(self):
        cm = None
        if keepset.current() is None:
            cm = keepset.step(layout=self.layout)
            cm.__enter__()
        self._stack().append(cm)

    def close(self):
        stack = self._stack()
        cm = stack.pop() if stack else None
        if cm is not None:
            cm.__exit__(None, None, None)


class _OpenStep:
    def __init__(self, scope):
        self.scope = scope

    def __call__(self, module, args):
        self.scope.open()


class _CloseStep:
    def __init__(self, scope):
        self.scope = scope

    def __call__(self, module, args, output):
        self.scope.close()


def _install_step_hooks(module, layout):
    """Adds the step hooks to module, or updates the layout of the ones it has."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _OpenStep):
            hook.scope.layout = layout
            return
    scope = _StepScope(layout)
    # prepend / always_call: the step opens before the module's other pre-hooks run and closes
    # even when the forward raises.
    module.register_forward_pre_hook(_OpenStep(scope), prepend=True)
    module.register_forward_hook(_CloseStep(scope), always_call=True)
