"""Helpers every op file shares: autocast of inputs and the backend call table."""
import torch


def autocast_inputs(*tensors):
    """Casts floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops are opaque to autocast, so the Python entry points do what autocast would do for a
    matmul-like op (anything that is not a floating tensor passes through).
    """
    floating = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floating or not torch.is_autocast_enabled(floating[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(floating[0].device.type)
    return tuple(t.to(dtype) if any(t is f for f in floating) else t for t in tensors)


def gather_rows(x, keep_idx, dim, backend=None):
    """The kept positions of x along `dim`, as a compact new tensor (what the backward saves).

    The Triton gather reads strided views (an NCHW image's [B, H*W, C] view) in tiles, coalesced
    on both sides; index_select serves the other backends.
    """
    if backend == "triton":
        from ..triton.linear import gather_rows as triton_gather_rows  # triton is optional

        return triton_gather_rows(x, keep_idx, dim)
    return x.index_select(dim, keep_idx)
