"""sbp.layer_norm and sbp.rms_norm (DESIGN.md 3.5): the forward is the models' own, bit for bit;
the kept-rows backward equals dense autograd with the output gradient zeroed on dropped rows."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import (
    TOL, assert_close, assert_grads_close, dropped, keep_mask, keep_set, masked_dense_grads, sbp_grads,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [((2,), 21, 16, 0.5), ((2, 3), 7, 5, 0.25), ((), 9, 8, 1.0), ((3,), 40, 6, 0.01)]


def llama_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward (also Qwen2/3, Mistral), operation for operation."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def gemma_rms_norm(x, weight, eps):
    """transformers' GemmaRMSNorm.forward: the scale (1 + weight) applied in float32."""
    output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def rms_formula(weight_offset):
    """The RMSNorm math in the inputs' dtype (float64 for the oracle)."""

    def fn(x, weight):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y if weight is None else y * (weight + weight_offset)

    return fn


# --- rms_norm --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_rms_norm_forward_is_bitwise_the_models(dtype, form):
    x = torch.randn(3, 17, 64, dtype=dtype) * 3
    weight = torch.randn(64, dtype=dtype)
    keep = keep_set(17, 0.5)
    for requires_grad in (False, True):
        leaf = x.clone().requires_grad_(requires_grad)
        if form == "llama":
            out = sbp_kernels.rms_norm(leaf, weight, keep, 1e-6)
            expected = llama_rms_norm(x, weight, 1e-6)
        else:
            out = sbp_kernels.rms_norm(leaf, weight, keep, 1e-6, weight_offset=1.0, scale_in_float=True)
            expected = gemma_rms_norm(x, weight, 1e-6)
        assert out.dtype == expected.dtype == dtype
        assert torch.equal(out, expected)


def test_rms_norm_llama_float32_weight_on_half_input():
    """A float32 weight on a bfloat16 activation: the output promotes as the model's does."""
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32, requires_grad=True)
    keep = torch.tensor([0, 4, 8])
    out = sbp_kernels.rms_norm(x, weight, keep)
    expected = llama_rms_norm(x.detach(), weight.detach(), 1e-6)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    dy = torch.randn(2, 9, 32)
    out.backward(dy)
    _, ref = masked_dense_grads(rms_formula(0.0), [x, weight], dy, keep, -2)
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert_grads_close([x.grad, weight.grad], ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["llama", "gemma", "no_weight"])
def test_rms_norm_matches_masked_dense(dtype, form):
    offset, in_float = (1.0, True) if form == "gemma" else (0.0, False)
    for lead, n, c, r in SHAPES:
        x = torch.randn(*lead, n, c, dtype=dtype)
        weight = None if form == "no_weight" else torch.randn(c, dtype=dtype) * 0.5
        dy = torch.randn(*lead, n, c, dtype=dtype)
        keep = keep_set(n, r, seed=c)
        out, grads = sbp_grads(
            lambda x, w: sbp_kernels.rms_norm(x, w, keep, 1e-6, offset, in_float), [x, weight], dy
        )
        _, ref = masked_dense_grads(rms_formula(offset), [x, weight], dy, keep, -2)
        assert_grads_close(grads, ref, dtype)
        assert not grads[0][..., dropped(keep, n), :].any()


@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_rms_norm_r1_equals_dense_autograd_float64(form):
    """Both formulas normalise in float32 (x.to(torch.float32), also for a float64 x), and so does
    the kept-rows backward: at r = 1 the gradients agree to float32 rounding."""
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    weight = torch.randn(24, dtype=torch.float64)
    dy = torch.randn_like(x)
    if form == "llama":
        out, grads = sbp_grads(lambda x, w: sbp_kernels.rms_norm(x, w, torch.arange(13)), [x, weight], dy)
        ref_out, ref = sbp_grads(lambda x, w: llama_rms_norm(x, w, 1e-6), [x, weight], dy)
    else:
        out, grads = sbp_grads(
            lambda x, w: sbp_kernels.rms_norm(x, w, torch.arange(13), weight_offset=1.0, scale_in_float=True),
            [x, weight], dy,
        )
        ref_out, ref = sbp_grads(lambda x, w: gemma_rms_norm(x, w, 1e-6), [x, weight], dy)
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


# --- layer_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_layer_norm_matches_masked_dense(dtype, affine):
    for lead, n, c, r in SHAPES:
        x = torch.randn(*lead, n, c, dtype=dtype) * 2 + 1
        weight = None if affine == "none" else torch.randn(c, dtype=dtype)
        bias = torch.randn(c, dtype=dtype) if affine == "weight_bias" else None
        dy = torch.randn(*lead, n, c, dtype=dtype)
        keep = keep_set(n, r, seed=n)
        out, grads = sbp_grads(lambda *t: sbp_kernels.layer_norm(*t, keep, 1e-5), [x, weight, bias], dy)
        _, ref = masked_dense_grads(lambda x, w, b: F.layer_norm(x, (c,), w, b, 1e-5), [x, weight, bias], dy, keep, -2)
        assert torch.equal(out, F.layer_norm(x, (c,), weight, bias, 1e-5))
        assert_grads_close(grads, ref, dtype)
        assert not grads[0][..., dropped(keep, n), :].any()


