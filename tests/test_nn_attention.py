"""SBPMultiheadAttention vs the nn.MultiheadAttention it converts (in place: convert swaps the class)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import sbp_kernels
from sbp_kernels.nn.attention import SBPMultiheadAttention

TOL = dict(atol=1e-5, rtol=1e-5)


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


def _converted(dense, **settings):
    """A converted deep copy of dense (dense itself stays the reference)."""
    return sbp_kernels.convert(copy.deepcopy(dense), **settings)


def _mha_call(module, x):
    return module(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_converted_eval_and_no_grad_equal_dense(batch_first, bias):
    dense = _mha(batch_first, bias).eval()
    sbp = _converted(dense)
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
    sbp = _converted(dense, keep_ratio=1.0)
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
    sbp = _converted(dense, keep_ratio=1.0)
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
    sbp = _converted(dense)
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
    sbp = _converted(dense)
    x = torch.randn(2, 7, 32)
    with pytest.warns(UserWarning, match="need_weights") as record:
        out, weights = sbp(x, x, x)
        sbp(x, x, x)
    assert len([w for w in record if "need_weights" in str(w.message)]) == 1
    ref_out, ref_weights = dense(x, x, x)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)
    y = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match="cross-attention"):
        sbp(x, y, y, need_weights=False)


def test_mha_bad_settings():
    with pytest.raises(ValueError, match="keep_ratio"):
        SBPMultiheadAttention(32, 4, keep_ratio=0.0)
    with pytest.raises(ValueError, match="strategy"):
        SBPMultiheadAttention(32, 4, strategy="checker")



@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_run_sbp_and_equal_dense(batch_first):
    """key_padding_mask (bool and additive) and attn_mask (bool, additive, per head) run the SBP
    path: forward equal to dense, gradients at r = 1 equal dense."""
    dense = _mha(batch_first).train()
    sbp = _converted(dense, keep_ratio=1.0)
    x = _x(batch_first, n=9)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, -3:] = True
    bool_mask = torch.rand(9, 9) > 0.8
    bool_mask.fill_diagonal_(False)
    cases = [
        dict(key_padding_mask=padding),
        dict(key_padding_mask=torch.zeros(2, 9).masked_fill(padding, float("-inf"))),
        dict(attn_mask=bool_mask),
        dict(attn_mask=torch.randn(9, 9)),
        dict(attn_mask=torch.randn(2 * 4, 9, 9), key_padding_mask=torch.zeros(2, 9).masked_fill(padding, float("-inf"))),
    ]
    for kwargs in cases:
        def call(m, x):
            return m(x, x, x, need_weights=False, **kwargs)[0]

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            out, dx, grads = _grads(sbp, x, call)
        ref_out, ref_dx, ref_grads = _grads(dense, x, call)
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(dx, ref_dx, **TOL)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_attention_dropout_draws_the_dense_mask(batch_first):
    dense = nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=batch_first).train()
    sbp = _converted(dense, keep_ratio=0.5)
    x = _x(batch_first)
    torch.manual_seed(3)
    out = _mha_call(sbp, x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, _mha_call(dense, x), **TOL)
