"""torch.library.opcheck on every sbp op, torch.compile(fullgraph=True) of every public op against
eager, and torch.utils.checkpoint (CPU: torch and C++ backends)."""
import pytest
import torch

import sbp_kernels
from helpers import CPU_BACKENDS, compile_matches_eager
from sbp_kernels import _extension

KEEP = torch.tensor([0, 2, 3, 6])


CPP = "cuda" if _extension.loaded else "torch"  # the C++ CPU kernels where built


def _samples(requires_grad):
    """op -> argument tuples (n = 7 positions); every floating tensor takes grads when
    requires_grad."""

    def t(*shape, **kwargs):
        return torch.randn(*shape, **kwargs).requires_grad_(requires_grad)

    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, :2] = False
    pad[1, :] = False  # a sample without any real token
    target = torch.randint(0, 11, (2, 7))
    target[0, 1] = -100
    return {
        "linear": [(t(2, 7, 5), t(4, 5), t(4), KEEP.int(), 0.5, "torch"), (t(7, 5), t(4, 5), None, KEEP, 1.0, CPP)],
        "pointwise_conv": [
            (t(2, 5, 2, 4), t(3, 5, 1, 1), t(3), KEEP, 2.0, "torch"),
            (t(2, 5, 2, 4).to(memory_format=torch.channels_last), t(3, 5), None, KEEP, 1.0, CPP),
        ],
        "mlp": [(t(2, 7, 5), t(8, 5), t(8), t(3, 8), t(3), KEEP, "gelu_tanh", 2.0, 0.3, "torch")],
        "mlp_forward": [(t(2, 7, 5), t(8, 5), None, t(3, 8), None, KEEP, "relu", 0.5, 0.0, "auto")],
        "gated_mlp": [(t(7, 5), t(8, 5), t(8), t(8, 5), t(8), t(3, 8), t(3), KEEP, "gelu", 0.5, "torch")],
        "gated_mlp_forward": [(t(2, 7, 5), t(8, 5), None, t(8, 5), None, t(3, 8), None, KEEP, "silu", 1.0, "torch")],
        "attention": [(t(2, 4, 7, 8), t(2, 1, 7, 8), t(2, 1, 7, 8), KEEP, True, 0.3, "q", 2.0, pad, t(4, 7, 7), 0.0,
                       "torch")],
        # (mode "q" with grads: sbp::attention's sample runs through sbp::attention_forward)
        "attention_forward": [
            (t(2, 4, 7, 8), t(2, 2, 7, 8), t(2, 2, 7, 8), KEEP, False, None, "qkv", 1.0, pad, t(2, 1, 7, 7), 0.25,
             "torch"),
        ] + ([] if requires_grad else [
            (t(2, 2, 7, 8), t(2, 2, 7, 8), t(2, 2, 7, 8), KEEP, True, None, "q", 1.0, None, None, 0.0, "auto"),
        ]),
        "layer_norm": [(t(2, 7, 5), t(5), t(5), KEEP), (t(7, 5), None, None, KEEP, 1e-3, "torch")],
        "rms_norm": [(t(2, 7, 5), t(5), KEEP, 1e-5, 1.0, True, "torch"), (t(2, 7, 5, dtype=torch.bfloat16), t(5), KEEP)],
        "dropout": [(t(2, 7, 5), KEEP, 0.3, "torch")],
        "dropout_forward": [(t(3, 7, 4), KEEP, 0.4, "auto")],
        "linear_cross_entropy": [(t(2, 7, 5), t(11, 5), target, KEEP, t(11), -100, "sum", 2.0, "torch")],
        "linear_cross_entropy_forward": [(t(2, 7, 5), t(11, 5), target, KEEP, None, -100, "mean", 1.0, "torch")],
        "kept_rows_backward": [
            (t(2, 7, 3), t(2, 4, 5), t(3, 5), KEEP, 2.0, False, 5, [True, True, True]),
            (t(2, 7, 3), None, t(3, 5), KEEP, 2.0, True, 5, [True, False, False]),
            (t(2, 7, 3), t(2, 4, 5), None, KEEP.int(), 0.5, False, 5, [False, True, True]),
        ],
    }


OPS = sorted(_samples(False))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, requires_grad):
    if op == "kept_rows_backward" and not _extension.loaded:
        pytest.skip(f"sbp::kept_rows_backward is the C++ extension's: {_extension.error}")
    for args in _samples(requires_grad)[op]:
        torch.library.opcheck(getattr(torch.ops.sbp, op).default, args)


def test_every_op_is_checked():
    from sbp_kernels._schemas import SCHEMAS

    assert set(SCHEMAS) | ({"kept_rows_backward"} if _extension.loaded else set()) == set(OPS)


