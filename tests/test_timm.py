"""sbp_kernels.convert on real timm models (DESIGN.md sections 2 and 5): ViT, DeiT (distilled),
DINOv2 with registers and layer scale, EVA02, BEiT, ConvNeXt (both MLP forms) and Swin, in tiny
configurations (pretrained=False), against timm itself; the saved-bytes figures at full size.

timm is required: without it this module skips, and with SBP_REQUIRE_MODEL_LIBS=1 (CI) it errors
(conftest.require).
"""
import collections
import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import require

import sbp_kernels
from sbp_kernels import keepset
from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn import SBPModule, restore
from sbp_kernels.sampling import Windowed, keep_count, sample_keep_indices, sample_windowed

timm = require("timm")


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the families --------------------------------------------------------------------------------

_TOKEN_DROPS = dict(drop_rate=0.2, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.2)


@dataclasses.dataclass
class Family:
    arch: str
    kwargs: dict
    img: int  # the side of the images the tests feed
    kind: str  # "tokens" (ViT-like: prefix tokens + patch grid), "convnext", "swin"
    drops: dict  # every dropout / drop-path rate the family has, > 0
    exact: bool = True  # train forward bitwise equal to dense (else within 1e-6: another attention kernel)
    block_parts: tuple = ()  # per block: the attribute paths ("" the block itself) convert makes SBP
    dense_warnings: tuple = ()  # (module name, words of the reason): one warning each, no other
    branch_inputs: tuple = ()  # per block: the modules whose input is a branch's input


