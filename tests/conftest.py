"""Shared test setup: Triton runs under its interpreter when there is no GPU, every test is seeded."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel (the package imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
