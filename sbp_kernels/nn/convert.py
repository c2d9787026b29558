"""convert(model): turn a whole model's layers into SBP modules, in place (DESIGN.md 5).

Modules are converted by changing their class (nn/base.swap): every converted module keeps its
identity, Parameter objects, buffers, hooks and state_dict keys and values, so an optimizer built
before the conversion keeps updating the model and checkpoints load both ways. What is converted
is decided by the model-family adapters (sbp_kernels/adapters/, one file per family: timm ViT /
EVA / BEiT / ConvNeXt / Swin, Hugging Face Llama / Qwen / Mistral / Gemma / GPT-2 / BERT / ViT,
PEFT LoRA, and torch.nn's own layers), each recognising its classes and converting what it can
convert faithfully; what stays dense is named in ONE warning per module, with the reason.

Converting again applies the new settings (keep_ratio, strategy, grad_scale, backend) to every SBP
module already there, and converts what was not converted before.

Finally convert installs on the root module a forward pre-hook and an always-called forward hook
that open one step (sbp_kernels.step) around each call of the root, unless a step is already
open (the user's own `with sbp_kernels.step(...)` wins): all SBP layers that see the same position
count in one forward share one keep set, and the next forward draws a fresh one. The families
lay the positions out (a ViT's patch grid, with its class / register tokens always kept) and name
the tokens through which the whole loss flows (a classifier's pooled token), which every keep set
then keeps.
"""
import threading
import warnings

from torch import nn

from .. import keepset
from ..sampling import check_layout
from .base import SBPModule, check_settings, swap
from .recompute import SBPRecompute

__all__ = ["convert", "restore"]


