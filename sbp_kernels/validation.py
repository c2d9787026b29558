"""Argument checks shared by every public function (DESIGN.md section 7).

Errors name the argument and what was expected. Checks on tensor metadata run everywhere (eager,
fake tensors under torch.compile). The values of a keep_idx given by the caller are checked at
every call of a public function: nothing remembers that a tensor was valid, since its values can
change without a trace (`.numpy()`, `.data`, DLPack). Keep sets that the package draws itself
(the step's, see keepset.py) are valid by construction and private to the package: modules pass
them to the ops' internal entry points, which skip the value check. `trust` marks them too, for
the ops' kernels (`check_in_kernel`): a compiled graph runs the kernels of its sbp ops at every step
with the step's keep sets as inputs, and on a GPU each read is a copy to the host and a wait for the
device. Public functions read every keep_idx they are given, the package's own included. Values are
not read while tracing, for meta / fake tensors, or while a CUDA graph is being captured.
"""
import math
import numbers
import threading
import weakref

import torch

from . import _extension

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(t, name, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_like(t, ref, name, ref_name):
    """t must share ref's dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_shape(t, shape, name):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_bias(bias, n_out, x, name="bias"):
    """bias: None, or a [n_out] tensor with x's dtype and device."""
    if bias is not None:
        check_tensor(bias, name)
        check_like(bias, x, name, "x")
        check_shape(bias, (n_out,), name)


def is_real(v):
    """A real number and not a bool (a float or int answered without the numbers.Real ABC check:
    every public call asks)."""
    return type(v) in (float, int) or (not isinstance(v, bool) and isinstance(v, numbers.Real))


def check_grad_scale(grad_scale):
    if not is_real(grad_scale):
        raise TypeError(f"grad_scale must be a real number, got {type(grad_scale).__name__}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")


def check_keep_meta(keep_idx, n, device, name="keep_idx"):
    """keep_idx: a 1-D int64/int32 tensor of 1 to n positions on `device` (no value is read)."""
    if not isinstance(keep_idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of positions, got {type(keep_idx).__name__}")
    if keep_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int64 or torch.int32, got {keep_idx.dtype}")
    if keep_idx.dim() == 2:
        raise ValueError(
            f"{name} must be 1-D: per-sample [batch, n_keep] keep sets are not supported yet, "
            f"got shape {tuple(keep_idx.shape)}"
        )
    if keep_idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(keep_idx.shape)}")
    if keep_idx.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {keep_idx.device}")
    if not 1 <= keep_idx.numel() <= n:
        raise ValueError(f"{name} must hold between 1 and n={n} positions, got {keep_idx.numel()}")


_trusted = {}  # id(keep_idx) -> (weak ref to it, its version, its largest position): see trust


class _Kernel(threading.local):
    checking = False  # an op's kernel is checking its arguments (check_in_kernel)


_kernel = _Kernel()


def trust(keep_idx, last):
    """Marks a keep set the package made, knows valid (sorted unique positions from 0 up to `last`)
    and keeps to itself (a step's draw, or its copy of the caller's keep set): an op kernel's check
    for any n > last passes it unread while its version is unchanged. Nothing while tracing.
    Returns keep_idx."""
    if not torch.compiler.is_compiling():
        key = id(keep_idx)
        _trusted[key] = (weakref.ref(keep_idx, lambda _: _trusted.pop(key, None)), keep_idx._version, last)
    return keep_idx


def check_in_kernel(check, *args):
    """check(*args), an op's argument check, run by the op's kernel (torch.ops.sbp.*: what a
    compiled graph runs at every step): keep sets the package trusts pass unread there."""
    _kernel.checking = True
    try:
        check(*args)
    finally:
        _kernel.checking = False


def trust_if_valid(keep_idx):
    """trust(keep_idx) when its values are sorted unique positions from 0 up (one read); otherwise
    the checks that name what is wrong see it. Nothing where values cannot be read. Returns keep_idx."""
    if keep_idx.dtype not in INDEX_DTYPES or keep_idx.dim() != 1 or values_unavailable(keep_idx):
        return keep_idx
    values = keep_idx.detach().cpu()
    if values.numel() and values[0] >= 0 and bool((values[1:] > values[:-1]).all()):
        trust(keep_idx, int(values[-1]))
    return keep_idx


def check_keep_idx(keep_idx, n, device, name="keep_idx"):
    """keep_idx: 1-D int64/int32 tensor of sorted unique positions in [0, n) on `device`."""
    check_keep_meta(keep_idx, n, device, name)
    if values_unavailable(keep_idx):
        return
    trusted = _trusted.get(id(keep_idx)) if _kernel.checking else None
    if trusted is not None:
        ref, version, last = trusted
        if ref() is keep_idx and version == keep_idx._version and last < n:
            return
    check_values(keep_idx, n, name)


def check_values(keep_idx, n, name="keep_idx"):
    """Sorted unique positions in [0, n): reads the values (on a GPU, a copy to the host)."""
    if _extension.loaded:  # the same check in one C++ pass (csrc/keep_idx.cpp): a public call's host cost
        torch.ops.sbp.check_keep_idx(keep_idx, n, name)
        return
    first, last = int(keep_idx[0]), int(keep_idx[-1])
    if first < 0 or last >= n:
        raise ValueError(f"{name} values must lie in [0, {n}), got range [{first}, {last}]")
    if keep_idx.numel() > 1 and not bool((keep_idx[1:] > keep_idx[:-1]).all()):
        raise ValueError(f"{name} must be sorted in increasing order without duplicates")


def values_unavailable(t):
    """True where a tensor's values cannot (or must not) be read: tracing, meta / fake tensors,
    CUDA graph capture."""
    if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def is_fake(t):
    """torch's is_fake, answered in a fraction of its time for a plain tensor (every eager call
    asks): neither a tensor subclass nor a functional wrapper can hide a fake one."""
    if type(t) is torch.Tensor and not torch._is_functional_tensor(t):
        return torch._C._is_fake_tensor(t)
    return torch._subclasses.fake_tensor.is_fake(t)
