"""Guarded load of the compiled extension `sbp_kernels._C` (schemas, C++ CPU and CUDA kernels).

Without it the package still works with the `torch` and `triton` backends; `error` says why it is
missing, and `sbp_kernels.backends()` reports it.
"""
import importlib.util
import warnings

import torch

_C = None
if importlib.util.find_spec(f"{__package__}._C") is None:
    error = "extension sbp_kernels._C is not built (see README: pip install --no-build-isolation .)"
else:
    try:
        from . import _C
    except (ImportError, OSError) as exc:  # built against an ABI-incompatible torch, say
        error = f"extension sbp_kernels._C failed to load ({type(exc).__name__}: {exc})"
if _C is not None:
    error = None
    # Compare release numbers: CMake builds record "2.13.0" where pip builds record "2.13.0+cpu".
    if _C.built_with_torch.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"sbp_kernels._C was built against torch {_C.built_with_torch} but torch "
            f"{torch.__version__} is installed; rebuild with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` if it misbehaves",
            RuntimeWarning,
            stacklevel=2,
        )

loaded = _C is not None
built_with_cuda = bool(_C is not None and _C.built_with_cuda)
