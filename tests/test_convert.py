"""sbp_kernels.convert on torch.nn models (nn.TransformerEncoder and friends): in-place conversion,
keep sets per forward, settings, and recomputation under torch.utils.checkpoint. The real timm and
Hugging Face families are tested in test_timm.py and test_transformers.py."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels import keepset
from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn import SBPConv1x1, SBPLinear, SBPModule, SBPTransformerEncoderLayer
from sbp_kernels.nn.attention import SBPMultiheadAttention
from sbp_kernels.nn.convert import _OpenStep

# --- helpers ---------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(num_layers=6, norm_first=True, batch_first=True, d_model=64, dim_feedforward=256, **kwargs):
    layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward, dropout=0.0, norm_first=norm_first,
                                       batch_first=batch_first, **kwargs)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def _last(k):
    return lambda name, m: name.startswith("layers.") and int(name.split(".")[1]) >= k


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def spy(monkeypatch):
    """Every keep set an SBP module gets from keepset.keep_idx_for, in order."""
    got = []
    real = keepset.keep_idx_for

    def keep_idx_for(*args, **kwargs):
        got.append(real(*args, **kwargs))
        return got[-1]

    monkeypatch.setattr(keepset, "keep_idx_for", keep_idx_for)
    return got


def _grads(model, x, grad_out=None):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


# --- nn.TransformerEncoder ---------------------------------------------------------------------------


def test_encoder_last_four_layers_forward_memory_and_fit():
    model = _encoder()
    dense = copy.deepcopy(model)
    assert sbp_kernels.convert(model, 0.5, layers=_last(2)) is model
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [nn.TransformerEncoderLayer] * 2 + [SBPTransformerEncoderLayer] * 4
    assert [type(layer.self_attn) for layer in model.layers] == [nn.MultiheadAttention] * 2 + [
        SBPMultiheadAttention
    ] * 4

    x = torch.randn(16, 64, 64)
    with saved_bytes() as sbp_saved:
        out = model(x)
    with saved_bytes() as dense_saved:
        want = dense(x)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    # All saved bytes counted, weights included (0.2 MB of each layer's 3.4 MB dense, 1.9 MB SBP):
    # the whole model (2 dense + 4 SBP layers) saves ~0.71x; activations alone ~0.69x.
    assert sbp_saved.bytes <= 0.75 * dense_saved.bytes, (sbp_saved.bytes, dense_saved.bytes)
    activations = sbp_saved.bytes_excluding(model.parameters()), dense_saved.bytes_excluding(dense.parameters())
    assert activations[0] <= 0.72 * activations[1], activations

    gen = torch.Generator().manual_seed(0)
    xb, target = torch.randn(4, 16, 64, generator=gen), torch.randn(4, 16, 64, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(xb), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_state_dict_and_parameters_are_shared_with_an_existing_optimizer():
    def make():
        return nn.Sequential(_encoder(2, d_model=32, dim_feedforward=64), nn.Linear(32, 4), nn.Conv2d(3, 3, 1),
                             nn.MultiheadAttention(32, 4), nn.Conv2d(3, 3, 3))

    model = make()
    before = _state(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sbp_kernels.convert(model)
    assert isinstance(model[0].layers[0], SBPTransformerEncoderLayer)
    assert isinstance(model[1], SBPLinear) and isinstance(model[2], SBPConv1x1)
    assert isinstance(model[3], SBPMultiheadAttention) and type(model[4]) is nn.Conv2d
    _assert_same_state(model.state_dict(), before)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    model[0](torch.randn(2, 8, 32)).sum().backward()
    opt.step()
    changed = model[0].layers[1].linear2.weight
    assert not torch.equal(changed, before["0.layers.1.linear2.weight"])
    # Loads both ways.
    make().load_state_dict(model.state_dict())
    model.load_state_dict(before)
    _assert_same_state(model.state_dict(), before)


def test_layers_callable_is_asked_top_down():
    class Custom(nn.Module):  # not convertible itself: accepting it converts what is inside
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, x):
            return self.inner(x)

    model = nn.ModuleDict({"enc": _encoder(4, d_model=32, dim_feedforward=64), "custom": Custom()})
    asked = []

    def layers(name, m):
        asked.append(name)
        return name == "custom" or (name.startswith("enc.layers.") and int(name.split(".")[2]) >= 2)

    sbp_kernels.convert(model, layers=layers)
    enc = model["enc"]
    assert [type(layer).__name__ for layer in enc.layers] == ["TransformerEncoderLayer"] * 2 + [
        "SBPTransformerEncoderLayer"
    ] * 2
    assert all(isinstance(m, SBPLinear) for m in model["custom"].inner if not isinstance(m, nn.ReLU))
    # Rejected modules are looked into, accepted ones and nn.MultiheadAttention are not.
    assert "enc.layers.0.linear1" in asked and "enc.layers.0.self_attn" in asked
    assert not any(n.startswith("enc.layers.0.self_attn.") for n in asked)  # its out_proj is no module call
    assert not any(n.startswith("enc.layers.2.") or n.startswith("custom.") for n in asked)
    assert type(enc.layers[0].linear1) is nn.Linear  # rejected: layers(...) said no
    with pytest.raises(TypeError, match="layers"):
        sbp_kernels.convert(model, layers="all")


def test_convert_is_idempotent_and_bad_arguments_raise():
    model = _encoder(2, d_model=32, dim_feedforward=64)
    sbp_kernels.convert(model, 0.25)
    layers = list(model.layers)
    state = _state(model)
    assert sbp_kernels.convert(model, 0.25) is model
    assert list(model.layers) == layers
    _assert_same_state(model.state_dict(), state)
    assert sum(isinstance(h, _OpenStep) for h in model._forward_pre_hooks.values()) == 1
    assert len(model._forward_hooks) == 1
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            sbp_kernels.convert(model, bad)
    with pytest.raises(ValueError, match="layout"):
        sbp_kernels.convert(model, layout=(0, 4))
    with pytest.raises(TypeError, match="model"):
        sbp_kernels.convert(torch.zeros(3))
    lin = nn.Linear(4, 4)
    weight = lin.weight
    assert sbp_kernels.convert(lin) is lin  # a convertible root is converted in place
    assert isinstance(lin, SBPLinear) and lin.weight is weight


def test_one_keep_set_per_root_forward(spy):
    model = _encoder(6)
    sbp_kernels.convert(model, layers=_last(2))
    x = torch.randn(2, 16, 64)
    sets = []
    for _ in range(6):
        spy.clear()
        model(x).sum().backward()
        assert len(spy) == 4 and all(k is spy[0] for k in spy)  # one per SBP layer, the same tensor
        assert keepset.current() is None  # the step closed after the forward
        sets.append(spy[0])
    assert all(a is not b for a, b in zip(sets, sets[1:]))  # fresh at every forward
    assert len({tuple(k.tolist()) for k in sets}) > 1


def test_step_closes_when_the_forward_raises():
    model = sbp_kernels.convert(_encoder(2, d_model=32, dim_feedforward=64))
    with pytest.raises(Exception):
        model(torch.randn(2, 8, 31))
    assert keepset.current() is None


def test_user_step_wins(spy):
    model = _encoder(3, norm_first=False, d_model=32, dim_feedforward=64)
    dense = copy.deepcopy(model)
    sbp_kernels.convert(model)
    keep = torch.tensor([0, 3, 4, 9])
    x = torch.randn(2, 10, 32)
    with sbp_kernels.step(keep_idx=keep):
        out, grad_x, _ = _grads(model, x)
    assert len(spy) == 3 and all(torch.equal(k, keep) for k in spy)
    torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
    # Post-norm layers route gradients through kept tokens only, so dropped tokens get none.
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    assert (grad_x[:, dropped] == 0).all() and (grad_x[:, keep] != 0).all()


def test_eval_and_no_grad_are_dense():
    model = _encoder(3, d_model=32, dim_feedforward=64)
    dense = copy.deepcopy(model)
    sbp_kernels.convert(model)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))
    model.eval(), dense.eval()
    assert torch.equal(model(x), dense(x))
    with torch.no_grad():  # the fused fast path of nn.TransformerEncoderLayer, as in the dense model
        assert torch.equal(model(x), dense(x))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_variants_forward_and_full_ratio_gradients(norm_first, batch_first):
    dense = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", norm_first=norm_first,
                                       batch_first=batch_first)
    sbp = sbp_kernels.convert(copy.deepcopy(dense), keep_ratio=1.0)
    x = torch.randn(3, 11, 32) if batch_first else torch.randn(11, 3, 32)
    grad_out = torch.randn_like(x)
    got, want = _grads(sbp, x, grad_out), _grads(dense, x, grad_out)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5, rtol=1e-5)
    unbatched = x[:, 0] if batch_first else x[:, 0]  # [S, E] either way
    torch.testing.assert_close(sbp(unbatched), dense(unbatched), atol=1e-5, rtol=1e-5)


def test_encoder_layer_at_half_ratio_keeps_only_kept_rows():
    dense = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, norm_first=True, batch_first=True)
    sbp = sbp_kernels.convert(copy.deepcopy(dense), keep_ratio=0.5)
    x = torch.randn(2, 12, 32)
    keep = sbp_kernels.sample_keep_indices((12,), 0.5)
    with sbp_kernels.step(keep_idx=keep):
        out, _, grads = _grads(sbp, x)
    torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
    # The feed-forward sees only kept rows: its weight gradient equals the dense one for the
    # output gradient zeroed on dropped tokens (attention-free part of the branch).
    hidden_in = sbp.norm2(x + dense._sa_block(dense.norm1(x), None, None)).detach()
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[keep] = False
    ones = torch.ones(2, 12, 32)
    ones[:, dropped] = 0
    w2 = dense.linear2.weight.detach().requires_grad_()
    F.linear(F.relu(dense.linear1(hidden_in)), w2, dense.linear2.bias).backward(ones)
    torch.testing.assert_close(grads["linear2.weight"], w2.grad, atol=1e-5, rtol=1e-5)


def test_causal_mask_runs_sbp(spy):
    model = _encoder(2, d_model=32, dim_feedforward=64)
    dense = copy.deepcopy(model)
    sbp_kernels.convert(model)
    x = torch.randn(2, 9, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x, mask=mask, is_causal=True)
    assert len(spy) == 2
    torch.testing.assert_close(out, dense(x, mask=mask, is_causal=True), atol=1e-5, rtol=1e-5)


def test_unsupported_activation_warns_once_and_runs_dense():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, activation=torch.tanh)
    dense = copy.deepcopy(layer)
    sbp = sbp_kernels.convert(layer)
    x = torch.randn(2, 6, 32)
    with pytest.warns(UserWarning, match="activation"):
        out = sbp(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer and reason
        sbp(x)
    torch.testing.assert_close(out, dense(x), atol=0, rtol=0)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_and_dropout_run_sbp_with_the_dense_masks(norm_first, batch_first):
    """src_key_padding_mask, src_mask and the default dropout 0.1 (attention, residual and
    feed-forward dropouts) run the SBP path; the same seed gives the dense layer's output."""
    dense = nn.TransformerEncoderLayer(32, 4, 64, norm_first=norm_first, batch_first=batch_first)  # dropout 0.1
    sbp = sbp_kernels.convert(copy.deepcopy(dense), keep_ratio=0.5)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -2:] = True
    for call in ({}, {"src_key_padding_mask": padding}, {"src_mask": torch.randn(7, 7)}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no dense fallback
            torch.manual_seed(5)
            out = sbp(x, **call)
        torch.manual_seed(5)
        want = dense(x, **call)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        out.sum().backward()


def test_converting_again_applies_the_new_settings():
    model = _encoder(2, d_model=32, dim_feedforward=64)
    sbp_kernels.convert(model, keep_ratio=0.5, strategy="grid")
    sbp_kernels.convert(model, keep_ratio=0.25, strategy="random", grad_scale=4.0)
    converted = [m for m in model.modules() if isinstance(m, SBPModule)]
    assert converted and all(
        (m.keep_ratio, m.strategy, m.grad_scale) == (0.25, "random", 4.0) for m in converted
    )


def test_restore_gives_the_torch_classes_back():
    model = _encoder(2, d_model=32, dim_feedforward=64)
    dense = copy.deepcopy(model)
    sbp_kernels.convert(model)
    sbp_kernels.nn.restore(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in dense.modules()]
    x = torch.randn(2, 5, 32)
    assert torch.equal(model(x), dense(x))


# --- recomputation under torch.utils.checkpoint ----------------------------------------------------


class _Branch(nn.Module):
    """A residual block whose branch is one linear layer."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(x)


class _Checkpointed(nn.Module):
    def __init__(self, depth=3, dim=8, reentrant=None):
        super().__init__()
        self.blocks = nn.ModuleList([_Branch(dim) for _ in range(depth)])
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputes_with_the_forwards_keep_sets(reentrant):
    """Every block's branch gets gradient on exactly the |K| kept rows, on every step, and the
    gradients equal the same model's without checkpointing."""
    torch.manual_seed(0)
    plain = _Checkpointed(reentrant=None)
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = reentrant
    for model in (plain, ckpt):
        sbp_kernels.convert(model, keep_ratio=0.5, strategy="random")
    for step in range(20):
        x = torch.randn(2, 16, 8, requires_grad=True)
        grads = []
        for model in (plain, ckpt):
            sbp_kernels.manual_seed(step)
            model.zero_grad()
            x.grad = None
            kept_inputs = []
            hooks = [b.fc.register_full_backward_hook(lambda m, gi, go: kept_inputs.append(gi[0])) for b in model.blocks]
            model(x).square().sum().backward()
            for h in hooks:
                h.remove()
            rows = [int((g.abs().sum((0, 2)) != 0).sum()) for g in kept_inputs]
            grads.append((x.grad.clone(), [b.fc.weight.grad.clone() for b in model.blocks], rows))
        assert grads[1][2] == [8, 8, 8], grads[1][2]  # the branch output gradient reaches n * r rows
        torch.testing.assert_close(grads[1][0], grads[0][0])
        for a, b in zip(grads[1][1], grads[0][1]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_replays_an_explicit_keep_set_of_any_size(reentrant):
    model = sbp_kernels.convert(_Checkpointed(reentrant=reentrant), keep_ratio=0.5)
    x = torch.randn(2, 16, 8, requires_grad=True)
    keep = torch.tensor([1, 5, 9])  # 3 of 16, not the modules' ratio
    with sbp_kernels.step(keep_idx=keep):
        out = model(x)
    out.sum().backward()  # after the step closed
    for block in model.blocks:
        assert block.fc.weight.grad is not None
    # the last block's input gradient is the residual's everywhere plus the branch's on K only
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[keep] = False
    assert torch.equal(x.grad[:, dropped], torch.ones_like(x.grad[:, dropped]))
