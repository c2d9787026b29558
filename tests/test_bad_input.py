"""Bad input raises ValueError / TypeError naming the argument (DESIGN.md section 5)."""
import pytest
import torch

import sbp_kernels

KEEP = torch.tensor([0, 2, 5])


def _linear(**over):
    args = dict(x=torch.randn(2, 6, 4), weight=torch.randn(3, 4), bias=torch.randn(3), keep_idx=KEEP)
    args.update(over)
    return sbp_kernels.linear(args["x"], args["weight"], args["bias"], args["keep_idx"], **{
        k: v for k, v in args.items() if k in ("grad_scale", "backend")
    })


@pytest.mark.parametrize(
    "keep_idx, error, match",
    [
        (torch.tensor([0, 2, 6]), ValueError, r"keep_idx values must lie in \[0, 6\)"),
        (torch.tensor([-1, 2]), ValueError, "keep_idx values"),
        (torch.tensor([2, 0, 5]), ValueError, "keep_idx must be sorted"),
        (torch.tensor([0, 2, 2]), ValueError, "without duplicates"),
        (torch.tensor([0.0, 2.0]), TypeError, "keep_idx must have dtype"),
        (torch.tensor([[0, 2], [1, 3]]), ValueError, "per-sample"),
        (torch.tensor(3), ValueError, "keep_idx must be 1-D"),
        (torch.tensor([], dtype=torch.int64), ValueError, "keep_idx must hold between 1 and n=6"),
        (torch.arange(7), ValueError, "keep_idx must hold between 1 and n=6"),
        ([0, 2], TypeError, "keep_idx must be a torch.Tensor"),
        (torch.tensor([0, 2], device="meta"), ValueError, "keep_idx must be on cpu"),
    ],
)
def test_bad_keep_idx(keep_idx, error, match):
    with pytest.raises(error, match=match):
        _linear(keep_idx=keep_idx)


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(x=torch.randn(6)), ValueError, "x must have at least 2 dims"),
        (dict(x=torch.randint(0, 3, (2, 6, 4))), TypeError, "x must have dtype"),
        (dict(weight=torch.randn(3, 5)), ValueError, r"weight must have shape \[c_out, 4\]"),
        (dict(weight=torch.randn(3, 4, 1)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(3, 4, dtype=torch.float64)), TypeError, "weight must have the dtype of x"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
        (dict(bias=torch.randn(3, dtype=torch.float16)), TypeError, "bias must have the dtype of x"),
        (dict(grad_scale=float("nan")), ValueError, "grad_scale must be finite"),
        (dict(grad_scale="2"), TypeError, "grad_scale must be a real number"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_linear_args(over, error, match):
    with pytest.raises(error, match=match):
        _linear(**over)


def test_unavailable_backend_is_refused_with_reason():
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="backend='cuda' cannot run sbp.mlp.*has no cuda kernels"):
        sbp_kernels.mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None, KEEP, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="backend='triton' cannot run sbp.linear on cpu"):
        sbp_kernels.linear(x, torch.randn(3, 4), None, KEEP, backend="triton")


@pytest.mark.parametrize(
    "x, weight, error, match",
    [
        (torch.randn(2, 4, 6), torch.randn(3, 4, 1, 1), ValueError, "x must be 4-D"),
        (torch.randn(2, 4, 2, 3), torch.randn(3, 4, 3, 3), ValueError, r"weight must have shape \[c_out, 4, 1, 1\]"),
        (torch.randn(2, 4, 2, 3), torch.randn(3, 5), ValueError, "weight must have shape"),
    ],
)
def test_bad_pointwise_conv_args(x, weight, error, match):
    with pytest.raises(error, match=match):
        sbp_kernels.pointwise_conv(x, weight, None, KEEP)


def test_pointwise_conv_keep_idx_counts_pixels():
    with pytest.raises(ValueError, match=r"keep_idx values must lie in \[0, 6\)"):
        sbp_kernels.pointwise_conv(torch.randn(1, 4, 2, 3), torch.randn(3, 4), None, torch.tensor([6]))


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(w1=torch.randn(8, 5)), ValueError, r"w1 must have shape \[out, 4\]"),
        (dict(w2=torch.randn(4, 7)), ValueError, r"w2 must have shape \[out, 8\]"),
        (dict(b1=torch.randn(4)), ValueError, r"b1 must have shape \(8,\)"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
    ],
)
def test_bad_mlp_args(over, error, match):
    args = dict(x=torch.randn(2, 6, 4), w1=torch.randn(8, 4), b1=None, w2=torch.randn(4, 8), b2=None)
    activation = over.pop("activation", "gelu")
    args.update(over)
    with pytest.raises(error, match=match):
        sbp_kernels.mlp(*args.values(), KEEP, activation)


def test_direct_op_call_validates_too():
    with pytest.raises(ValueError, match="keep_idx must be sorted"):
        torch.ops.sbp.linear(torch.randn(2, 6, 4), torch.randn(3, 4), None, torch.tensor([3, 1]))


def test_keep_idx_checked_again_after_in_place_change():
    keep = sbp_kernels.sample_keep_indices((6,), 0.5)
    _linear(keep_idx=keep)
    keep[-1] = 9
    with pytest.raises(ValueError, match="keep_idx values"):
        _linear(keep_idx=keep)


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        sbp_kernels.set_backend("numpy")


def test_global_default_is_a_preference(monkeypatch):
    """set_backend names a preference: ops it cannot run fall back (one warning), calls that name
    a backend themselves must get it."""
    monkeypatch.setattr(sbp_kernels.backend, "_default", "cuda")
    monkeypatch.setattr(sbp_kernels.backend, "_warned", set())
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="sbp.mlp: running the torch backend"):
        sbp_kernels.mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None, KEEP).sum().backward()
    assert x.grad.abs().sum() > 0
