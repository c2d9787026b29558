"""SBPLinear, SBPConv1x1, SBPMlp against the dense torch modules they replace."""
import pytest
import torch
import torch.nn as nn

from sbp_kernels.ops import linear as linear_op
from sbp_kernels.ops import mlp as mlp_op
from sbp_kernels import keepset
from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn import SBPConv1x1, SBPLinear, SBPMlp, SBPModule
from sbp_kernels.sampling import sample_keep_indices

ACTS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class TimmMlp(nn.Module):
    """timm.layers.Mlp's structure and parameter names (timm is not a dependency)."""

    def __init__(self, c_in, hidden, c_out=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(c_in, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, c_out or c_in)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def _linear_pair():
    dense = nn.Linear(32, 48)
    return dense, SBPLinear.from_linear(dense)


def _conv_pair():
    dense = nn.Conv2d(16, 24, 1)
    return dense, SBPConv1x1.from_conv(dense)


def _mlp_pair(activation="gelu"):
    dense = TimmMlp(32, 64, act_layer=ACTS[activation])
    return dense, SBPMlp.from_mlp(dense)


def _seq_input():
    return torch.randn(3, 40, 32)


def _conv_input():
    return torch.randn(2, 16, 6, 7)


PAIRS = {
    "linear": (_linear_pair, _seq_input),
    "conv": (_conv_pair, _conv_input),
    "mlp": (_mlp_pair, _seq_input),
}


def _grads(module, x, grad_out, **kwargs):
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x, **kwargs)
    y.backward(grad_out)
    return [x.grad] + [p.grad for p in module.parameters()]


def _positions(t, conv):
    """A [B, n, C] view of t's positions (flattened H*W for conv)."""
    return t.flatten(2).transpose(1, 2) if conv else t


def _keep_grad_rows(grad_out, keep_idx, conv):
    """grad_out with the dropped positions zeroed."""
    masked = grad_out.clone()
    rows = _positions(masked, conv)
    dropped = torch.ones(rows.shape[1], dtype=torch.bool)
    dropped[keep_idx] = False
    rows[:, dropped] = 0
    return masked


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_forward_equals_dense_in_train_and_eval(kind):
    make_pair, make_input = PAIRS[kind]
    dense, sbp = make_pair()
    x = make_input().requires_grad_()
    assert torch.equal(sbp(x), dense(x))  # train mode, grad enabled: the SBP op
    with torch.no_grad():
        assert torch.equal(sbp(x), dense(x))
    dense.eval(), sbp.eval()
    assert torch.equal(sbp(x), dense(x))
    if kind == "conv":
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        sbp.train(), dense.train()
        assert torch.equal(sbp(x_cl), dense(x_cl))


@pytest.mark.parametrize("activation", sorted(ACTS))
def test_mlp_activations_match_dense(activation):
    dense, sbp = _mlp_pair(activation)
    assert sbp.activation == activation
    x = _seq_input().requires_grad_()
    assert torch.equal(sbp(x), dense(x))
    keep_idx = sample_keep_indices((x.shape[1],), 0.5)
    grad_out = torch.randn(3, 40, 32)
    got = _grads(sbp, x, grad_out, keep_idx=keep_idx)
    want = _grads(dense, x, _keep_grad_rows(grad_out, keep_idx, False))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_conversion_shares_parameters():
    dense = nn.Linear(8, 4)
    opt = torch.optim.SGD(dense.parameters(), lr=1.0)  # built before the conversion
    sbp = SBPLinear.from_linear(dense, keep_ratio=1.0)
    assert sbp.weight is dense.weight and sbp.bias is dense.bias
    before = dense.weight.detach().clone()
    sbp(torch.randn(2, 5, 8)).sum().backward()
    opt.step()
    assert not torch.equal(dense.weight, before)

    conv = nn.Conv2d(3, 5, 1, bias=False)
    sbp_conv = SBPConv1x1.from_conv(conv)
    assert sbp_conv.weight is conv.weight and sbp_conv.bias is None
    mlp = TimmMlp(4, 8)
    sbp_mlp = SBPMlp.from_mlp(mlp.eval())
    assert sbp_mlp.fc1.weight is mlp.fc1.weight and sbp_mlp.fc2.bias is mlp.fc2.bias
    assert not sbp_mlp.training  # keeps the mode


