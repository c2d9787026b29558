"""sbp.linear and sbp.pointwise_conv on the CPU backends vs dense autograd (DESIGN.md 3.1, 3.2)."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import CPU_BACKENDS, assert_close, masked_dense_grads, sbp_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _keep(n, r):
    return sbp_kernels.sample_keep_indices((n,), r, "random", torch.Generator().manual_seed(n))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead, n, c_in, c_out, r",
    [((2,), 37, 16, 24, 0.5), ((2, 3), 10, 8, 5, 0.25), ((), 7, 3, 4, 0.5), ((1,), 1, 4, 4, 1.0), ((3,), 33, 5, 7, 0.01)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_masked_dense(backend, dtype, lead, n, c_in, c_out, r, with_bias):
    x = torch.randn(*lead, n, c_in, dtype=dtype)
    w = torch.randn(c_out, c_in, dtype=dtype) / c_in**0.5
    b = torch.randn(c_out, dtype=dtype) if with_bias else None
    dy = torch.randn(*lead, n, c_out, dtype=dtype)
    keep = _keep(n, r)
    out, grads = sbp_grads(lambda *t: sbp_kernels.linear(*t, keep, 0.7, backend=backend), [x, w, b], dy)
    ref_out, ref_grads = masked_dense_grads(F.linear, [x, w, b], dy, keep, -2, 0.7)
    assert torch.equal(out, F.linear(x, w, b))  # forward is the dense op, same numbers
    for g, ref in zip(grads, ref_grads):
        if ref is not None:
            assert_close(g, ref, dtype)
    assert not grads[0].index_fill(-2, keep, 0).any()  # dropped rows get exactly zero


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_r1_equals_dense_autograd(backend):
    x = torch.randn(4, 19, 12, requires_grad=True)
    lin = torch.nn.Linear(12, 9)
    dy = torch.randn(4, 19, 9)
    F.linear(x, lin.weight, lin.bias).backward(dy)
    dense = [x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    keep = sbp_kernels.sample_keep_indices((19,), 1.0)
    sbp_kernels.linear(x, lin.weight, lin.bias, keep, backend=backend).backward(dy)
    for t, ref in zip((x, lin.weight, lin.bias), dense):
        torch.testing.assert_close(t.grad, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("weight_2d", [False, True])
@pytest.mark.parametrize("shape, c_out, r", [((2, 6, 5, 7), 4, 0.5), ((1, 3, 4, 4), 5, 0.25), ((2, 4, 1, 1), 3, 1.0)])
def test_pointwise_conv_matches_masked_dense(backend, dtype, channels_last, weight_2d, shape, c_out, r):
    batch, c_in, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).to(memory_format=fmt)
    weight = torch.randn(c_out, c_in, 1, 1, dtype=dtype) / c_in**0.5
    weight = weight.flatten(1) if weight_2d else weight
    b = torch.randn(c_out, dtype=dtype)
    dy = torch.randn(batch, c_out, h, w, dtype=dtype).to(memory_format=fmt)
    keep = sbp_kernels.sample_keep_indices((h, w), r, "grid", torch.Generator().manual_seed(1))
    out, grads = sbp_grads(lambda *t: sbp_kernels.pointwise_conv(*t, keep, backend=backend), [x, weight, b], dy)

    def dense(x, weight, b):
        return F.conv2d(x, weight.view(c_out, c_in, 1, 1), b).flatten(2)

    _, ref_grads = masked_dense_grads(dense, [x, weight, b], dy.flatten(2), keep, -1)
    assert torch.equal(out, F.conv2d(x, weight.view(c_out, c_in, 1, 1), b))
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, dtype)
    assert grads[1].shape == weight.shape
    # grad_x keeps x's memory format (no full-size permute on the way back).
    if channels_last and h * w > 1:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    else:
        assert grads[0].is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_float64_gradcheck(backend):
    """gradcheck at r=1 in float64: the analytic backward is the true derivative."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    keep = torch.arange(5)
    assert torch.autograd.gradcheck(lambda *t: sbp_kernels.linear(*t, keep, backend=backend), (x, w, b))


def test_int32_keep_idx():
    x = torch.randn(2, 9, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    keep = torch.tensor([1, 4, 8], dtype=torch.int32)
    sbp_kernels.linear(x, w, None, keep).sum().backward()
    assert torch.equal(x.grad[:, [1, 4, 8]], w.sum(0).expand(2, 3, 4))
    assert not x.grad[:, [0, 2, 3, 5, 6, 7]].any()
