"""sbp.mlp and sbp.tokenwise vs dense autograd (DESIGN.md 3.4, 3.5)."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import assert_close, masked_dense_grads, sbp_grads
from sbp_kernels.reference import ACTIVATIONS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dense_mlp(activation):
    act = ACTIVATIONS[activation][0]
    return lambda x, w1, b1, w2, b2: F.linear(act(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("lead, n, c_in, hidden, c_out, r", [((2,), 21, 8, 32, 8, 0.5), ((2, 2), 5, 4, 16, 6, 0.25), ((), 1, 3, 8, 3, 1.0)])
def test_mlp_matches_masked_dense(dtype, activation, lead, n, c_in, hidden, c_out, r):
    x = torch.randn(*lead, n, c_in, dtype=dtype)
    w1 = torch.randn(hidden, c_in, dtype=dtype) / c_in**0.5
    b1 = torch.randn(hidden, dtype=dtype)
    w2 = torch.randn(c_out, hidden, dtype=dtype) / hidden**0.5
    b2 = torch.randn(c_out, dtype=dtype)
    dy = torch.randn(*lead, n, c_out, dtype=dtype)
    keep = sbp_kernels.sample_keep_indices((n,), r, "grid", torch.Generator().manual_seed(3))
    inputs = [x, w1, b1, w2, b2]
    out, grads = sbp_grads(lambda *t: sbp_kernels.mlp(*t, keep, activation, 2.0, backend="torch"), inputs, dy)
    _, ref_grads = masked_dense_grads(dense_mlp(activation), inputs, dy, keep, -2, 2.0)
    assert torch.equal(out, dense_mlp(activation)(*inputs))
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, dtype)


def test_mlp_without_biases_r1_equals_dense():
    x = torch.randn(3, 11, 6, requires_grad=True)
    w1 = torch.randn(24, 6, requires_grad=True)
    w2 = torch.randn(6, 24, requires_grad=True)
    dy = torch.randn(3, 11, 6)
    dense_mlp("gelu")(x, w1, None, w2, None).backward(dy)
    dense = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    sbp_kernels.mlp(x, w1, None, w2, None, torch.arange(11)).backward(dy)
    for t, ref in zip((x, w1, w2), dense):
        torch.testing.assert_close(t.grad, ref, atol=1e-5, rtol=1e-5)


def test_mlp_hidden_output_is_not_differentiable():
    x = torch.randn(2, 4, 3, requires_grad=True)
    w1, w2 = torch.randn(8, 3), torch.randn(3, 8)
    out, hidden_kept = torch.ops.sbp.mlp_forward(x, w1, None, w2, None, torch.tensor([0, 2]), "relu", 1.0, "torch")
    assert out.requires_grad and not hidden_kept.requires_grad
    assert hidden_kept.shape == (2, 2, 8)


@pytest.mark.parametrize("r", [1.0, 0.5, 0.25])
def test_tokenwise_layernorm(r):
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 30, 16)
    dy = torch.randn(3, 30, 16)
    keep = sbp_kernels.sample_keep_indices((30,), r)
    out, grads = sbp_grads(lambda x: sbp_kernels.tokenwise(norm, x, keep), [x], dy)
    assert torch.equal(out, norm(x))
    _, ref_grads = masked_dense_grads(
        lambda x: F.layer_norm(x, (16,), norm.weight.double(), norm.bias.double()), [x], dy, keep, -2
    )
    assert_close(grads[0], ref_grads[0], torch.float32)
    norm.zero_grad()
    sbp_kernels.tokenwise(norm, x, keep).backward(dy)
    weight_grad = norm.weight.grad.clone()
    norm.zero_grad()
    norm(x).backward(dy * torch.zeros(30, 1).index_fill(0, keep, 1))
    torch.testing.assert_close(weight_grad, norm.weight.grad, atol=1e-5, rtol=1e-5)


def test_tokenwise_saves_only_kept_rows():
    block = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(4, 256, 32, requires_grad=True)
    keep = sbp_kernels.sample_keep_indices((256,), 0.5)
    with sbp_kernels.memory.saved_bytes() as dense:
        block(x)
    with sbp_kernels.memory.saved_bytes() as sbp:
        sbp_kernels.tokenwise(block, x, keep)
    params = sum(p.numel() * 4 for p in block.parameters())
    assert sbp.bytes - params <= 0.55 * (dense.bytes - params)


def test_tokenwise_no_grad_and_bad_input():
    with torch.no_grad():
        out = sbp_kernels.tokenwise(torch.tanh, torch.ones(2, 3), torch.tensor([1]))
    assert torch.equal(out, torch.tanh(torch.ones(2, 3)))
    with pytest.raises(TypeError, match="fn"):
        sbp_kernels.tokenwise(3, torch.ones(2, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="dim"):
        sbp_kernels.tokenwise(torch.tanh, torch.ones(2, 3), torch.tensor([1]), dim=5)
    with pytest.raises(ValueError, match="keep_idx"):
        sbp_kernels.tokenwise(torch.tanh, torch.ones(2, 3), torch.tensor([3]), dim=-2)
    with pytest.raises(ValueError, match="backend must be one of"):
        sbp_kernels.tokenwise(torch.tanh, torch.ones(2, 3), torch.tensor([1]), backend="fast")