def test_settings_and_repr():
    sbp = SBPLinear(8, 4, keep_ratio=0.25, strategy="random", grad_scale=4.0, backend="torch")
    assert (sbp.keep_ratio, sbp.strategy, sbp.grad_scale, sbp.backend) == (0.25, "random", 4.0, "torch")
    assert isinstance(sbp, SBPModule) and isinstance(sbp, nn.Linear)
    assert SBPLinear(8, 4).sbp_settings() == {
        "keep_ratio": 0.5, "strategy": "grid", "grad_scale": 1.0, "backend": "auto",
    }
    dense, sbp = _linear_pair()
    assert repr(sbp) == "SBP" + repr(dense)[:-1] + ", keep_ratio=0.5, strategy='grid')"
    dense, sbp = _conv_pair()
    assert repr(sbp) == repr(dense).replace("Conv2d", "SBPConv1x1")[:-1] + ", keep_ratio=0.5, strategy='grid')"
    conv = SBPConv1x1.from_conv(nn.Conv2d(3, 5, 1), keep_ratio=0.25)
    assert conv.keep_ratio == 0.25
    mlp = SBPMlp.from_modules(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4), grad_scale=2.0)
    assert (mlp.activation, mlp.grad_scale) == ("silu", 2.0)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_state_dict_round_trip(kind):
    make_pair, _ = PAIRS[kind]
    dense, _ = make_pair()
    _, sbp = make_pair()  # independent parameters
    assert list(sbp.state_dict()) == list(dense.state_dict())
    sbp.load_state_dict(dense.state_dict())
    for (k, a), b in zip(sbp.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(a, b), k
    other, _ = make_pair()
    other.load_state_dict(sbp.state_dict())
    for a, b in zip(other.state_dict().values(), dense.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_keep_ratio_one_gives_dense_gradients(kind):
    make_pair, make_input = PAIRS[kind]
    dense, sbp = make_pair()
    sbp.keep_ratio = 1.0
    x = make_input()
    grad_out = torch.randn_like(dense(x))
    for got, want in zip(_grads(sbp, x, grad_out), _grads(dense, x, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("grad_scale", [1.0, 2.0])
def test_half_keep_gradients_equal_masked_dense(kind, grad_scale):
    make_pair, make_input = PAIRS[kind]
    dense, sbp = make_pair()
    sbp.grad_scale = grad_scale
    x = make_input()
    conv = kind == "conv"
    n = x.shape[-2] * x.shape[-1] if conv else x.shape[-2]
    keep_idx = sample_keep_indices((n,), 0.5, "random")
    grad_out = torch.randn_like(dense(x))
    got = _grads(sbp, x, grad_out, keep_idx=keep_idx)
    want = _grads(dense, x, _keep_grad_rows(grad_out, keep_idx, conv) * grad_scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # dx is exactly zero on every dropped position
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep_idx] = False
    assert not _positions(got[0], conv)[:, dropped].any()


def test_sampled_keep_set_drops_gradients():
    """Without an explicit keep_idx the module draws one: half the positions get no gradient."""
    sbp = SBPLinear(8, 8)
    x = torch.randn(2, 10, 8, requires_grad=True)
    sbp(x).sum().backward()
    kept = x.grad.abs().sum((0, 2)) != 0
    assert int(kept.sum()) == 5


def test_conv_unbatched_and_dense_fallbacks():
    dense, sbp = _conv_pair()
    x = torch.randn(16, 5, 5)
    keep_idx = sample_keep_indices((25,), 0.5)
    grad_out = torch.randn(24, 5, 5)
    got = _grads(sbp, x, grad_out, keep_idx=keep_idx)
    want = _grads(dense, x, _keep_grad_rows(grad_out[None], keep_idx, True)[0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # inputs without a position axis run the dense math in training mode
    lin_dense, lin = _linear_pair()
    v = torch.randn(32, requires_grad=True)
    assert torch.equal(lin(v), lin_dense(v))
    mlp_dense, mlp = _mlp_pair()
    assert torch.equal(mlp(v), mlp_dense(v))


def test_keep_set_shared_within_step(monkeypatch):
    seen = []

    def spy(op, keep_idx_arg):
        def wrapped(*args, **kwargs):
            seen.append(args[keep_idx_arg])
            return op(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(linear_op, "apply", spy(linear_op.apply, 3))
    monkeypatch.setattr(mlp_op, "apply", spy(mlp_op.apply, 5))
    a, b, mlp = SBPLinear(8, 16), SBPLinear(16, 8), SBPMlp(8, 32)
    x = torch.randn(2, 64, 8, requires_grad=True)
    with keepset.step():
        mlp(b(a(x))).sum().backward()
    assert len(seen) == 3
    assert seen[0] is seen[1] and seen[1] is seen[2]
    seen.clear()
    with keepset.step(keep_ratio=0.25, strategy="random"):
        b(a(x))
    assert seen[0] is seen[1] and len(seen[0]) == 16
    seen.clear()
    b(a(x))  # outside a step: a fresh keep set per call
    assert seen[0] is not seen[1]


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = SBPLinear(16, 32)
        self.mlp = SBPMlp(32, 64, activation="gelu_tanh")

    def forward(self, x, keep_idx):
        return self.mlp(self.proj(x, keep_idx), keep_idx).square().mean()


def test_torch_compile_fullgraph():
    model = _Small()
    x = torch.randn(2, 24, 16)
    keep_idx = sample_keep_indices((24,), 0.5)
    loss = model(x, keep_idx)
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, keep_idx)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)


def _rel_err(got, want):
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_autocast_bf16(kind):
    """Under CPU autocast the output is bf16 and every gradient is within 2% (relative l2 error)
    of the fp32 one: bf16 keeps 8 significant bits (2^-8 = 0.4% per rounding)."""
    make_pair, make_input = PAIRS[kind]
    _, sbp = make_pair()
    x = make_input()
    n = x.shape[-2] * x.shape[-1] if kind == "conv" else x.shape[-2]
    keep_idx = sample_keep_indices((n,), 0.5)
    grad_out = torch.randn_like(sbp(x))
    want = _grads(sbp, x, grad_out, keep_idx=keep_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sbp(x.requires_grad_(), keep_idx=keep_idx)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(sbp, x, grad_out.bfloat16(), keep_idx=keep_idx)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert 0 < _rel_err(g, w) < 2e-2  # > 0: the bf16 path really ran


def test_saved_bytes_half_of_dense():
    x = torch.randn(4, 256, 32, requires_grad=True)
    keep_idx = sample_keep_indices((256,), 0.5)

    def measure(module, inp, **kwargs):
        with saved_bytes() as saved:
            out = module(inp, **kwargs)
        out.sum().backward()
        return saved.bytes

    dense, sbp = nn.Linear(32, 64), SBPLinear(32, 64)
    assert measure(sbp, x, keep_idx=keep_idx) <= 0.55 * measure(dense, x)

    dense_mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    sbp_mlp = SBPMlp.from_modules(*dense_mlp)
    assert measure(sbp_mlp, x, keep_idx=keep_idx) <= 0.55 * measure(dense_mlp, x)

    img = torch.randn(4, 32, 16, 16, requires_grad=True)
    dense_conv = nn.Conv2d(32, 64, 1)
    sbp_conv = SBPConv1x1.from_conv(dense_conv)
    assert measure(sbp_conv, img, keep_idx=keep_idx) <= 0.55 * measure(dense_conv, img)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"kernel_size": 3}, "kernel_size"),
        ({"kernel_size": 1, "stride": 2}, "stride"),
        ({"kernel_size": 1, "padding": 1}, "padding"),
        ({"kernel_size": 1, "dilation": 2}, "dilation"),
        ({"kernel_size": 1, "groups": 2}, "groups"),
        ({"kernel_size": 1, "padding_mode": "reflect"}, "padding_mode"),
    ],
)
def test_from_conv_rejects_non_pointwise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SBPConv1x1.from_conv(nn.Conv2d(4, 4, **kwargs))
    with pytest.raises(ValueError, match=name):
        SBPConv1x1(4, 4, **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        SBPMlp(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="act"):
        SBPMlp.from_modules(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="fc2.in_features"):
        SBPMlp.from_modules(nn.Linear(8, 16), nn.GELU(), nn.Linear(12, 8))
    with_norm = TimmMlp(8, 16)
    with_norm.norm = nn.LayerNorm(16)
    with pytest.raises(ValueError, match="norm inside"):
        SBPMlp.from_mlp(with_norm)
    with pytest.raises(ValueError, match="fc1"):
        SBPMlp.from_mlp(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(TypeError, match="fc1"):
        SBPMlp.from_modules(nn.Conv2d(8, 16, 1), nn.GELU(), nn.Linear(16, 8))
    with pytest.raises(TypeError, match="m must be"):
        SBPLinear.from_linear(nn.Conv2d(8, 8, 1))
    with pytest.raises(TypeError, match="m must be"):
        SBPConv1x1.from_conv(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="keep_ratio"):
        SBPLinear(8, 8, keep_ratio=0.0)
    with pytest.raises(ValueError, match="strategy"):
        SBPLinear(8, 8, strategy="checkerboard")
    with pytest.raises(ValueError, match="backend"):
        SBPLinear(8, 8, backend="fast")
    with pytest.raises(ValueError, match="keep_idx"):  # the op validates explicit keep sets
        SBPLinear(8, 8)(torch.randn(2, 4, 8, requires_grad=True), keep_idx=torch.tensor([2, 1]))
