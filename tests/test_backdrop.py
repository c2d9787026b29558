"""Backdrop and AugmentedDropout: identity / dropout forward, masked and rescaled backward."""
import math

import pytest
import torch

from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn import AugmentedDropout, Backdrop
from sbp_kernels.nn.backdrop import pack_bits, unpack_bits


def _backward(layer, x, grad_out=None):
    x = x.detach().requires_grad_()
    y = layer(x)
    grad_out = torch.randn_like(x) if grad_out is None else grad_out
    y.backward(grad_out)
    return y, x.grad, grad_out


def test_backdrop_forward_is_identity():
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    for layer in (Backdrop(0.5), Backdrop(0.5, patch_size=2), Backdrop(0.0)):
        assert torch.equal(layer(x), x)
        assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_backdrop_sample_mask(dim):
    layer = Backdrop(0.5, dim=dim)
    x = torch.randn(16, 12, 10)
    _, grad, grad_out = _backward(layer, x)
    other = tuple(d for d in range(3) if d != dim % 3)
    kept = grad.ne(0).any(other)  # per mask element
    n, n_kept = kept.numel(), int(kept.sum())
    assert 0 < n_kept < n
    shape = [1, 1, 1]
    shape[dim] = n
    mask = kept.view(shape)
    # zero exactly on the dropped samples, upstream * N / |b| on the kept ones
    torch.testing.assert_close(grad, grad_out * mask * (n / n_kept), rtol=1e-6, atol=0)
    assert not grad[~mask.expand_as(grad)].any()


def test_backdrop_generator_reproducible_and_unbiased():
    x = torch.randn(32, 4)
    grads = []
    for _ in range(2):
        layer = Backdrop(0.3, generator=torch.Generator().manual_seed(7))
        grads.append(_backward(layer, x, torch.ones_like(x))[1])
    assert torch.equal(grads[0], grads[1])
    # the N/|b| factor preserves the l1 norm of the (all-ones) gradient exactly
    assert math.isclose(float(grads[0].sum()), x.numel(), rel_tol=1e-5)
    # every sample is kept with probability 1 - p
    layer = Backdrop(0.3)
    kept = torch.stack([_backward(layer, x, torch.ones_like(x))[1][:, 0] != 0 for _ in range(200)])
    assert abs(float(kept.float().mean()) - 0.7) < 0.03


def test_backdrop_all_dropped_gives_zero_gradient():
    layer = Backdrop(0.99, generator=torch.Generator().manual_seed(0))
    _, grad, _ = _backward(layer, torch.randn(2, 3))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("patch_size", [4, (4, 5), (3, 13)])
def test_backdrop_patch_mask(patch_size):
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    b, c, h, w = 4, 3, 10, 13  # not multiples of the patch: edge patches are partial
    nph, npw = -(-h // ph), -(-w // pw)
    layer = Backdrop(0.5, patch_size=patch_size)
    grad_out = torch.rand(b, c, h, w) + 0.5  # nonzero everywhere
    _, grad, _ = _backward(layer, torch.randn(b, c, h, w), grad_out)
    nonzero = grad != 0
    n = b * nph * npw
    kept = torch.zeros(b, nph, npw, dtype=torch.bool)
    for i in range(nph):
        for j in range(npw):
            block = nonzero[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].flatten(1)
            # one decision per (sample, patch), the same over channels and within the patch
            assert torch.equal(block.all(1), block.any(1))
            kept[:, i, j] = block[:, 0]
    n_kept = int(kept.sum())
    assert 0 < n_kept < n
    mask = kept.repeat_interleave(ph, 1).repeat_interleave(pw, 2)[:, None, :h, :w]
    # one constant scale N/|b| on every kept element
    torch.testing.assert_close(grad, grad_out * mask * (n / n_kept), rtol=1e-6, atol=0)


def test_backdrop_patch_channels_last_and_3d():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    _, grad, grad_out = _backward(Backdrop(0.5, patch_size=4), x)
    assert torch.equal(grad == 0, (grad == 0).all(1, keepdim=True).expand_as(grad))
    x3 = torch.randn(5, 8, 8)  # [S, H, W]: no channel dim
    _, grad, _ = _backward(Backdrop(0.5, patch_size=(2, 4)), x3)
    assert grad.shape == x3.shape


def test_backdrop_p0_eval_and_no_grad_are_identity_backward():
    x = torch.randn(6, 4, 4)
    for layer in (Backdrop(0.0), Backdrop(0.5).eval(), Backdrop(0.0, patch_size=2)):
        _, grad, grad_out = _backward(layer, x)
        assert torch.equal(grad, grad_out)
    with torch.no_grad():
        assert Backdrop(0.5)(x) is x


def test_backdrop_saves_only_the_mask():
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    for layer, mask_bytes in ((Backdrop(0.5), 8), (Backdrop(0.5, patch_size=5), 8 * 3 * 3)):
        with saved_bytes() as saved:
            y = layer(x)
        assert saved.bytes == mask_bytes  # bool mask: 1 byte per sample / (sample, patch)
        y.sum().backward()


def test_backdrop_bad_arguments():
    for p in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="p must"):
            Backdrop(p)
    for patch_size in (0, (2,), (2, 0), 2.0):
        with pytest.raises(ValueError, match="patch_size"):
            Backdrop(0.5, patch_size=patch_size)
    with pytest.raises(TypeError, match="generator"):
        Backdrop(0.5, generator=0)
    x = torch.randn(4, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="dim"):
        Backdrop(0.5, dim=3)(x)
    with pytest.raises(ValueError, match="patch_size"):
        Backdrop(0.5, dim=-1, patch_size=2)(x)
    with pytest.raises(ValueError, match="patch_size"):
        Backdrop(0.5, patch_size=2)(torch.randn(8, 8, requires_grad=True))


