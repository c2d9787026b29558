"""Bytes saved for backward, measured with saved_tensors_hooks (DESIGN.md section 7).

Device independent and exact: the sum of the unique storages that autograd keeps for backward.
"""
import contextlib

import torch


class SavedBytes:
    """Counts the storages saved for backward while the context is active (see saved_bytes)."""

    def __init__(self):
        self._storages = {}

    def _pack(self, t):
        storage = t.untyped_storage()
        self._storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    @property
    def bytes(self):
        return sum(self._storages.values())


@contextlib.contextmanager
def saved_bytes():
    """with saved_bytes() as saved: loss = model(x) ... saved.bytes -> int."""
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter
