"""torch.library.opcheck and torch.compile on every sbp op (CPU, torch and C++ backends)."""
import pytest
import torch

import sbp_kernels
from helpers import CPU_BACKENDS


def _samples(requires_grad):
    def t(*shape):
        return torch.randn(*shape, requires_grad=requires_grad)

    keep = torch.tensor([0, 2, 3, 6])
    return {
        "linear": [(t(2, 7, 5), t(4, 5), t(4), keep, 0.5, "torch"), (t(7, 5), t(4, 5), None, keep)],
        "pointwise_conv": [
            (t(2, 5, 2, 4), t(3, 5, 1, 1), t(3), keep, 1.0, "torch"),
            (t(2, 5, 2, 4).to(memory_format=torch.channels_last), t(3, 5), None, keep),
        ],
        "mlp_forward": [(t(2, 7, 5), t(8, 5), t(8), t(3, 8), t(3), keep, "gelu", 1.0, "torch")],
        "mlp": [(t(2, 7, 5), t(8, 5), None, t(3, 8), None, keep)],
    }


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("op", ["linear", "pointwise_conv", "mlp_forward", "mlp"])
def test_opcheck(op, requires_grad):
    for args in _samples(requires_grad)[op]:
        torch.library.opcheck(getattr(torch.ops.sbp, op).default, args)


@pytest.mark.skipif(sbp_kernels.backends()["cuda"] is not None, reason="C++ extension not built")
def test_opcheck_compiled_kept_rows_backward():
    grad_out = torch.randn(2, 9, 4).transpose(0, 0)
    x_kept = torch.randn(2, 3, 5)
    for channels_first in (False, True):
        args = (grad_out, x_kept, torch.randn(4, 5), torch.tensor([1, 4, 8]), 2.0, channels_first)
        torch.library.opcheck(torch.ops.sbp.kept_rows_backward.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    keep = torch.tensor([1, 2, 5, 7])
    w_in, w1, w2 = torch.randn(16, 8), torch.randn(32, 16), torch.randn(16, 32)
    conv_w = torch.randn(6, 16, 1, 1)

    def model(x, w_in, w1, w2, conv_w):
        h = sbp_kernels.linear(x, w_in, None, keep, backend=backend)
        h = sbp_kernels.tokenwise(torch.nn.functional.silu, h, keep)
        mlp_backend = "torch" if backend == "cuda" else backend  # mlp has no C++ kernels
        h = sbp_kernels.mlp(h, w1, None, w2, None, keep, "gelu_tanh", backend=mlp_backend)
        img = h.transpose(1, 2).reshape(2, 16, 2, 4)
        return sbp_kernels.pointwise_conv(img, conv_w, None, keep, backend=backend).square().sum()

    inputs = [torch.randn(2, 8, 8), w_in, w1, w2, conv_w]
    grads = {}
    for name, fn in (("eager", model), ("compiled", torch.compile(model, fullgraph=True, backend="aot_eager"))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(*leaves).backward()
        grads[name] = [t.grad for t in leaves]
    for eager, compiled in zip(grads["eager"], grads["compiled"]):
        torch.testing.assert_close(compiled, eager)


def test_compile_inductor_linear():
    keep = torch.tensor([0, 3])
    lin = torch.nn.Linear(4, 3)

    def fn(x):
        return sbp_kernels.linear(x, lin.weight, lin.bias, keep).sum()

    x = torch.randn(2, 5, 4, requires_grad=True)
    torch.compile(fn, fullgraph=True)(x).backward()
    expected = torch.zeros(2, 5, 4)
    expected[:, [0, 3]] = lin.weight.sum(0)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_matches_plain_backward(use_reentrant):
    """torch.utils.checkpoint recomputes the forward in backward: the ops' saved kept rows come
    out the same and so do the gradients."""
    keep = torch.tensor([0, 3, 4, 6])
    w_in, w1, w2 = torch.randn(16, 8), torch.randn(32, 16), torch.randn(16, 32)

    def block(x, w_in, w1, w2):
        h = sbp_kernels.linear(x, w_in, None, keep)
        h = sbp_kernels.mlp(h, w1, None, w2, None, keep)
        q = h.view(2, 7, 2, 8).transpose(1, 2)
        return sbp_kernels.attention(q, q, q, keep).square().sum()

    inputs = [torch.randn(2, 7, 8), w_in, w1, w2]
    grads = []
    for run in (block, lambda *t: torch.utils.checkpoint.checkpoint(block, *t, use_reentrant=use_reentrant)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        run(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)
