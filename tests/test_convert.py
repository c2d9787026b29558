"""sbp_kernels.convert on whole models: nn.TransformerEncoder and timm-like ViT / ConvNeXt replicas
(timm is not a dependency: sbp_kernels.bench.models copies timm's attribute names and forward code)."""
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
from sbp_kernels.nn import (
    SBPChannelsLastMlp,
    SBPConv1x1,
    SBPLinear,
    SBPMlp,
    SBPModule,
    SBPTokenwise,
    SBPTransformerEncoderLayer,
)
from sbp_kernels.nn.attention import SBPMultiheadAttention, SBPSelfAttention
from sbp_kernels.nn.convert import _OpenStep

# timm replicas (timm.models.vision_transformer / convnext, timm.layers), shared with the benchmark CLI.
from sbp_kernels.bench.models import (  # noqa: E402
    Attention,
    Block,
    ConvNeXtBlock,
    LayerScale,
    Mlp,
    VisionTransformer,
)

# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are small: one thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in model.layers)

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
    assert not any(n.startswith("enc.layers.0.self_attn.") for n in asked)
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
    new = sbp_kernels.convert(lin)  # a convertible root is replaced (parameters shared)
    assert isinstance(new, SBPLinear) and new.weight is lin.weight


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
    sbp = SBPTransformerEncoderLayer.from_module(copy.deepcopy(dense), keep_ratio=1.0)
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
    sbp = SBPTransformerEncoderLayer.from_module(copy.deepcopy(dense), keep_ratio=0.5)
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


@pytest.mark.parametrize("case", ["padding_mask", "src_mask", "dropout", "activation"])
def test_fallbacks_warn_once_and_run_dense(case):
    kwargs = {"dropout": 0.1} if case == "dropout" else {}
    if case == "activation":
        kwargs["activation"] = torch.tanh
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, **{"dropout": 0.0, **kwargs})
    dense = copy.deepcopy(layer)
    sbp = SBPTransformerEncoderLayer.from_module(layer)
    x = torch.randn(2, 6, 32)
    call = {}
    if case == "padding_mask":
        call["src_key_padding_mask"] = torch.tensor([[False] * 5 + [True]] * 2)
    elif case == "src_mask":
        call["src_mask"] = torch.zeros(6, 6)
    match = {"padding_mask": "src_key_padding_mask", "src_mask": "src_mask", "dropout": "dropout",
             "activation": "activation"}[case]
    with pytest.warns(UserWarning, match=match):
        torch.manual_seed(1)
        out = sbp(x, **call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer and reason
        sbp(x, **call)
    torch.manual_seed(1)
    torch.testing.assert_close(out, dense(x, **call), atol=0, rtol=0)


# --- timm-like models --------------------------------------------------------------------------------


def test_vit_blocks_convert_in_place_with_class_token_kept(spy):
    model = VisionTransformer(depth=3)
    dense = copy.deepcopy(model)
    before = _state(model)
    norm_weight = model.blocks[1].norm1.weight
    sbp_kernels.convert(model, layers=lambda name, m: name in ("blocks.1", "blocks.2"))
    _assert_same_state(model.state_dict(), before)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in dense.named_parameters()]
    b0, b1 = model.blocks[0], model.blocks[1]
    assert type(b0.attn) is Attention and type(b0.norm1) is nn.LayerNorm
    assert isinstance(b1.attn, SBPSelfAttention) and isinstance(b1.mlp, SBPMlp)
    assert all(isinstance(getattr(b1, a), SBPTokenwise) for a in ("norm1", "ls1", "norm2", "ls2"))
    assert b1.norm1.weight is norm_weight and b1.norm1.module.weight is norm_weight
    assert type(model.head) is nn.Linear and type(model.patch_embed.proj) is nn.Conv2d

    x = torch.randn(4, 3, 16, 16)
    for _ in range(4):
        spy.clear()
        out = model(x)
        torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
        # 2 blocks x (norm1, attn, ls1, norm2, mlp, ls2): one set, grid over the 4x4 patches
        # (a checkerboard) with the class token always kept.
        assert len(spy) == 12 and all(k is spy[0] for k in spy)
        keep = spy[0]
        assert keep[0] == 0 and keep.numel() == 1 + 8
        rows, cols = (keep[1:] - 1) // 4, (keep[1:] - 1) % 4
        assert ((rows + cols) % 2 == (rows[0] + cols[0]) % 2).all()


def test_vit_full_ratio_gradients_equal_dense():
    model = VisionTransformer(depth=2)
    dense = copy.deepcopy(model)
    sbp_kernels.convert(model, keep_ratio=1.0)
    x = torch.randn(2, 3, 16, 16)
    got, want = _grads(model, x), _grads(dense, x)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_vit_block_branch_gradients_vanish_on_dropped_tokens():
    block = Block(32, 4, init_values=0.5)
    sbp_kernels.convert(block)  # standalone: the block opens its own step
    leaves = {}

    def cut(name):  # the branch's input as a leaf, so its gradient is the branch's alone
        def hook(module, args):
            leaves[name] = args[0].detach().requires_grad_()
            return (leaves[name],)
        return hook

    block.norm1.register_forward_pre_hook(cut("attn"))
    block.norm2.register_forward_pre_hook(cut("mlp"))
    keep = torch.tensor([0, 2, 5, 6, 9])
    with sbp_kernels.step(keep_idx=keep):
        block(torch.randn(2, 10, 32)).sum().backward()
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    for leaf in leaves.values():
        assert (leaf.grad[:, dropped] == 0).all() and (leaf.grad[:, keep] != 0).all()