def test_layer_norm_r1_equals_dense_autograd_float64():
    x = torch.randn(3, 11, 20, dtype=torch.float64)
    weight, bias = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    dy = torch.randn_like(x)
    out, grads = sbp_grads(lambda *t: sbp_kernels.layer_norm(*t, torch.arange(11), 1e-6), [x, weight, bias], dy)
    ref_out, ref = sbp_grads(lambda x, w, b: F.layer_norm(x, (20,), w, b, 1e-6), [x, weight, bias], dy)
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref):
        assert torch.equal(g, r)


# (x, weight, bias) requires_grad flags
@pytest.mark.parametrize(
    "flags", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_frozen_weights_and_inputs_get_no_gradient(flags, op):
    x, weight, bias = torch.randn(2, 10, 8), torch.randn(8), torch.randn(8)
    keep = keep_set(10, 0.5)
    if op == "rms_norm":
        flags, bias = flags[:2], None
        if not any(flags):
            return  # nothing of rms_norm's takes a gradient in that case
    leaves = [t.clone().requires_grad_(f) for t, f in zip((x, weight, bias), flags)]
    dy = torch.randn(2, 10, 8)
    if op == "layer_norm":
        sbp_kernels.layer_norm(*leaves, keep).backward(dy)
        _, ref = masked_dense_grads(lambda x, w, b: F.layer_norm(x, (8,), w, b), [x, weight, bias], dy, keep, -2)
    else:
        sbp_kernels.rms_norm(*leaves, keep).backward(dy)
        _, ref = masked_dense_grads(rms_formula(0.0), [x, weight], dy, keep, -2)
    for leaf, flag, expected in zip(leaves, flags, ref):
        if flag:
            assert_close(leaf.grad, expected, torch.float32)
        else:
            assert leaf.grad is None


def test_layer_norm_under_autocast_computes_as_dense():
    """Under autocast the forward is F.layer_norm's under the same autocast (dtype and values), and
    the gradient reaches the half-precision input on kept rows only, close to dense autograd's."""
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    keep = torch.tensor([1, 2, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sbp_kernels.layer_norm(x, weight, bias, keep)
        dense = F.layer_norm(x, (8,), weight, bias)
    assert out.dtype == dense.dtype
    torch.testing.assert_close(out, dense, atol=0, rtol=0)
    grad = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad)
    x_dense = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.layer_norm(x_dense, (8,), weight, bias).backward(grad * keep_mask(keep, 6, 1, 3).to(grad.dtype))
    assert x.grad.dtype == torch.bfloat16 and not x.grad[:, dropped(keep, 6)].any()
    torch.testing.assert_close(x.grad, x_dense.grad, **TOL[torch.bfloat16])


# --- shared: meta tensors, keep sets from inference mode, int32 -------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_outputs(requires_grad):
    x = torch.empty(2, 5, 4, device="meta", requires_grad=requires_grad)
    weight, bias = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    keep = torch.tensor([0, 3], device="meta")
    for out in (
        sbp_kernels.layer_norm(x, weight, bias, keep),
        sbp_kernels.rms_norm(x, weight, keep),
        sbp_kernels.rms_norm(x, weight, keep, weight_offset=1.0, scale_in_float=True),
        sbp_kernels.rms_norm(x, None, keep),
    ):
        assert out.device.type == "meta" and out.shape == (2, 5, 4)


@pytest.mark.parametrize("keep_dtype", [torch.int64, torch.int32])
def test_keep_idx_from_inference_mode_and_int32(keep_dtype):
    with torch.inference_mode():
        keep = torch.tensor([0, 2, 3], dtype=keep_dtype)
    long_keep = torch.tensor([0, 2, 3])
    x, weight, bias = torch.randn(2, 5, 4), torch.randn(4), torch.randn(4)
    dy = torch.randn(2, 5, 4)
    _, grads = sbp_grads(lambda *t: sbp_kernels.layer_norm(*t, keep), [x, weight, bias], dy)
    _, ref = masked_dense_grads(lambda x, w, b: F.layer_norm(x, (4,), w, b), [x, weight, bias], dy, long_keep, -2)
    assert_grads_close(grads, ref, torch.float32)
    _, grads = sbp_grads(lambda *t: sbp_kernels.rms_norm(*t, keep), [x, weight], dy)
    _, ref = masked_dense_grads(rms_formula(0.0), [x, weight], dy, long_keep, -2)
    assert_grads_close(grads, ref, torch.float32)