def test_augmented_dropout_forward_is_dropout():
    p_f = 0.3
    layer = AugmentedDropout(p_f, 0.5)
    x = torch.randn(200, 1000, requires_grad=True)
    y = layer(x)
    eps_f = y != 0
    torch.testing.assert_close(y, x * eps_f / (1 - p_f), rtol=1e-6, atol=0)
    assert abs(1 - float(eps_f.float().mean()) - p_f) < 0.005
    with torch.no_grad():  # no graph: the same forward dropout
        y = layer(x)
    torch.testing.assert_close(y, x * (y != 0) / (1 - p_f), rtol=1e-6, atol=0)
    assert abs(1 - float((y != 0).float().mean()) - p_f) < 0.005


@pytest.mark.parametrize("p_f, p_b", [(0.3, 0.2), (0.0, 0.4), (0.5, 0.0)])
def test_augmented_dropout_backward_mask(p_f, p_b):
    layer = AugmentedDropout(p_f, p_b)
    x = torch.randn(200, 1000)
    y, grad, grad_out = _backward(layer, x)
    dropped_f = y == 0
    assert not grad[dropped_f].any()  # zero wherever the forward dropped
    rest = grad[~dropped_f]
    # about p_b of the rest dropped too (std of the fraction ~0.0015 here)
    assert abs(float((rest == 0).float().mean()) - p_b) < 0.01
    kept = grad != 0
    scale = 1 / ((1 - p_f) * (1 - p_b))
    torch.testing.assert_close(grad[kept], grad_out[kept] * scale, rtol=1e-6, atol=0)
    # unbiased for the dropout gradient: E[grad] = grad_out * eps_f / (1 - p_f)
    ratio = (grad / grad_out)[~dropped_f].mean() * (1 - p_f)
    assert abs(float(ratio) - 1) < 0.02


def test_augmented_dropout_eval_identity_and_dtypes():
    x = torch.randn(4, 5, requires_grad=True)
    assert AugmentedDropout(0.5, 0.5).eval()(x) is x
    assert AugmentedDropout(0.0, 0.0)(x) is x
    xb = torch.randn(64, 33, dtype=torch.bfloat16)
    y, grad, _ = _backward(AugmentedDropout(0.25, 0.25), xb)
    assert y.dtype == grad.dtype == torch.bfloat16
    assert not grad[y == 0].any()


def test_augmented_dropout_saves_packed_bits():
    x = torch.randn(1000, 37, requires_grad=True)  # 37000 elements, not a multiple of 8 * 64
    with saved_bytes() as saved:
        y = AugmentedDropout(0.1, 0.1)(x)
    assert saved.bytes == math.ceil(x.numel() / 8)
    y.sum().backward()


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 11)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_augmented_dropout_generator_reproducible():
    x = torch.randn(50, 20)
    layers = [AugmentedDropout(0.3, 0.3, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    runs = [_backward(layer, x, torch.ones_like(x)) for layer in layers]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_augmented_dropout_bad_arguments():
    for p in (1.0, -0.1, float("nan"), True, None):
        with pytest.raises(ValueError, match="p_forward"):
            AugmentedDropout(p, 0.1)
        with pytest.raises(ValueError, match="p_backward"):
            AugmentedDropout(0.1, p)
