"""SBPMultiheadAttention and SBPSelfAttention vs the dense modules they replace."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn.attention import SBPMultiheadAttention, SBPSelfAttention

TOL = dict(atol=1e-5, rtol=1e-5)


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (fused path), as timm writes it."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def _mha(batch_first, bias=True):
    return nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first)


def _x(batch_first, n=13):
    x = torch.randn(2, n, 32)
    return x if batch_first else x.transpose(0, 1).contiguous()


def _grads(module, x, call):
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = call(module, x)
    out.backward(torch.ones_like(out) + torch.arange(out.numel()).reshape(out.shape).sin())
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


def _mha_call(module, x):
    return module(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_from_module_eval_and_no_grad_equal_dense(batch_first, bias):
    dense = _mha(batch_first, bias).eval()
    sbp = SBPMultiheadAttention.from_module(dense)
    assert not sbp.training
    x = _x(batch_first)
    torch.testing.assert_close(sbp(x, x, x)[0], dense(x, x, x)[0], atol=0, rtol=0)
    torch.testing.assert_close(sbp(x, x, x)[1], dense(x, x, x)[1], atol=0, rtol=0)
    sbp.train()
    dense.train()
    with torch.no_grad():
        torch.testing.assert_close(_mha_call(sbp, x), _mha_call(dense, x), atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_training_forward_equals_dense_and_grads_at_r1(batch_first):
    dense = _mha(batch_first).train()
    x = _x(batch_first)
    sbp = SBPMultiheadAttention.from_module(dense, keep_ratio=1.0)
    assert sbp.training
    out, dx, grads = _grads(sbp, x, _mha_call)
    ref_out, ref_dx, ref_grads = _grads(dense, x, _mha_call)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL)
    sbp.keep_ratio = 0.5
    out, _, _ = _grads(sbp, x, _mha_call)  # sampled keep set: the forward is still exact
    torch.testing.assert_close(out, ref_out, **TOL)


def test_mha_causal_hint_and_unbatched_input():
    dense = _mha(True).train()
    sbp = SBPMultiheadAttention.from_module(dense, keep_ratio=1.0)
    x = torch.randn(2, 9, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(9)

    def call(m, x):
        return m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the causal hint runs the SBP path: no fallback warning
        out, dx, grads = _grads(sbp, x, call)
    ref_out, ref_dx, ref_grads = _grads(dense, x, call)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL)
    x1 = torch.randn(9, 32)  # unbatched (L, E)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_mha_call(sbp, x1), _mha_call(dense, x1), **TOL)


def test_mha_keep_idx_override_drops_gradients():
    dense = _mha(True).train()
    sbp = SBPMultiheadAttention.from_module(dense)
    x = torch.randn(2, 13, 32, requires_grad=True)
    keep = torch.tensor([0, 3, 4, 9, 12])
    out = sbp(x, x, x, need_weights=False, keep_idx=keep)[0]
    out.sum().backward()
    dropped = torch.ones(13, dtype=torch.bool).index_fill(0, keep, False)
    assert not x.grad[:, dropped].any() and x.grad[:, keep].abs().sum() > 0
    torch.testing.assert_close(out, dense(x, x, x, need_weights=False)[0], **TOL)


def test_mha_state_dict_round_trip():
    dense = _mha(True, bias=True)
    sbp = SBPMultiheadAttention(32, 4, batch_first=True, keep_ratio=0.25)
    assert sbp.state_dict().keys() == dense.state_dict().keys()
    sbp.load_state_dict(dense.state_dict())
    other = _mha(True)
    other.load_state_dict(sbp.state_dict())
    for key, value in dense.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
        assert torch.equal(sbp.state_dict()[key], value)


def test_mha_fallbacks_warn_once_and_match_dense():
    dense = _mha(True).train()
    sbp = SBPMultiheadAttention.from_module(dense)
    x = torch.randn(2, 7, 32)
    with pytest.warns(UserWarning, match="need_weights") as record:
        out, weights = sbp(x, x, x)
        sbp(x, x, x)
    assert len([w for w in record if "need_weights" in str(w.message)]) == 1
    ref_out, ref_weights = dense(x, x, x)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[:, -1] = True
    with pytest.warns(UserWarning, match="key_padding_mask"):
        out = sbp(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(out, dense(x, x, x, key_padding_mask=padding, need_weights=False)[0])
    y = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match="cross-attention"):
        sbp(x, y, y, need_weights=False)


def test_mha_bad_settings():
    with pytest.raises(ValueError, match="keep_ratio"):
        SBPMultiheadAttention(32, 4, keep_ratio=0.0)
    with pytest.raises(ValueError, match="strategy"):
        SBPMultiheadAttention(32, 4, strategy="checker")
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SBPMultiheadAttention.from_module(nn.Linear(3, 3))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_self_attention_from_module_equal_dense(qk_norm):
    dense = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm)
    sbp = SBPSelfAttention.from_module(dense, keep_ratio=1.0)
    assert sbp.state_dict().keys() == dense.state_dict().keys()
    x = torch.randn(2, 11, 32)
    for training in (False, True):
        dense.train(training)
        sbp.train(training)
        torch.testing.assert_close(sbp(x), dense(x), **TOL)
    out, dx, grads = _grads(sbp, x, lambda m, x: m(x))
    ref_out, ref_dx, ref_grads = _grads(dense, x, lambda m, x: m(x))
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL)
    sbp.keep_ratio = 0.5
    torch.testing.assert_close(sbp(x), dense(x), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(sbp(x), dense(x), **TOL)


def test_self_attention_state_dict_round_trip_and_keep_idx():
    dense = TimmAttention(32, num_heads=2)
    sbp = SBPSelfAttention(32, num_heads=2)
    sbp.load_state_dict(dense.state_dict())
    dense.load_state_dict(sbp.state_dict())
    assert set(sbp.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    x = torch.randn(2, 10, 32, requires_grad=True)
    keep = torch.tensor([1, 5, 6])
    sbp(x, keep_idx=keep).sum().backward()
    dropped = torch.ones(10, dtype=torch.bool).index_fill(0, keep, False)
    assert not x.grad[:, dropped].any() and x.grad[:, keep].abs().sum() > 0


def test_self_attention_saves_less():
    dense = TimmAttention(64, num_heads=2, qkv_bias=True)
    sbp = SBPSelfAttention.from_module(dense, keep_ratio=0.5)
    x = torch.randn(2, 256, 64, requires_grad=True)
    params = sum(p.numel() * p.element_size() for p in dense.parameters())
    with saved_bytes() as dense_saved:
        dense(x)
    with saved_bytes() as sbp_saved:
        sbp(x)
    # Dense: x, the qkv projection, the attention output (which SDPA and proj share). SBP: the
    # kept rows of each, plus the kept attention output twice (attention's o_K and proj's input
    # rows are separate gathers): 6/10 of dense at r = 0.5.
    assert sbp_saved.bytes - params <= 0.61 * (dense_saved.bytes - params)


def test_self_attention_mask_falls_back_once():
    dense = TimmAttention(32, num_heads=4)
    sbp = SBPSelfAttention.from_module(dense)
    x = torch.randn(2, 6, 32)
    mask = torch.randn(6, 6)
    with pytest.warns(UserWarning, match="attn_mask") as record:
        out = sbp(x, attn_mask=mask)
        sbp(x, attn_mask=mask)
    assert len(record) == 1
    torch.testing.assert_close(out, dense(x, attn_mask=mask), **TOL)


def test_self_attention_bad_module():
    with pytest.raises(TypeError, match="qkv"):
        SBPSelfAttention.from_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="num_heads"):
        SBPSelfAttention(30, num_heads=4)
