"""Record and replay of a block's forward, for the recompute mode (DESIGN.md 4; nn/recompute.py).

A block in recompute mode runs its forward twice:
- recording, under no_grad: the exact dense forward. The ops keep what the kept rows cannot be
  recomputed from: each attention its o_K and lse_K (its exact forward needs every key), each
  dropout the kept rows of its mask (it consumed the global RNG once, so replaying must not draw).
- replaying, in backward, with grad: the same forward on the kept rows of the block's input only.
  Every position-wise op computes the kept rows exactly as before; each attention returns the
  recorded o_K and, in its backward, runs the kept-token attention backward on the recomputed q_K,
  k_K, v_K; each dropout applies its recorded mask.
Both consume the records in call order. Outside a recording or replay, nothing here is active.
"""
import contextlib
import threading

import torch

_local = threading.local()


class Record:
    """What one block's forward left for its replay, in call order; keep_idx: the kept positions
    (of the n the forward saw)."""

    def __init__(self, keep_idx, n):
        self.keep_idx, self.n = keep_idx, n
        self.items = []
        self.taken = 0

    def put(self, item):
        self.items.append(item)

    def take(self):
        item = self.items[self.taken]
        self.taken += 1
        return item


def mode():
    """"record", "replay" or None."""
    return getattr(_local, "mode", None)


def current():
    return getattr(_local, "record", None)


@contextlib.contextmanager
def _active(record, name):
    saved = (mode(), current())
    _local.mode, _local.record = name, record
    try:
        yield record
    finally:
        _local.mode, _local.record = saved


def recording(record):
    return _active(record, "record")


def replaying(record):
    record.taken = 0
    return _active(record, "replay")


def positions(n, device):
    """The original positions of the n rows an op sees: its own 0..n-1, or while replaying the
    kept positions of the recorded forward (causal masks and windows compare those)."""
    record = current()
    if mode() == "replay" and record.keep_idx.shape[0] == n:
        return record.keep_idx.to(device)
    return torch.arange(n, device=device)


def dropout(x, p, kept_rows):
    """(x with dropout, its keep mask) as torch.native_dropout, the call F.dropout makes; while
    recording, kept_rows(mask) is kept; while replaying, that recorded mask is applied to x (the
    kept rows) instead of drawing one."""
    if mode() == "replay":
        mask = current().take()
        return x * (mask.to(x.dtype) / (1.0 - p)), mask
    out, mask = torch.native_dropout(x, p, True)
    if mode() == "record":
        current().put(kept_rows(mask))
    return out, mask
