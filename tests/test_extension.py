"""The C++ extension: schemas equal to the Python copy, build info, backends() report."""
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


@pytest.mark.skipif(not _extension.loaded, reason=f"C++ extension not built: {_extension.error}")
def test_extension_build_info():
    assert _extension._C.built_with_torch.split("+")[0] == torch.__version__.split("+")[0]
    if torch.cuda.is_available():
        assert _extension.built_with_cuda
    assert hasattr(torch.ops.sbp, "kept_rows_backward")
