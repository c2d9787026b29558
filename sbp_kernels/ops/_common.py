"""Helpers every op file shares: autocast of inputs, the eager / traced split, kept-row gathers.

Each op has one path, python API -> op -> backend kernel, with two faces of the op:
- eagerly, a torch.autograd.Function whose setup_context and backward ARE the autograd formula
  registered for the `torch.library` op (one copy of the code): the dispatcher's Python custom-op
  machinery costs about three times an autograd.Function per call, which an eager step on a GPU
  would wait for (DESIGN.md 3, issue of host overhead);
- under torch.compile / export, the `torch.ops.sbp.*` op itself, which is what the compiler,
  export and opcheck see.
Without grad (no_grad, inference_mode, no input needing a gradient) every op is its dense forward.
"""
import weakref

import torch

from .. import _extension, keepset
from .. import backend as _backend

from ..validation import values_unavailable

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def autocast_inputs(*tensors):
    """Casts floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops are opaque to autocast, so the Python entry points do what autocast would do for a
    matmul-like op (anything that is not a floating tensor passes through; meta tensors and other
    devices without autocast pass through).
    """
    if not torch._C._is_any_autocast_enabled():  # the usual case, answered without a device lookup
        return tensors
    floating = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floating or not autocast_enabled(floating[0]):
        return tensors
    dtype = torch.get_autocast_dtype(floating[0].device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def eager(formula):
    """The eager autograd.Function of an op from its formula class (forward without ctx,
    setup_context, backward: what `torch.library.register_autograd` is given): forward then
    setup_context in one classic forward(ctx, ...). torch.autograd.Function binds the default
    arguments of a setup_context-style forward with inspect.signature at every call, which costs
    more than the rest of a small op's host work; the classic form does not."""
    forward, setup_context = formula.forward, formula.setup_context

    def forward_with_ctx(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    body = {"forward": staticmethod(forward_with_ctx), "backward": staticmethod(formula.backward),
            "__doc__": formula.__doc__, "__module__": formula.__module__}
    return type(formula.__name__, (torch.autograd.Function,), body)


def autocast_enabled(t):
    """Whether autocast is on for t's device (meta tensors and devices without autocast: no)."""
    if not torch._C._is_any_autocast_enabled():
        return False
    return t.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(t.device.type)


def needs_graph(*tensors):
    """Whether an op call records autograd: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(generator): every op call asks
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def cpp_eager(backend):
    """Whether an op may run its C++ face (csrc/eager.cpp): the extension is built and the torch
    backend runs it, unless compiled autograd is configured (asked once per step: reading torch's
    config costs a microsecond): compiled autograd traces the backward nodes it meets, and the
    faces' hand-made nodes are opaque to it, where the Python faces' autograd.Functions are not.
    (A recompute-mode replay runs the C++ faces too, on its kept rows; its attention and dropout
    records are taken before, in Python.)"""
    if backend != "torch" or not _extension.loaded:
        return False
    step = keepset.current()
    return not (step.compiled_autograd if step is not None else _backend.compiled_autograd_configured())


def cpp_face(name):
    """The op of a C++ face (csrc/eager.cpp), looked up once (a torch.ops attribute chain costs
    about 0.15 us a call); None without the extension."""
    return getattr(torch.ops.sbp, name).default if _extension.loaded else None


def kept_rows_for_cpp(x, keep_idx, dim, needed):
    """The kept rows an op's C++ face saves, shared through the step (keepset.Step.gather) with
    every other op reading x; None (the C++ face gathers) when they are not needed or no step is
    open."""
    step = keepset.current()
    if not needed or step is None:
        return None
    return step.gather(x, keep_idx, dim, _index_select)


def traced():
    """Under torch.compile / torch.export: call the torch.library op."""
    return torch.compiler.is_compiling()


def in_memory_order(fn, x, *args):
    """fn(x, *args) for a position-wise fn, computed in x's memory order: for a [..., B, n, c]
    view of a position-first [..., n, B, c] tensor (nn.TransformerEncoderLayer with
    batch_first=False, nn.MultiheadAttention) the result is again such a view, laid out as the
    dense layer's result is, so a dropout after it draws the same mask for the same seed."""
    if x.dim() >= 3 and not x.is_contiguous():
        flipped = x.transpose(-2, -3)
        if flipped.is_contiguous():
            return fn(flipped, *args).transpose(-2, -3)
    return fn(x, *args)


_own_copies = weakref.WeakKeyDictionary()  # step -> {id(caller's keep_idx): (weak ref to it, copy)}


def own_keep_idx(keep_idx):
    """The keep_idx a public function hands its op: a private copy of the caller's validated one.

    The op saves it for backward and gathers with it, and the caller may change its tensor in
    place afterwards by means autograd does not see (`.numpy()`, `.data`, DLPack) or may have
    made it under torch.inference_mode() (autograd cannot save such a tensor): the copy is
    untouched by either. Inside a step, calls passing the same tensor with the same values get
    the same copy, so the step still shares their gathers (keepset.Step.gather). Without grad
    nothing is saved. Under torch.compile the copy is an op of the graph (is_inference() cannot be
    traced); inside a step, meta / fake tensors pass through as they are (no values to compare).
    """
    if not torch.is_grad_enabled():
        return keep_idx
    step = keepset.current()
    if step is None or torch.compiler.is_compiling():
        return keep_idx.clone()
    if values_unavailable(keep_idx):
        return keep_idx
    copies = _own_copies.setdefault(step, {})
    hit = copies.get(id(keep_idx))
    if hit is not None and hit[0]() is keep_idx and torch.equal(hit[1], keep_idx):
        return hit[1]
    copy = keep_idx.clone()
    copies[id(keep_idx)] = (weakref.ref(keep_idx), copy)
    return copy


def gather_rows(x, keep_idx, dim, backend=None):
    """The kept positions of x along `dim`, as a compact new tensor (what the backward saves).

    Inside a step the gather is shared by every op that reads the same tensor (keepset.Step.gather).
    The Triton gather reads strided views (an NCHW image's [B, H*W, C] view) in tiles, coalesced
    on both sides; index_select serves the other backends.
    """
    fn = _triton_gather if backend == "triton" else _index_select
    step = keepset.current()
    if step is None:
        return fn(x, keep_idx, dim)
    return step.gather(x, keep_idx, dim, fn)


def _index_select(x, keep_idx, dim):
    # Saved data, never a graph input (also when taken outside an autograd.Function's forward).
    return x.detach().index_select(dim, keep_idx)


def _triton_gather(x, keep_idx, dim):
    from ..triton.linear import gather_rows as triton_gather_rows  # triton is optional

    return triton_gather_rows(x, keep_idx, dim)



def scale_grad(t, scale):
    """t in the forward; its gradient times `scale` in the backward (the identity for 1.0)."""
    if scale == 1.0 or not isinstance(t, torch.Tensor) or not t.requires_grad:
        return t
    return _ScaleGrad.apply(t, scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None
