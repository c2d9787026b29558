"""sbp.dropout (DESIGN.md 3.5): position-wise dropout drawing F.dropout's mask for the same seed;
the gradient is dy * mask / (1 - p) on kept rows and 0 on dropped rows."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import dropped, keep_set, masked_dense_grads
from sbp_kernels.memory import saved_bytes


def _mask(shape, dtype, p, seed):
    """The keep mask F.dropout draws for a tensor of this shape and dtype from `seed`."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape, dtype=dtype), p) != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, r", [((2, 21, 16), 0.5), ((2, 3, 7, 5), 0.25), ((9, 8), 1.0), ((3, 40, 6), 0.01)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_same_mask_as_f_dropout_and_kept_rows_gradient(dtype, shape, r, p):
    n = shape[-2]
    x = torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    keep = keep_set(n, r, seed=n)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = sbp_kernels.dropout(leaf, keep, p)
    torch.manual_seed(5)
    assert torch.equal(out, F.dropout(x, p))  # the same mask, the same numbers
    out.backward(dy)
    mask = _mask(shape, dtype, p, 5)
    assert 0 < mask.sum() < mask.numel() or mask.numel() < 20
    _, ref = masked_dense_grads(lambda x: x * mask / (1 - p), [x], dy, keep, -2)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
    torch.testing.assert_close(leaf.grad.double(), ref[0], atol=tol, rtol=tol)
    # dropped rows: exactly 0; kept rows: what the dense dropout's backward gives (exactly in
    # float32 / float64: the CPU half-precision kernel rounds its vectorised body and its tail
    # differently, so a compact copy of the rows may round a few elements the other way)
    assert not leaf.grad[..., dropped(keep, n), :].any()
    dense = x.clone().requires_grad_()
    torch.manual_seed(5)
    F.dropout(dense, p).backward(dy)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(leaf.grad[..., keep, :], dense.grad[..., keep, :])
    else:
        torch.testing.assert_close(leaf.grad[..., keep, :], dense.grad[..., keep, :], atol=1e-2, rtol=1e-2)


def test_returns_kept_rows_of_the_mask_as_bool():
    x = torch.randn(2, 9, 4, requires_grad=True)
    keep = torch.tensor([0, 4, 8])
    torch.manual_seed(3)
    out, mask_kept = torch.ops.sbp.dropout_forward(x, keep, 0.4, "torch")
    assert out.requires_grad and not mask_kept.requires_grad
    assert mask_kept.dtype == torch.bool and torch.equal(mask_kept, _mask((2, 9, 4), torch.float32, 0.4, 3)[:, keep])


def test_without_grad_draws_the_same_mask():
    x = torch.randn(3, 10, 6)
    keep = torch.tensor([2, 5])
    torch.manual_seed(8)
    with torch.no_grad():
        out = sbp_kernels.dropout(x, keep, 0.3)
    torch.manual_seed(8)
    assert torch.equal(out, F.dropout(x, 0.3))
    torch.manual_seed(8)
    with torch.inference_mode():
        assert torch.equal(sbp_kernels.dropout(x, keep, 0.3), out)


def test_p_zero_is_the_identity():
    x = torch.randn(2, 5, 3, requires_grad=True)
    keep = torch.tensor([1, 3])
    rng = torch.get_rng_state()
    out = sbp_kernels.dropout(x, keep, 0.0)
    assert torch.equal(out, x)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 5, 3))  # p = 0 is no SBP op: dense gradient


def test_saves_the_kept_mask_only():
    x = torch.randn(4, 64, 32, requires_grad=True)
    keep = keep_set(64, 0.25)
    with saved_bytes() as saved:
        sbp_kernels.dropout(x, keep, 0.1)
    # the bool mask of the kept rows (1 byte per element) and the keep set
    assert saved.bytes == 4 * keep.numel() * 32 + keep.numel() * 8


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_outputs(requires_grad):
    x = torch.empty(2, 5, 4, device="meta", requires_grad=requires_grad)
    out = sbp_kernels.dropout(x, torch.tensor([0, 3], device="meta"), 0.5)
    assert out.device.type == "meta" and out.shape == (2, 5, 4)


@pytest.mark.parametrize("keep_dtype", [torch.int64, torch.int32])
def test_keep_idx_from_inference_mode_and_int32(keep_dtype):
    with torch.inference_mode():
        keep = torch.tensor([1, 2], dtype=keep_dtype)
    x = torch.randn(2, 4, 3, requires_grad=True)
    torch.manual_seed(1)
    sbp_kernels.dropout(x, keep, 0.5).backward(torch.ones(2, 4, 3))
    mask = _mask((2, 4, 3), torch.float32, 0.5, 1)
    expected = torch.zeros(2, 4, 3)
    expected[:, 1:3] = 2.0 * mask[:, 1:3]
    assert torch.equal(x.grad, expected)