FAMILIES = {
    "vit_tiny": Family(
        "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, "tokens", _TOKEN_DROPS,
        block_parts=("norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
    ),
    # ViT-B's layout at a tiny width; dynamic image size: the layout comes from the call (48 px, 6x6).
    "vit_base": Family(
        "vit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                                     dynamic_img_size=True), 48, "tokens", _TOKEN_DROPS,
        block_parts=("norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
    ),
    "deit_distilled": Family(  # class and distillation tokens
        "deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, "tokens", _TOKEN_DROPS,
        block_parts=("norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
    ),
    "dinov2_reg": Family(  # class + 4 register tokens, layer scale
        "vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2, embed_dim=64, num_heads=2), 56, "tokens",
        _TOKEN_DROPS, block_parts=("norm1", "attn", "ls1", "norm2", "mlp", "ls2"), branch_inputs=("norm1", "norm2"),
    ),
    "eva02": Family(  # rope, SwiGLU with a norm inside, F.linear on the qkv weight
        "eva02_tiny_patch14_224", dict(img_size=56, depth=2), 56, "tokens", _TOKEN_DROPS,
        block_parts=("", "norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
    ),
    "beit": Family(  # q / v biases, relative position bias, layer scale gamma_1 / gamma_2
        "beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32, "tokens",
        _TOKEN_DROPS, exact=False,  # a bias that needs grad: SDPA runs its math kernel
        block_parts=("", "norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
    ),
    "convnext": Family(  # channels-last Mlp with timm's GELU, layer scale gamma
        "convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)), 64, "convnext",
        dict(drop_rate=0.2, drop_path_rate=0.2), block_parts=("", "norm", "mlp"), branch_inputs=("norm",),
        dense_warnings=tuple((f"stages.{i}.downsample", "trunk") for i in (1, 2, 3)),
    ),
    "convnext_conv_mlp": Family(  # LayerNorm2d and 1x1-conv MLP on [B, C, H, W]
        "convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), conv_mlp=True), 64, "convnext",
        dict(drop_rate=0.2, drop_path_rate=0.2), block_parts=("", "norm", "mlp"), branch_inputs=("norm",),
        dense_warnings=tuple((f"stages.{i}.downsample", "trunk") for i in (1, 2, 3)),
    ),
    # 16x16, 8x8 (shifted windows in the second block of both), 4x4 and 2x2 maps, 4x4 windows.
    "swin": Family(
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=4, depths=(2, 2, 1, 1), embed_dim=24, num_heads=(1, 2, 2, 4), drop_path_rate=0.0),
        64, "swin", dict(drop_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.2),
        exact=False,  # timm's unfused window attention runs fused while SBP is active
        block_parts=("", "norm1", "attn", "norm2", "mlp"), branch_inputs=("norm1", "norm2"),
        dense_warnings=tuple((f"layers.{i}.downsample", "patch merging") for i in (1, 2, 3)),
    ),
}
NAMES = sorted(FAMILIES)
BLOCK_CLASSES = (
    "timm.models.vision_transformer.Block", "timm.models.eva.EvaBlock", "timm.models.beit.Block",
    "timm.models.convnext.ConvNeXtBlock", "timm.models.swin_transformer.SwinTransformerBlock",
)


def _build(name, **overrides):
    f = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(f.arch, pretrained=False, num_classes=5, **{**f.kwargs, **overrides})


def _images(name, batch=2, seed=0):
    side = FAMILIES[name].img
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _convert(model, **kwargs):
    """sbp_kernels.convert, returning the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sbp_kernels.convert(model, **kwargs)
    return [str(w.message) for w in caught]


def _blocks(model):
    """(qualified name, block) of the model's blocks, in forward order."""
    return [
        (n, m) for n, m in model.named_modules()
        if any(f"{c.__module__}.{c.__qualname__}" in BLOCK_CLASSES for c in type(m).__mro__)
    ]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(got, want):
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _assert_forward_equal(got, want, exact):
    if exact:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _loss(out, seed=3):
    """A loss whose gradient differs from position to position: sum(out * w), w fixed."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * w).sum()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _prefix_and_grid(model, x):
    """(number of prefix tokens, patch grid) of a ViT-like model called on x."""
    embed = model.patch_embed
    grid = tuple(embed.grid_size)
    if getattr(model, "dynamic_img_size", False):
        grid = (x.shape[-2] // embed.patch_size[0], x.shape[-1] // embed.patch_size[1])
    return model.num_prefix_tokens, grid


class _KeepSpy:
    """Every keep set keepset.keep_idx_for hands out, with the block whose forward asked for it."""

    def __init__(self, monkeypatch, model):
        self.calls = []  # (block name or None, n, keep_idx)
        self._block = []
        real = keepset.keep_idx_for

        def keep_idx_for(n, *args, **kwargs):
            keep = real(n, *args, **kwargs)
            self.calls.append((self._block[-1] if self._block else None, n, keep.clone()))
            return keep

        monkeypatch.setattr(keepset, "keep_idx_for", keep_idx_for)
        for name, block in _blocks(model):
            block.register_forward_pre_hook(lambda m, a, name=name: self._block.append(name))
            block.register_forward_hook(self._leave, always_call=True)

    def _leave(self, module, args, output):
        self._block.pop()

    def by_block(self):
        """{block: {n: [keep sets, in order]}}."""
        out = collections.defaultdict(lambda: collections.defaultdict(list))
        for block, n, keep in self.calls:
            out[block][n].append(keep)
        return out

    def sets(self, n):
        return [keep for _, m, keep in self.calls if m == n]


def _one_set(keeps):
    assert keeps
    for keep in keeps[1:]:
        assert torch.equal(keep, keeps[0])
    return keeps[0]


def _rows(t, positions):
    """t with its positions on dim 1: [B, n, C] from [B, n, C], [B, H, W, C] or [B, C, H, W]."""
    if positions == "channels_first":
        return t.flatten(2).transpose(1, 2)
    return t.flatten(1, -2)


def _branch_positions(name, block, part):
    if FAMILIES[name].kind == "convnext":
        return "channels_first" if block.use_conv_mlp else "channels_last"
    return "rows"


# --- conftest.require ----------------------------------------------------------------------------


def test_require_skips_without_ci_flag_and_fails_with_it(monkeypatch):
    missing = "sbp_kernels_no_such_library"
    monkeypatch.delenv("SBP_REQUIRE_MODEL_LIBS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require(missing)
    monkeypatch.setenv("SBP_REQUIRE_MODEL_LIBS", "1")
    with pytest.raises(ImportError, match="SBP_REQUIRE_MODEL_LIBS"):
        require(missing)
    assert require("timm") is timm


# --- conversion: what is converted, what stays dense -----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_defaults_converts_every_block_part_and_warns_once_per_dense_module(name):
    f = FAMILIES[name]
    model = _build(name)
    modules, params = [id(m) for m in model.modules()], [id(p) for p in model.parameters()]
    messages = _convert(model)  # default arguments
    # in place: the same module and Parameter objects
    assert [id(m) for m in model.modules()] == modules and [id(p) for p in model.parameters()] == params
    blocks = _blocks(model)
    assert blocks
    for block_name, block in blocks:
        for part in f.block_parts:
            m = block.get_submodule(part)
            assert isinstance(m, SBPModule), f"{block_name}.{part} ({type(m).__name__}) was not converted"
            assert m.keep_ratio == 0.5 and m.strategy == "auto"
    # One warning per module left dense, naming it and why; none otherwise.
    assert len(messages) == len(f.dense_warnings), messages
    for module, reason in f.dense_warnings:
        named = [msg for msg in messages if f" {module} (" in msg]
        assert len(named) == 1 and reason in named[0] and "stays dense" in named[0], (module, messages)
        assert not any(isinstance(m, SBPModule) for m in model.get_submodule(module).modules())
    # Running it warns about nothing more, and neither does converting again.
    x = _images(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(model(x)).backward()
        model.eval()
        model(x)
    assert [str(w.message) for w in caught] == []
    assert _convert(model) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_converted_module_is_called_and_runs_sbp(name, monkeypatch):
    """No converted module is bypassed by the model's forward; each one asks for a keep set (itself
    or through the SBP modules inside it), unless all its inputs were [batch, features] (a
    classifier head, which has no positions)."""
    model = _build(name)
    _convert(model)
    converted = {m: n for n, m in model.named_modules() if isinstance(m, SBPModule)}
    calls, flat_only, asked = collections.Counter(), collections.defaultdict(lambda: True), set()
    for m in converted:
        def hook(m, args, kwargs, out):
            calls[m] += 1
            x = args[0] if args else next(iter(kwargs.values()))
            flat_only[m] &= x.dim() == 2
        m.register_forward_hook(hook, with_kwargs=True)
    real = SBPModule._keep_idx

    def _keep_idx(self, *args, **kwargs):
        asked.add(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SBPModule, "_keep_idx", _keep_idx)
    _loss(model(_images(name))).backward()
    assert [n for m, n in converted.items() if calls[m] == 0] == []
    # a block mixin (SBPEvaBlock without layer scale) asks through the SBP parts inside it
    silent = [n for m, n in converted.items()
              if not flat_only[m] and not any(sub in asked for sub in m.modules())]
    assert silent == []


# --- exact forward ----------------------------------------------------------------------------------


def _drop_cases():
    for name in NAMES:
        yield pytest.param(name, "none", id=f"{name}-no_dropout")
        yield pytest.param(name, "dropout", id=f"{name}-dropout_and_drop_path")
        if "attn_drop_rate" in FAMILIES[name].drops:
            yield pytest.param(name, "attention", id=f"{name}-attention_dropout_too")


@pytest.mark.parametrize("name, drops", list(_drop_cases()))
def test_train_forward_equals_dense_under_the_same_seed(name, drops):
    """Bitwise equal, but where the converted model runs another attention kernel: with a bias that
    needs grad (BEiT), timm's unfused path (Swin) or attention dropout (the sbp op computes the
    dropped probabilities as exp(s - lse), SDPA's math path as softmax(s)): within 1e-6."""
    f = FAMILIES[name]
    rates = {} if drops == "none" else dict(f.drops)
    if drops == "dropout":
        rates.pop("attn_drop_rate", None)
    model = _build(name, **rates)
    dense = copy.deepcopy(model)
    _convert(model)
    x = _images(name)
    for seed in (1, 2):  # two steps: two keep sets, the same dropout masks as dense
        torch.manual_seed(seed)
        got = model(x)
        torch.manual_seed(seed)
        want = dense(x)
        assert got.requires_grad
        _assert_forward_equal(got, want, f.exact and drops != "attention")
        _loss(got).backward()
    if rates:  # the rates are live: another seed gives another output
        torch.manual_seed(3)
        assert not torch.allclose(dense(x), want)


@pytest.mark.parametrize("name", NAMES)
def test_eval_and_no_grad_are_exactly_dense(name):
    f = FAMILIES[name]
    model = _build(name, **f.drops)
    dense = copy.deepcopy(model)
    _convert(model)
    x = _images(name)
    model.eval(), dense.eval()
    assert torch.equal(model(x), dense(x))
    model.train(), dense.train()
    with torch.no_grad():
        torch.manual_seed(4)
        got = model(x)
        torch.manual_seed(4)
        assert torch.equal(got, dense(x))


# --- state ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_unchanged_and_loads_both_ways(name):
    model = _build(name)
    before = _state(model)
    _convert(model)
    _assert_same_state(model.state_dict(), before)

    torch.manual_seed(7)
    f = FAMILIES[name]
    other = timm.create_model(f.arch, pretrained=False, num_classes=5, **f.kwargs)  # other weights
    other_state = _state(other)
    assert any(not torch.equal(other_state[k], before[k]) for k in before)
    # converted <- dense
    model.load_state_dict(other_state)
    _assert_same_state(model.state_dict(), other_state)
    x = _images(name)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    # dense <- converted
    model.load_state_dict(before)
    other.load_state_dict(model.state_dict())
    _assert_same_state(other.state_dict(), before)


@pytest.mark.parametrize("name", NAMES)
def test_convert_again_applies_the_new_settings(name, monkeypatch):
    model = _build(name)
    _convert(model, keep_ratio=0.5)
    converted = [m for m in model.modules() if isinstance(m, SBPModule)]
    assert _convert(model, keep_ratio=0.25, strategy="random") == []  # no second warning
    assert [m for m in model.modules() if isinstance(m, SBPModule)] == converted
    assert [m for m in converted if m.keep_ratio != 0.25 or m.strategy != "random"] == []
    spy = _KeepSpy(monkeypatch, model)
    x = _images(name)
    model(x).sum().backward()
    kind = FAMILIES[name].kind
    if kind == "tokens":
        prefix, grid = _prefix_and_grid(model, x)
        n = prefix + math.prod(grid)
        assert len(_one_set(spy.sets(n))) == prefix + keep_count(math.prod(grid), 0.25)
    else:  # the first stage's pixels (convnext: 16 x 16; swin: 4 x 4 windows on 16 x 16)
        keep = _one_set([k for block, n, k in spy.calls if n == 256])
        want = keep_count(256, 0.25) if kind == "convnext" else 16 * keep_count(16, 0.25)
        assert len(keep) == want


@pytest.mark.parametrize("name", NAMES)
def test_restore_gives_the_timm_classes_back(name):
    model = _build(name)
    dense = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    state = _state(model)
    _convert(model)
    assert any(isinstance(m, SBPModule) for m in model.modules())
    assert restore(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert not any(isinstance(m, SBPModule) for m in model.modules())
    _assert_same_state(model.state_dict(), state)
    x = _images(name)
    torch.manual_seed(1)
    got = model(x)
    torch.manual_seed(1)
    assert torch.equal(got, dense(x))


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_deep_copies_and_pickles(name):
    model = _build(name)
    _convert(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    x = _images(name)
    results = []
    for m in [model] + copies:
        assert [type(a) for a in m.modules()] == [type(b) for b in model.modules()]
        _assert_same_state(m.state_dict(), model.state_dict())
        m.zero_grad(set_to_none=True)
        with sbp_kernels.step(generator=torch.Generator().manual_seed(0)):
            out = m(x)
            _loss(out).backward()
        results.append((out.detach(), _grads(m)))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert grads.keys() == results[0][1].keys()
        for k in grads:
            assert torch.equal(grads[k], results[0][1][k]), k
    # the copies open their own step at each forward: one keep set per position count
    for m in copies:
        _loss(m(x)).backward()


# --- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_full_keep_ratio_gradients_equal_dense(name):
    """keep_ratio=1 (float64, every dropout on, the same seed): the dense model's gradients."""
    f = FAMILIES[name]
    model = _build(name, **f.drops).double()
    dense = copy.deepcopy(model)
    _convert(model, keep_ratio=1.0)
    results = []
    for m in (model, dense):
        x = _images(name).double().requires_grad_()
        torch.manual_seed(5)
        out = m(x)
        _loss(out).backward()
        results.append((out, x.grad, _grads(m)))
    (out, dx, grads), (want_out, want_dx, want_grads) = results
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(dx, want_dx, **tol)
    assert grads.keys() == want_grads.keys() == {n for n, p in model.named_parameters()}
    for k in want_grads:
        torch.testing.assert_close(grads[k], want_grads[k], **tol, msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_half_keep_ratio_one_keep_set_per_step_and_branch_gradients_vanish_on_dropped_rows(name, monkeypatch):
    """At r = 0.5: inside one step every SBP layer of a block uses the block's keep set (and, but for
    Swin's shifted windows, every block the same one per position count); a branch's input gets
    exactly zero gradient on dropped rows, a nonzero one on every kept row."""
    f = FAMILIES[name]
    model = _build(name)
    _convert(model, keep_ratio=0.5)
    spy = _KeepSpy(monkeypatch, model)
    branch_grads = {}
    for block_name, block in _blocks(model):
        for part in f.branch_inputs:
            def pre(m, args, key=(block_name, part)):
                x = args[0].clone()  # the gradient reaching x is the branch's alone
                x.register_hook(lambda g: branch_grads.__setitem__(key, g))
                return (x,) + args[1:]
            block.get_submodule(part).register_forward_pre_hook(pre)
    x = _images(name)
    _loss(model(x)).backward()

    per_block = spy.by_block()
    blocks = _blocks(model)
    assert set(per_block) == {n for n, _ in blocks}  # asked only inside the blocks
    stage_sets = {}
    for i, (block_name, block) in enumerate(blocks):
        sets = {n: _one_set(keeps) for n, keeps in per_block[block_name].items()}
        if f.kind != "swin":
            for n, keep in sets.items():  # one step, one keep set per position count
                assert torch.equal(stage_sets.setdefault(n, keep), keep)
        for part in f.branch_inputs:
            g = _rows(branch_grads[(block_name, part)], _branch_positions(name, block, part))
            keep = sets[g.shape[1]]
            kept = torch.zeros(g.shape[1], dtype=torch.bool).index_fill(0, keep, True)
            row_norm = g.abs().sum(dim=(0, 2))
            assert torch.all(row_norm[~kept] == 0), (block_name, part)
            if i < len(blocks) - 1:
                assert torch.all(row_norm[kept] > 0), (block_name, part)
            else:  # the head may read some tokens only (the class token)
                assert torch.any(row_norm[kept] > 0), (block_name, part)
            assert 0 < kept.sum() < g.shape[1]


# --- keep sets -------------------------------------------------------------------------------------


def _checkerboard(keep, grid):
    h, w = grid
    y, x = keep // w, keep % w
    return len(keep) == keep_count(h * w, 0.5) and len(set(((y + x) % 2).tolist())) == 1


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].kind == "tokens"])
def test_prefix_tokens_always_kept_and_patches_on_a_grid(name, monkeypatch):
    model = _build(name)
    _convert(model)
    spy = _KeepSpy(monkeypatch, model)
    x = _images(name)
    prefix, grid = _prefix_and_grid(model, x)
    assert prefix == {"deit_distilled": 2, "dinov2_reg": 5}.get(name, 1)
    n = prefix + math.prod(grid)
    phases = set()
    for _ in range(16):  # steps draw fresh keep sets; the prefix tokens are in every one
        spy.calls.clear()
        model(x).sum().backward()
        keep = _one_set(spy.sets(n))
        assert keep[:prefix].tolist() == list(range(prefix))
        assert _checkerboard(keep[prefix:] - prefix, grid), keep
        phases.add(tuple(keep.tolist()))
    assert len(phases) == 2  # both checkerboard colours come up


@pytest.mark.parametrize("name", ["vit_tiny", "dinov2_reg"])
def test_prefix_tokens_kept_inside_a_users_step(name, monkeypatch):
    """A step of the user's own (another keep ratio, a generator of its own): the prefix tokens are
    still in every keep set, the patches still on a grid."""
    model = _build(name)
    _convert(model)
    spy = _KeepSpy(monkeypatch, model)
    x = _images(name)
    prefix, grid = _prefix_and_grid(model, x)
    for seed in range(8):
        spy.calls.clear()
        with sbp_kernels.step(keep_ratio=0.5, generator=torch.Generator().manual_seed(seed)):
            model(x).sum().backward()
        keep = _one_set(spy.sets(prefix + math.prod(grid)))
        assert keep[:prefix].tolist() == list(range(prefix))
        assert _checkerboard(keep[prefix:] - prefix, grid), keep


@pytest.mark.parametrize("name", ["vit_tiny", "eva02"])
def test_prefix_tokens_kept_under_patch_dropout(name, monkeypatch):
    """With timm's patch dropout the token count is not the patch grid's: the class token is still
    in every keep set."""
    model = _build(name, patch_drop_rate=0.5)
    _convert(model)
    spy = _KeepSpy(monkeypatch, model)
    x = _images(name)
    prefix, grid = _prefix_and_grid(model, x)
    n = prefix + math.prod(grid) // 2
    for _ in range(16):
        spy.calls.clear()
        model(x).sum().backward()
        assert keep_count(n, 0.5) <= len(_one_set(spy.sets(n)))
        assert _one_set(spy.sets(n))[:prefix].tolist() == list(range(prefix))


@pytest.mark.parametrize("name", ["convnext", "convnext_conv_mlp"])
def test_convnext_keep_sets_are_pixel_grids_per_stage(name, monkeypatch):
    model = _build(name)
    _convert(model)
    spy = _KeepSpy(monkeypatch, model)
    model(_images(name)).sum().backward()
    sides = (16, 8, 4, 2)  # 64 px: stem / 4, then / 2 per stage
    assert sorted({n for _, n, _ in spy.calls}) == sorted(s * s for s in sides)
    for s in sides:
        assert _checkerboard(_one_set(spy.sets(s * s)), (s, s))


def _window_ids(block, h, w):
    """[windows, positions of a window]: the map position each window row holds after the block's
    cyclic shift and window partition (as SwinTransformerBlock._attn lays them out)."""
    ids = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)
    shift = tuple(block.shift_size)
    if any(shift):
        ids = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    wh, ww = block.window_size
    ids = ids.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    return ids.long()


def test_swin_keep_sets_are_window_periodic_and_reach_the_attention_after_the_shift(monkeypatch):
    model = _build("swin")
    _convert(model)
    spy = _KeepSpy(monkeypatch, model)
    attn_grads, shapes = {}, {}
    blocks = _blocks(model)
    assert any(any(b.shift_size) for _, b in blocks)  # shifted windows are tested
    for name, block in blocks:
        def pre_block(m, args, name=name):
            shapes[name] = args[0].shape[1:3]
        block.register_forward_pre_hook(pre_block)

        def pre(m, args, kwargs, name=name):
            x = args[0].clone()
            x.register_hook(lambda g: attn_grads.__setitem__(name, g))
            return (x,) + args[1:], kwargs
        block.attn.register_forward_pre_hook(pre, with_kwargs=True)
    _loss(model(_images("swin"))).backward()
    per_block = spy.by_block()
    for name, block in blocks:
        h, w = shapes[name]
        wh, ww = block.window_size
        keep = _one_set(per_block[name][h * w])
        mask = torch.zeros(h * w, dtype=torch.bool).index_fill(0, keep, True).view(h, w)
        # window-periodic: the same pattern in every window, keep_count of a window's positions
        tile = mask[:wh, :ww]
        assert torch.equal(mask, tile.repeat(h // wh, w // ww)), name
        assert int(tile.sum()) == keep_count(wh * ww, 0.5)
        # the rows of the windows the attention gets a gradient for are exactly the kept pixels
        g = attn_grads[name]  # [B * windows, wh * ww, C]
        has_grad = g.abs().sum(dim=-1).view(-1, (h // wh) * (w // ww), wh * ww).sum(0) > 0
        ids = _window_ids(block, h, w)
        assert torch.equal(ids[has_grad].sort().values, keep), name


# --- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_in_ten_adamw_steps(name):
    model = _build(name)
    _convert(model, keep_ratio=0.5)
    x = _images(name, batch=4)
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter learns, the relative position bias tables included
            assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
            tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
            assert len(tables) == {"beit": 2, "swin": 6}.get(name, 0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # 0.45x or less for every family


# --- torch.compile ----------------------------------------------------------------------------------


def _fixed_keep_sets(name, model, x):
    """{position count: keep set} for every position count the model's blocks see, drawn with a
    seeded generator as the package lays them out (prefix tokens kept, patch / pixel grids, Swin's
    window-periodic sets)."""
    shapes = []
    hooks = [b.register_forward_pre_hook(lambda m, a: shapes.append((m, a[0].shape))) for _, b in _blocks(model)]
    with torch.no_grad():
        model.eval()(x)
    model.train()
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(11)
    fixed = {}
    for block, shape in shapes:
        kind = FAMILIES[name].kind
        if kind == "tokens":
            _, grid = _prefix_and_grid(model, x)
            fixed[shape[1]] = keepset.draw(shape[1], 0.5, "grid", grid, gen)  # prefix tokens first, all kept
        elif kind == "convnext":
            fixed[shape[2] * shape[3]] = sample_keep_indices(tuple(shape[2:]), 0.5, "grid", gen)
        else:
            h, w = shape[1:3]
            fixed.setdefault(h * w, sample_windowed(Windowed((h, w), tuple(block.window_size)), 0.5, "grid", gen))
    return fixed


_ONE_BLOCK_PER_STAGE = {"tokens": dict(depth=1), "convnext": dict(depths=(1, 1, 1, 1)),
                        "swin": dict(depths=(2, 1, 1, 1))}  # Swin: a shifted block in the first stage


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_with_fixed_keep_sets_equals_eager(name):
    model = _build(name, **_ONE_BLOCK_PER_STAGE[FAMILIES[name].kind])  # compiling takes seconds a block
    dense = copy.deepcopy(model)
    _convert(model, keep_ratio=0.5)
    x = _images(name)
    fixed = _fixed_keep_sets(name, model, x)
    if FAMILIES[name].kind != "tokens":
        assert len(fixed) == 4  # one keep set per stage size
    y = torch.tensor([0, 1])

    def loss_fn(m):
        return lambda x: F.cross_entropy(m(x), y)

    results = []
    torch._dynamo.reset()
    runs = ((model, loss_fn(model)), (model, torch.compile(loss_fn(model), fullgraph=True, backend="aot_eager")),
            (dense, loss_fn(dense)))
    for m, fn in runs:
        m.zero_grad(set_to_none=True)
        with sbp_kernels.step(keep_idx=fixed):
            loss = fn(x)
            loss.backward()
        results.append((loss.detach(), _grads(m)))
    (eager, eager_grads), (compiled, compiled_grads), (_, dense_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for k in eager_grads:
        torch.testing.assert_close(compiled_grads[k], eager_grads[k], atol=1e-6, rtol=1e-5, msg=k)
    # the keep sets were used: SBP gradients, not the dense ones
    assert any(not torch.allclose(eager_grads[k], dense_grads[k]) for k in eager_grads)



def test_compiled_model_takes_a_new_keep_set_each_step_without_recompiling():
    """A compiled converted model is traced once: each training step's keep sets (new tensors,
    new values, the same sizes) are inputs of the one graph, so the Python of the SBP modules and
    ops runs at trace time only, not per step (issue 14: compile removes the host cost)."""
    name = "vit_tiny"
    model = _build(name, **_ONE_BLOCK_PER_STAGE["tokens"])
    _convert(model, keep_ratio=0.5)
    x = _images(name)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    (n,) = _fixed_keep_sets(name, model, x)
    for seed in range(3):
        keep = keepset.draw(n, 0.5, "grid", _prefix_and_grid(model, x)[1], torch.Generator().manual_seed(seed))
        with sbp_kernels.step(keep_idx=keep):
            out = compiled(x)
            out.sum().backward()
        with sbp_kernels.step(keep_idx=keep):
            torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)
    assert len(graphs) == 1

# --- memory (full size) -----------------------------------------------------------------------------

MEMORY = {  # (timm model, extra kwargs, most saved bytes at r = 0.5 as a fraction of dense)
    "vit_base_patch16": ("vit_base_patch16_224", {}, 0.45),
    "deit_small_patch16": ("deit_small_patch16_224", {}, 0.45),
    "dinov2_small_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=224), 0.47),
    "eva02_tiny": ("eva02_tiny_patch14_224", {}, 0.50),
    "beit_base": ("beit_base_patch16_224", {}, 0.50),
    "convnext_tiny": ("convnext_tiny", {}, 0.45),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}, 0.60),
}


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_saved_bytes_of_the_whole_model_at_half_keep_ratio(name, record_property):
    """Saved-for-backward bytes (parameters excluded) of the whole model, every block converted,
    r = 0.5, 224 px, batch 2, against the dense model."""
    arch, kwargs, bound = MEMORY[name]
    torch.set_num_threads(2)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    x = torch.randn(2, 3, 224, 224)
    params = list(model.parameters())
    with saved_bytes() as dense:
        out = model(x)
    del out
    _convert(model, keep_ratio=0.5)
    with saved_bytes() as sbp:
        out = model(x)
    del out
    ratio = sbp.bytes_excluding(params) / dense.bytes_excluding(params)
    record_property("saved_bytes_ratio", round(ratio, 4))
    assert ratio <= bound, f"{name}: {ratio:.3f}x dense > {bound}"


def _block_saved_bytes(model, block, x, params):
    """Saved-for-backward bytes (parameters excluded) of one block during a whole-model forward
    (the step, layout and always-kept class token are the model's own)."""
    context, counted = saved_bytes(), []

    def enter(*_):
        counted.append(context.__enter__())

    def leave(*_):
        context.__exit__(None, None, None)

    hooks = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    model(x)
    for hook in hooks:
        hook.remove()
    return counted[0].bytes_excluding(params)


def test_vit_base_block_saves_its_attention_output_once():
    """A ViT-B/16 block at r = 0.5 (the class token and 98 of the 196 patches kept) saves, per kept
    token: the kept rows of the two LayerNorm inputs and of the qkv and fc1 inputs, q_K, k_K, v_K,
    ONE o_K (the projection's input is the same storage), the fc1 output's kept rows, lse_K; and
    the keep set. Exact bytes, and <= 0.40x of the dense block."""
    torch.set_num_threads(2)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    x = torch.randn(2, 3, 224, 224)
    params = list(model.parameters())
    dense = _block_saved_bytes(model, model.blocks[5], x, params)
    _convert(model, keep_ratio=0.5)
    sbp = _block_saved_bytes(model, model.blocks[5], x, params)
    batch, kept, dim, heads = 2, 1 + 98, 768, 12
    rows = 4 * dim + 4 * dim + 4 * dim  # LN1 / qkv / LN2 / fc1 inputs, q k v o, fc1 output (3072)
    assert sbp == batch * kept * rows * 4 + batch * heads * kept * 4 + kept * 8
    assert sbp / dense <= 0.40, sbp / dense
