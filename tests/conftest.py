"""Shared test setup: Triton runs under its interpreter when there is no GPU, every test is seeded."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel (the package imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per Triton kernel instead of autotuning over six (sbp_kernels/triton/gemm.py,
    # autotuning): a fresh GPU machine compiles every dtype / head dim / causal / mode
    # specialization the tests reach, and six configs of each (fp32 FMA tiles take seconds apiece)
    # would not fit a test run's time limit. The benchmarks autotune and check their results;
    # SBP_TRITON_AUTOTUNE=1 runs the tests over the full config lists.
    os.environ.setdefault("SBP_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