def test_timm_attention_and_mlp_alone():
    model = nn.Sequential(Attention(32, 4), Mlp(32, 64), Mlp(32, 64, drop=0.1))
    dense = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="not converted as a whole"):
        sbp_kernels.convert(model)
    assert isinstance(model[0], SBPSelfAttention) and isinstance(model[1], SBPMlp)
    assert type(model[2]) is Mlp and isinstance(model[2].fc1, SBPLinear)  # dropout: converted piecewise
    _assert_same_state(model.state_dict(), dense.state_dict())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(model[:2](x), dense[:2](x), atol=1e-5, rtol=1e-5)
    model.eval(), dense.eval()
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_convnext_block_pixels_are_positions():
    block = ConvNeXtBlock(16)
    dense = copy.deepcopy(block)
    keys = list(block.state_dict())
    sbp_kernels.convert(block)
    assert list(block.state_dict()) == keys
    assert isinstance(block.mlp, SBPChannelsLastMlp) and isinstance(block.norm, SBPTokenwise)
    assert block.norm.channels_last and type(block.conv_dw) is nn.Conv2d
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(block(x), dense(x), atol=1e-5, rtol=1e-5)

    leaves = {}

    def cut(name):
        def hook(module, args, out):
            leaves[name] = out.detach().requires_grad_()
            return leaves[name]
        return hook

    block.conv_dw.register_forward_hook(cut("sbp"))
    dense.conv_dw.register_forward_hook(cut("dense"))
    keep = torch.tensor([0, 7, 8, 13, 20, 35])
    dropped = torch.ones(36, dtype=torch.bool)
    dropped[keep] = False
    grad_out = torch.randn(2, 16, 6, 6)
    masked = grad_out.clone().flatten(2)
    masked[:, :, dropped] = 0
    with sbp_kernels.step(keep_idx=keep):
        block(x).backward(grad_out)
    dense(x).backward(masked.view_as(grad_out))
    grad = leaves["sbp"].grad.flatten(2)
    assert (grad[:, :, dropped] == 0).all() and (grad[:, :, keep] != 0).all()
    # The branch after conv_dw is pixel-wise: its SBP gradients are the dense ones for the output
    # gradient zeroed on dropped pixels.
    torch.testing.assert_close(leaves["sbp"].grad, leaves["dense"].grad, atol=1e-5, rtol=1e-5)
    for name in ("mlp.fc1.weight", "mlp.fc2.bias", "norm.weight"):
        torch.testing.assert_close(block.get_parameter(name).grad, dense.get_parameter(name).grad,
                                   atol=1e-5, rtol=1e-5)


def test_convnext_keep_set_is_a_pixel_grid(spy):
    block = sbp_kernels.convert(ConvNeXtBlock(8))
    block(torch.randn(1, 8, 4, 6)).sum().backward()
    assert len(spy) == 2 and spy[0] is spy[1]
    keep = spy[0]
    rows, cols = keep // 6, keep % 6
    assert keep.numel() == 12 and ((rows + cols) % 2 == (rows[0] + cols[0]) % 2).all()
    conv_mlp = ConvNeXtBlock(8, conv_mlp=True)
    conv_mlp.norm = nn.GroupNorm(1, 8)  # any NCHW norm: stays as it is
    conv_mlp.mlp = nn.Sequential(nn.Conv2d(8, 16, 1), nn.GELU(), nn.Conv2d(16, 8, 1))
    sbp_kernels.convert(conv_mlp)
    assert isinstance(conv_mlp.mlp[0], SBPConv1x1) and type(conv_mlp.conv_dw) is nn.Conv2d


def test_tokenwise_wrapper_keeps_the_module_contract():
    norm = nn.LayerNorm(8)
    wrapped = SBPTokenwise(norm)
    assert list(wrapped.state_dict()) == ["weight", "bias"] and wrapped.weight is norm.weight
    assert wrapped.eps == norm.eps and wrapped.normalized_shape == (8,)
    assert repr(wrapped).startswith("SBPTokenwise(LayerNorm((8,)")
    wrapped.double()
    assert norm.weight.dtype == torch.float64
    wrapped.load_state_dict({"weight": torch.full((8,), 2.0), "bias": torch.zeros(8)})
    assert (norm.weight == 2).all()
    wrapped.eval()
    assert not norm.training
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.equal(wrapped(x), norm(x))
    with pytest.raises(ValueError, match="in place"):
        SBPTokenwise(LayerScale(8, inplace=True))
    # A converted model deep-copies and pickles (the hooks too), and the copy is independent.
    model = sbp_kernels.convert(VisionTransformer(depth=1))
    clone = copy.deepcopy(model)
    assert clone.blocks[0].norm1.weight is not model.blocks[0].norm1.weight
    assert clone.blocks[0].norm1.weight is clone.blocks[0].norm1.module.weight
    pickle.loads(pickle.dumps(model))(torch.randn(1, 3, 16, 16)).sum().backward()
    assert all(isinstance(m, SBPModule) for m in (clone.blocks[0].attn, clone.blocks[0].norm1))
