"""The C++ extension: schemas equal to the Python copy, build info, backends() report."""
import os
import subprocess
import sys

import pytest
import torch

import sbp_kernels
from sbp_kernels import _extension
from sbp_kernels._schemas import SCHEMAS


def test_backends_report_reasons():
    report = sbp_kernels.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] is None
    assert all(reason is None or isinstance(reason, str) for reason in report.values())
    if not torch.cuda.is_available():  # on CPU the compiled backend is the C++ CPU kernels
        assert (report["cuda"] is None) == _extension.loaded


def test_every_public_schema_is_declared():
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.sbp, name).default
        parsed = torch._C.parse_schema("sbp::" + schema)
        assert str(op._schema) == str(parsed), name


def test_extension_build_info():
    if not _extension.loaded:
        if os.environ.get("SBP_REQUIRE_EXTENSION") == "1":  # set by CI, where it must have built
            pytest.fail(f"C++ extension required but not loaded: {_extension.error}")
        pytest.skip(f"C++ extension not built: {_extension.error}")
    assert _extension._C.built_with_torch.split("+")[0] == torch.__version__.split("+")[0]
    if torch.cuda.is_available():
        assert _extension.built_with_cuda
    assert hasattr(torch.ops.sbp, "kept_rows_backward")


def test_package_works_without_the_extension():
    """With _C missing, import still works and the Python copy of the schemas serves the ops."""
    code = """
import sys, torch
sys.modules["sbp_kernels._C"] = None  # as if it was never built
import sbp_kernels
reason = sbp_kernels.backends()["cuda"]
assert reason is not None and "not built" in reason, reason
x = torch.randn(2, 5, 3, requires_grad=True)
sbp_kernels.linear(x, torch.randn(4, 3), None, torch.tensor([1, 3])).sum().backward()
assert x.grad[:, [0, 2, 4]].abs().sum() == 0 and x.grad[:, [1, 3]].abs().sum() > 0
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_api_names():
    for name in ("linear", "pointwise_conv", "attention", "mlp", "gated_mlp", "layer_norm", "rms_norm", "dropout",
                 "linear_cross_entropy", "tokenwise", "convert", "step", "sample_keep_indices", "backends",
                 "set_backend"):
        assert callable(getattr(sbp_kernels, name)), name
    for name in sbp_kernels.__all__:
        assert hasattr(sbp_kernels, name), name


def test_schemas_in_python_and_cpp_are_the_same_strings():
    """csrc/registration.cpp declares each schema of _schemas.py, character for character
    (test_every_public_schema_is_declared compares the parsed schemas of a loaded extension; this
    holds without a build too)."""
    import pathlib
    import re

    source = (pathlib.Path(__file__).parents[1] / "csrc" / "registration.cpp").read_text()
    declared = {}
    for match in re.finditer(r'm\.def\(((?:\s*"(?:[^"\\]|\\.)*")+)\);', source):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1))).replace('\\"', '"')
        declared[text.split("(", 1)[0]] = text
    assert set(SCHEMAS) <= set(declared)
    for name, schema in SCHEMAS.items():
        assert declared[name] == schema, name
    # Extension-only ops: the cuda backend's kept-rows backward, the C++ keep_idx check, the torch
    # backend's C++ eager faces.
    assert set(declared) - set(SCHEMAS) == {
        "kept_rows_backward", "check_keep_idx", "linear_eager", "layer_norm_eager", "mlp_eager", "attention_eager",
    }
