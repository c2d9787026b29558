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
        self._storages[_key(t)] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self):
        return sum(self._storages.values())

    def bytes_excluding(self, tensors):
        """The bytes saved apart from the storages of `tensors` (parameters, which live anyway)."""
        skip = {_key(t) for t in tensors}
        return sum(nbytes for key, nbytes in self._storages.items() if key not in skip)


def _key(t):
    return t.untyped_storage().data_ptr(), t.device


@contextlib.contextmanager
def saved_bytes():
    """with saved_bytes() as saved: loss = model(x) ... saved.bytes -> int."""
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter
