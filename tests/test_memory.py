"""Saved-for-backward bytes (DESIGN.md section 7): SBP layers save about r of the dense layer."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels.memory import saved_bytes


def _ratio(dense_fn, sbp_fn, *inputs):
    inputs = [t.requires_grad_() for t in inputs]
    with saved_bytes() as dense:
        dense_fn(*inputs)
    with saved_bytes() as sbp:
        sbp_fn(*inputs)
    return sbp.bytes / dense.bytes


@pytest.mark.parametrize("r, limit", [(0.5, 0.55), (0.25, 0.3)])
def test_linear_saves_kept_rows_only(r, limit):
    keep = sbp_kernels.sample_keep_indices((196,), r)
    ratio = _ratio(F.linear, lambda x, w: sbp_kernels.linear(x, w, None, keep), torch.randn(8, 196, 64), torch.randn(64, 64))
    assert ratio <= limit


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_saves_kept_pixels_only(channels_last):
    keep = sbp_kernels.sample_keep_indices((16, 16), 0.5)
    x = torch.randn(4, 32, 16, 16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ratio = _ratio(F.conv2d, lambda x, w: sbp_kernels.pointwise_conv(x, w, None, keep), x, torch.randn(32, 32, 1, 1))
    assert ratio <= 0.55


def test_mlp_saves_kept_hidden_only():
    keep = sbp_kernels.sample_keep_indices((128,), 0.5)

    def dense(x, w1, w2):
        return F.linear(F.gelu(F.linear(x, w1)), w2)

    def sbp(x, w1, w2):
        return sbp_kernels.mlp(x, w1, None, w2, None, keep)

    ratio = _ratio(dense, sbp, torch.randn(4, 128, 32), torch.randn(128, 32), torch.randn(32, 128))
    assert ratio <= 0.55


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(10, 10, requires_grad=True)
    with saved_bytes() as saved:
        (x * x).sum()  # mul saves x twice (self and other): one storage
    assert saved.bytes == 400


def test_bytes_excluding_parameters():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with saved_bytes() as saved:
        lin(x)
    assert saved.bytes == 3 * 8 * 4 + 4 * 8 * 4  # x and the weight
    assert saved.bytes_excluding(lin.parameters()) == 3 * 8 * 4
