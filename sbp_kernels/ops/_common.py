"""Helpers every op file shares: autocast of inputs and the backend call table."""
import torch


def autocast_inputs(*tensors):
    """Casts floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops are opaque to autocast, so the Python entry points do what autocast would do for a
    matmul-like op (None entries pass through).
    """
    ref = next(t for t in tensors if t is not None)
    device_type = ref.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def gather_rows(x, keep_idx, dim):
    """The kept positions of x along `dim`, as a compact new tensor (what the backward saves)."""
    return x.index_select(dim, keep_idx)