@pytest.mark.skipif(not _extension.loaded, reason="the C++ extension is not built")
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
@pytest.mark.parametrize("channels_first", [False, True])
def test_kept_rows_backward_derivative_gradcheck(needs, channels_first):
    """The registered derivative of the backward op (used by opcheck and create_graph=True)."""
    keep = torch.tensor([1, 4, 5])
    grad_out = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    x_kept = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) if needs[1] else None
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True) if needs[0] else None
    inputs = [t for t in (grad_out, x_kept, weight) if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        args = [next(it), next(it) if x_kept is not None else None, next(it) if weight is not None else None]
        outs = torch.ops.sbp.kept_rows_backward(*args, keep, 1.7, channels_first, 5, list(needs))
        return tuple(o for o, need in zip(outs, needs) if need)

    assert torch.autograd.gradcheck(fn, inputs)


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
        return sbp_kernels.pointwise_conv(img, conv_w, None, keep, backend=backend)

    inputs = [torch.randn(2, 8, 8), w_in, w1, w2, conv_w]
    compile_matches_eager(model, [t.requires_grad_() for t in inputs])


@pytest.mark.parametrize("mode", ["qkv", "q"])
def test_compile_fullgraph_matches_eager_every_op(mode):
    """One graph through every public op, their optional arguments and every kind of dropout
    (the same seed draws the same masks eagerly and compiled)."""
    batch, n, c, heads, kv_heads, d, vocab = 2, 9, 16, 4, 2, 4, 13
    keep = torch.tensor([0, 3, 4, 8])
    pad = torch.ones(batch, n, dtype=torch.bool)
    pad[0, :2] = False
    target = torch.randint(0, vocab, (batch, n))
    target[1, 3] = -100

    def model(x, w_qkv, bias, w_o, ln_w, ln_b, rms_w, w1, w2, w_gate, w_up, w_down, conv_w, w_head):
        h = sbp_kernels.layer_norm(x, ln_w, ln_b, keep)
        qkv = sbp_kernels.linear(h, w_qkv, None, keep)
        q = qkv[..., : heads * d].unflatten(-1, (heads, d)).transpose(1, 2)
        k, v = qkv[..., heads * d:].unflatten(-1, (2 * kv_heads, d)).transpose(1, 2).chunk(2, dim=1)
        o = sbp_kernels.attention(q, k, v, keep, causal=mode == "q", mode=mode, grad_scale=1.5, key_padding_mask=pad,
                                  attn_bias=bias, dropout_p=0.2)
        h = x + sbp_kernels.linear(o.transpose(1, 2).reshape(batch, n, heads * d), w_o, None, keep)
        h = h + sbp_kernels.mlp(sbp_kernels.rms_norm(h, rms_w, keep), w1, None, w2, None, keep, "gelu", 1.0, 0.1)
        h = h + sbp_kernels.dropout(sbp_kernels.gated_mlp(h, w_gate, None, w_up, None, w_down, None, keep), keep, 0.1)
        h = sbp_kernels.rms_norm(h, rms_w, keep, weight_offset=1.0, scale_in_float=True)
        h = sbp_kernels.tokenwise(torch.tanh, h, keep)
        img = sbp_kernels.pointwise_conv(h.transpose(1, 2).reshape(batch, c, 3, 3), conv_w, None, keep)
        h = img.flatten(2).transpose(1, 2)
        return sbp_kernels.linear_cross_entropy(h, w_head, target, keep, reduction="sum", grad_scale=2.0)

    shapes = [(batch, n, c), (heads, n, n), (c, c), (c,), (c,), (c,), (32, c), (c, 32), (24, c), (24, c), (c, 24),
              (c, c, 1, 1), (vocab, c)]
    inputs = [torch.randn(batch, n, c), torch.randn((heads + 2 * kv_heads) * d, c)]
    inputs += [torch.randn(s) * (0.5 if len(s) > 1 else 1.0) for s in shapes[1:]]
    compile_matches_eager(model, [t.requires_grad_() for t in inputs], atol=1e-5, rtol=1e-5)


def test_compile_with_keep_idx_from_inference_mode():
    with torch.inference_mode():
        keep = torch.tensor([1, 2, 5])

    def model(x, w, w1, w2, w_head):
        h = sbp_kernels.rms_norm(sbp_kernels.linear(x, w, None, keep), None, keep)
        q = h.unflatten(-1, (2, 4)).transpose(1, 2)
        h = h + sbp_kernels.attention(q, q, q, keep).transpose(1, 2).flatten(2)
        h = sbp_kernels.mlp(h, w1, None, w2, None, keep)
        return sbp_kernels.linear_cross_entropy(h, w_head, torch.arange(6).expand(2, 6), keep)

    inputs = [torch.randn(2, 6, 8), torch.randn(8, 8), torch.randn(16, 8), torch.randn(8, 16), torch.randn(7, 8)]
    compile_matches_eager(model, [t.requires_grad_() for t in inputs])


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
    out the same and so do the gradients (dropout included: checkpoint restores the RNG)."""
    keep = torch.tensor([0, 3, 4, 6])
    w_in, w1, w2, wg = torch.randn(16, 8), torch.randn(32, 16), torch.randn(16, 32), torch.randn(32, 16)

    def block(x, w_in, w1, w2, wg):
        h = sbp_kernels.layer_norm(sbp_kernels.linear(x, w_in, None, keep), None, None, keep)
        h = sbp_kernels.mlp(h, w1, None, w2, None, keep, "gelu", 1.0, 0.2)
        h = h + sbp_kernels.gated_mlp(sbp_kernels.rms_norm(h, None, keep), wg, None, w1, None, w2, None, keep)
        q = h.view(2, 7, 2, 8).transpose(1, 2)
        out = sbp_kernels.attention(q, q, q, keep, dropout_p=0.1)
        return sbp_kernels.dropout(out, keep, 0.3).square().sum()

    inputs = [torch.randn(2, 7, 8), w_in, w1, w2, wg]
    grads = []
    for run in (block, lambda *t: torch.utils.checkpoint.checkpoint(block, *t, use_reentrant=use_reentrant)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(3)
        run(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)
