"""Backend choice: which kernels run an op ("torch", "triton", "cuda"), per call or by default.

"auto" picks, in this order, the first backend that can run the op on the tensors' device (after
the global default set by set_backend, when there is one):
on CUDA tensors triton, then cuda (the compiled C++/CUDA extension), then torch; on CPU tensors
torch (the reference is the fastest there; the C++ CPU kernels and the Triton interpreter are for
testing). An explicitly named backend that cannot run raises ValueError saying why. When "auto"
has to fall back to torch on a GPU, it warns once per op and reason.
"""
import os
import warnings

import torch

from . import _extension

NAMES = ("auto", "torch", "triton", "cuda")
# Backends with kernels for each op, in "auto" preference order on GPU.
OP_BACKENDS = {
    "linear": ("triton", "cuda", "torch"),
    "pointwise_conv": ("triton", "cuda", "torch"),
    "mlp": ("triton", "torch"),
    "gated_mlp": ("torch",),
    "attention": ("triton", "torch"),
    "layer_norm": ("torch",),
    "rms_norm": ("torch",),
    "dropout": ("torch",),
    "linear_cross_entropy": ("triton", "torch"),
}

try:
    import triton  # noqa: F401

    _triton_error = None
except ImportError as exc:
    _triton_error = f"triton is not installed ({exc})"

_default = "auto"
_warned = set()
_CPU = torch.device("cpu")  # compared with, not asked for its .type (a new string at every call)
_found = {}  # see resolve


def check_name(backend, name="backend"):
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"{name} must be one of {NAMES}, got {backend!r}")


def set_backend(backend):
    """Sets the backend used when a call says backend="auto" (itself "auto" by default)."""
    global _default
    check_name(backend)
    _default = backend


def get_backend():
    return _default


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(backend, op, device):
    """Why `backend` cannot run sbp.<op> on `device`, or None when it can."""
    if backend not in OP_BACKENDS[op]:
        return f"sbp.{op} has no {backend} kernels (it has {', '.join(OP_BACKENDS[op])})"
    if backend == "triton":
        if _triton_error:
            return _triton_error
        if device.type == "cpu" and not triton_interpreted():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"no Triton kernels for {device.type} tensors"
    if backend == "cuda":
        if not _extension.loaded:
            return _extension.error
        if device.type == "cuda" and not _extension.built_with_cuda:
            return "sbp_kernels._C was built without CUDA kernels"
        if device.type not in ("cpu", "cuda"):
            return f"no compiled kernels for {device.type} tensors"
    return None


def resolve(backend, op, device, limits=None):
    """The concrete backend that runs sbp.<op> for a call that asked for `backend`.

    A backend named in the call must run the op or it raises ValueError. The global default (see
    set_backend) is a preference: an op it cannot run goes the "auto" way, with one warning.
    limits(name) -> reason or None lets an op refuse shapes or dtypes a backend does not handle.
    """
    if backend == _default == "auto" and device == _CPU:  # every call asks: the torch backend
        return "torch"
    check_name(backend)
    if backend == "auto" and limits is None:
        # Found once per op, device and what the answer depends on (a GPU step asks at every op).
        key = (op, device, _default, _triton_error, device == _CPU and triton_interpreted())
        found = _found.get(key)
        if found is None:
            found = _found[key] = _resolve(backend, op, device, None)
        return found
    return _resolve(backend, op, device, limits)


def _resolve(backend, op, device, limits):
    if backend != "auto":
        reason = _reason(backend, op, device, limits)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run sbp.{op} on {device} tensors: {reason}")
        return backend
    preferred = () if _default == "auto" else (_default,)
    reasons = []
    for name in preferred + (OP_BACKENDS[op] if device.type == "cuda" else ("torch",)):
        reason = _reason(name, op, device, limits)
        if reason is None:
            if reasons and (name == "torch" or preferred) and (op, tuple(reasons)) not in _warned:
                _warned.add((op, tuple(reasons)))
                warnings.warn(f"sbp.{op}: running the {name} backend ({'; '.join(reasons)})")
            return name
        reasons.append(f"{name}: {reason}")
    raise AssertionError("the torch backend runs every op")


def _reason(backend, op, device, limits):
    return unavailable_reason(backend, op, device) or (limits and limits(backend))


def compiled_autograd_configured():
    """Whether torch.compile runs backward passes through compiled autograd
    (torch._dynamo.config.compiled_autograd), which traces their nodes: the C++ eager faces, whose
    nodes it cannot trace, give way to the Python ones (ops/_common.cpp_eager)."""
    from torch._dynamo import config

    return bool(config.compiled_autograd)


def backends():
    """{backend: reason it is unavailable, or None} for the CUDA device if any, else the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        name: unavailable_reason(name, "linear", device) for name in ("torch", "triton", "cuda")
    }
