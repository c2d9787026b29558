"""Shared test setup: Triton runs under its interpreter when there is no GPU, every test is seeded;
`require` imports the optional model libraries the adapters are tested against."""
import importlib
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


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run as fast on one, and much faster on a busy
    machine (modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def require(name):
    """The model library `name` (timm, transformers, peft: the test extra), imported.

    Call it at the top of a test module (`timm = require("timm")`). Where the library is missing the
    module's tests skip, saying why; with SBP_REQUIRE_MODEL_LIBS=1 (CI) a missing library is an
    error instead, so the tests against real models cannot be skipped silently.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("SBP_REQUIRE_MODEL_LIBS", "") not in ("", "0"):
            raise ImportError(
                f"{name} is required by the tests (SBP_REQUIRE_MODEL_LIBS is set) but does not import: {e}"
            ) from e
        pytest.skip(f"{name} is not installed (pip install '.[test]'): {e}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _seed():
    """Every test seeded; the package's keep-set generator follows torch's seed again afterwards
    (a test that called sbp_kernels.manual_seed does not fix the keep sets of the next ones)."""
    from sbp_kernels import sampling

    torch.manual_seed(0)
    yield
    sampling._package_generator.follows = None