def convert(model, keep_ratio=0.5, strategy="auto", layers=None, *, layout=None, always_keep=(), grad_scale=1.0,
            backend="auto", recompute=False):
    """Converts model's layers to SBP modules in place and returns the model.

    keep_ratio, strategy, grad_scale, backend: the SBP settings of every converted module (see
    SBPModule); strategy "auto" (the default) samples a grid where the family knows the positions'
    layout (images, patches, windows) and uniformly at random over a plain token sequence (a
    language model's tokens: a grid would never keep neighbouring tokens together). layers: None (convert everything convertible) or a callable
    (qualified_name, module) -> bool, asked top-down: a module it accepts is converted with
    everything convertible inside it; a module it rejects is left as it is and its children are
    asked in turn. E.g. `lambda name, m: name.startswith("blocks.") and int(name.split(".")[1]) >= 4`
    converts the blocks 4+ of a timm ViT. layout: the (H, W) / (T, H, W) layout of the positions
    of the step opened at each forward of the root (see sbp_kernels.step); the model families
    know their own (a ViT's patch grid). always_keep: positions (negative ones from the end) kept
    in every keep set, besides those the family keeps (a classifier's pooled token). recompute: the
    blocks of the families that support it (timm ViT / EVA / BEiT / ConvNeXt blocks,
    nn.TransformerEncoderLayer, the Hugging Face decoder and encoder layers) save only their kept
    input rows and attention outputs and recompute the rest on kept rows in backward
    (nn/recompute.py); False turns it off again on a converted model.

    When the root itself is a convertible layer (convert(nn.Linear(...))), it is converted in place
    and returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    settings = check_settings(keep_ratio, strategy, grad_scale, backend)
    if layers is not None and not callable(layers):
        raise TypeError(f"layers must be None or a callable (name, module) -> bool, got {type(layers).__name__}")
    layout = None if layout is None else check_layout(layout)
    always_keep = keepset.check_positions(always_keep, "always_keep")
    from .. import adapters  # the adapters import the nn modules

    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    converter = Converter(settings, layers, recompute)
    converter.visit(model, "", accepted=layers is None)
    for adapter in adapters.ADAPTERS:
        getattr(adapter, "finish", lambda root: None)(model)
    _install_step_hooks(model, adapters.step_options(model, layout, always_keep))
    return model


class Converter:
    """Walks a model top-down and hands each module to the first adapter that claims it."""

    def __init__(self, settings, layers, recompute=False):
        self.settings, self.layers, self.recompute = settings, layers, recompute

    def visit(self, m, name, accepted):
        from .. import adapters

        if not accepted:
            accepted = bool(self.layers(name, m))
        if accepted and isinstance(m, SBPModule):  # converted before: the new settings apply
            m._init_sbp(**self.settings)
        for adapter in adapters.ADAPTERS:
            if adapter.matches(m):
                if accepted:
                    adapter.convert(m, name, self)
                    return
                if getattr(adapter, "opaque", lambda m: False)(m):
                    return
                break
        self.visit_children(m, name, accepted)

    def visit_children(self, m, name, accepted=True):
        for child_name, child in m.named_children():
            self.visit(child, f"{name}.{child_name}" if name else child_name, accepted)

    def swap(self, m, cls):
        """Converts m in place into the SBP class cls (base.swap) with the settings."""
        return swap(m, cls, **self.settings)

    def inner(self):
        """A converter for the parts inside a branch whose output takes the grad_scale (so the
        parts take none: the gradient is scaled once per branch)."""
        return Converter({**self.settings, "grad_scale": 1.0}, self.layers, self.recompute)

    def recompute_block(self, m, spec):
        """Puts block m in recompute mode with its family's spec when convert was asked to (and
        takes it out when converting again without)."""
        if self.recompute:
            self.swap(m, SBPRecompute).recompute_spec = spec
        elif isinstance(m, SBPRecompute):
            m.recompute_spec = None

    def dense(self, name, m, reason):
        """Leaves m dense, saying so once per module."""
        if not m.__dict__.get("_sbp_dense_warned"):
            m.__dict__["_sbp_dense_warned"] = True
            warnings.warn(
                f"sbp_kernels.convert: {name or 'the root'} ({type(m).__name__}) stays dense: {reason}", stacklevel=5
            )


def restore(model):
    """Undoes convert in place: every converted module gets its own class back, a Hugging Face
    model its attention implementation, and the root loses its step hooks. Returns the model."""
    for m in model.modules():
        original = m.__dict__.pop("_sbp_restore_class", None)
        if original is not None:
            m.__class__ = original
        for name in ("keep_ratio", "strategy", "grad_scale", "backend", "_sbp_warned", "_sbp_activation",
                     "recompute_spec", "positions", "rms_form", "mlp_names", "gated_names"):
            m.__dict__.pop(name, None)
        implementation = m.__dict__.pop("_sbp_attn_implementation", None)
        if implementation is not None:
            m.set_attn_implementation(implementation)
    for hooks, kind in ((model._forward_pre_hooks, _OpenStep), (model._forward_hooks, _CloseStep)):
        for key in [k for k, hook in hooks.items() if isinstance(hook, kind)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


# --- one step per forward of the root ----------------------------------------------------------


class _StepScope:
    """Opens a step at the root's forward unless a step is open, closes it after.

    `options(module, args, kwargs)` gives the Step's keyword arguments (layouts, always-kept
    tokens) for the call. Picklable
    and deep-copyable (the per-thread stack of open steps is not copied)."""

    def __init__(self, options):
        self.options = options
        self._local = threading.local()

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.__init__(state["options"])

    def _stack(self):
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def open(self, module, args, kwargs):
        s = keepset.open_step_unless_open(lambda: self.options(module, args, kwargs))
        cm = None
        if s is not None:
            cm = keepset.enter(s)
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

    def __call__(self, module, args, kwargs):
        self.scope.open(module, args, kwargs)


class _CloseStep:
    def __init__(self, scope):
        self.scope = scope

    def __call__(self, module, args, kwargs, output):
        self.scope.close()


def _install_step_hooks(module, options):
    """Adds the step hooks to module, or updates the options of the ones it has."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _OpenStep):
            hook.scope.options = options
            return
    scope = _StepScope(options)
    # prepend / always_call: the step opens before the module's other pre-hooks run and closes
    # even when the forward raises.
    module.register_forward_pre_hook(_OpenStep(scope), prepend=True, with_kwargs=True)
    module.register_forward_hook(_CloseStep(scope), always_call=True, with_kwargs=True)
