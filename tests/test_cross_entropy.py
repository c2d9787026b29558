"""sbp.linear_cross_entropy (DESIGN.md 3.6): the loss is F.cross_entropy over ALL rows (ignore_index,
mean and sum), computed in chunks; gradients are dense autograd's with dL/dlogits zeroed on
dropped rows, times grad_scale."""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from helpers import R1_TOL, TOL, backward_flops, dropped, keep_set
from sbp_kernels.ops import cross_entropy as ce_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (lead, n, c, vocab, r)
SHAPES = [((2,), 13, 8, 37, 0.5), ((2, 2), 6, 5, 11, 0.25), ((), 9, 4, 7, 1.0), ((3,), 20, 6, 9, 0.01)]


def _inputs(lead, n, c, vocab, dtype, bias, ignore_index=-100):
    h = torch.randn(*lead, n, c, dtype=dtype)
    w = torch.randn(vocab, c, dtype=dtype) / c**0.5
    b = torch.randn(vocab, dtype=dtype) if bias else None
    target = torch.randint(0, vocab, (*lead, n))
    target.view(-1)[::4] = ignore_index  # ignored rows, kept and dropped
    return h, w, b, target


def dense_loss(target, keep, ignore_index, reduction):
    """F.cross_entropy of the logits over all rows; the logits of dropped rows are detached, so
    dL/dlogits is zero there."""
    n = target.shape[-1]

    def fn(h, w, b):
        logits = F.linear(h, w, b)
        logits = torch.where((~dropped(keep, n))[:, None], logits, logits.detach())
        return F.cross_entropy(logits.reshape(-1, w.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                               reduction=reduction)

    return fn


def loss_and_grads(fn, inputs, grad_loss, dtype=None):
    leaves = [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.backward(torch.tensor(grad_loss, dtype=loss.dtype))
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize(
    "dtype, chunked", [(torch.float32, False), (torch.float32, True), (torch.float16, True), (torch.bfloat16, False)],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_match_dense(dtype, reduction, chunked, monkeypatch):
    if chunked:  # a few rows per chunk: several chunks, the last one partial
        monkeypatch.setattr(ce_op, "_CHUNK_ELEMENTS", 3 * 37)
    for (lead, n, c, vocab, r), bias in zip(SHAPES, (True, False, True, False)):
        h, w, b, target = _inputs(lead, n, c, vocab, dtype, bias)
        keep = keep_set(n, r, seed=n)

        def sbp(h, w, b):
            return sbp_kernels.linear_cross_entropy(h, w, target, keep, b, reduction=reduction, grad_scale=2.0)

        loss, grads = loss_and_grads(sbp, [h, w, b], 0.7)
        dense = F.cross_entropy(F.linear(h, w, b).float().reshape(-1, vocab), target.reshape(-1), reduction=reduction)
        assert loss.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)  # as HF's
        torch.testing.assert_close(loss.float(), dense, **({} if dtype == torch.float32 else TOL[dtype]))
        _, ref = loss_and_grads(dense_loss(target, keep, -100, reduction), [h, w, b], 0.7 * 2.0, torch.float64)
        for g, e in zip(grads, ref):
            assert (g is None) == (e is None)
            if e is not None:
                assert g.dtype == dtype and g.shape == e.shape
                torch.testing.assert_close(g.double(), e, **TOL[dtype])
        assert not grads[0][..., dropped(keep, n), :].any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_r1_equals_dense_autograd_float64(reduction):
    h, w, b, target = _inputs((2,), 15, 6, 23, torch.float64, True)
    keep = torch.arange(15)

    def sbp(h, w, b):
        return sbp_kernels.linear_cross_entropy(h, w, target, keep, b, reduction=reduction)

    def dense(h, w, b):
        return F.cross_entropy(F.linear(h, w, b).reshape(-1, 23), target.reshape(-1), reduction=reduction)

    loss, grads = loss_and_grads(sbp, [h, w, b], 1.0)
    ref_loss, ref = loss_and_grads(dense, [h, w, b], 1.0)
    torch.testing.assert_close(loss, ref_loss, **R1_TOL)
    for g, e in zip(grads, ref):
        torch.testing.assert_close(g, e, **R1_TOL)


def test_custom_ignore_index_and_ignored_kept_rows():
    """ignore_index may be a class index; kept rows whose target is ignored get no gradient, and
    "mean" divides by the targets that are not ignored over ALL rows."""
    h, w, b, target = _inputs((2,), 8, 4, 6, torch.float64, False, ignore_index=2)
    target[:, 1] = 2
    keep = torch.tensor([1, 4, 6])
    loss, grads = loss_and_grads(lambda h, w: sbp_kernels.linear_cross_entropy(h, w, target, keep, ignore_index=2),
                                 [h, w], 1.0)
    dense = F.cross_entropy(F.linear(h, w).reshape(-1, 6), target.reshape(-1), ignore_index=2)
    torch.testing.assert_close(loss, dense, **R1_TOL)
    _, ref = loss_and_grads(dense_loss(target, keep, 2, "mean"), [h, w, None], 1.0)
    torch.testing.assert_close(grads[0], ref[0], **R1_TOL)
    torch.testing.assert_close(grads[1], ref[1], **R1_TOL)
    assert not grads[0][:, 1].any()


# (h, weight, bias) requires_grad flags
@pytest.mark.parametrize(
    "flags", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
def test_frozen_head_and_input_without_grad(flags):
    """A frozen LM head (LoRA fine-tuning): no dW GEMM; an input without grad: no dh GEMM. The
    backward recomputes the kept rows' logits (one GEMM) either way."""
    lead, n, c, vocab = (2,), 12, 8, 19
    h, w, b, target = _inputs(lead, n, c, vocab, torch.float32, True)
    keep = keep_set(n, 0.5)
    leaves = [t.clone().requires_grad_(f) for t, f in zip((h, w, b), flags)]
    loss = sbp_kernels.linear_cross_entropy(leaves[0], leaves[1], target, keep, leaves[2])
    flops = backward_flops(loss, torch.tensor(1.0))
    _, ref = loss_and_grads(dense_loss(target, keep, -100, "mean"), [h, w, b], 1.0, torch.float64)
    for leaf, flag, expected in zip(leaves, flags, ref):
        if flag:
            torch.testing.assert_close(leaf.grad.double(), expected, **TOL[torch.float32])
        else:
            assert leaf.grad is None
    gemm = 2 * lead[0] * keep.numel() * c * vocab
    assert sum(flops.values()) == gemm * (1 + flags[0] + flags[1])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_outputs(requires_grad):
    h = torch.empty(2, 5, 4, device="meta", requires_grad=requires_grad)
    w, b = torch.empty(7, 4, device="meta"), torch.empty(7, device="meta")
    target = torch.empty(2, 5, dtype=torch.long, device="meta")
    loss = sbp_kernels.linear_cross_entropy(h, w, target, torch.tensor([1, 3], device="meta"), b, reduction="sum")
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("keep_dtype", [torch.int64, torch.int32])
def test_keep_idx_from_inference_mode_and_int32(keep_dtype):
    with torch.inference_mode():
        keep = torch.tensor([0, 3, 4], dtype=keep_dtype)
    h, w, b, target = _inputs((2,), 6, 4, 5, torch.float64, True)
    loss, grads = loss_and_grads(lambda *t: sbp_kernels.linear_cross_entropy(t[0], t[1], target, keep, t[2]),
                                 [h, w, b], 1.0)
    _, ref = loss_and_grads(dense_loss(target, torch.tensor([0, 3, 4]), -100, "mean"), [h, w, b], 1.0)
    for g, e in zip(grads, ref):
        torch.testing.assert_close(g, e, **R1_TOL)


def test_zero_width_hidden():
    """c = 0: the logits are the bias alone, as nn.Linear gives them."""
    h = torch.randn(2, 5, 0, requires_grad=True)
    w, b = torch.randn(7, 0, requires_grad=True), torch.randn(7, requires_grad=True)
    target = torch.randint(0, 7, (2, 5))
    keep = torch.tensor([0, 2])
    loss = sbp_kernels.linear_cross_entropy(h, w, target, keep, b)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w, b).reshape(-1, 7), target.reshape(-1)))
    loss.backward()
    _, ref = loss_and_grads(dense_loss(target, keep, -100, "mean"), [h, w, b], 1.0, torch.float64)
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    torch.testing.assert_close(b.grad.double(), ref[2], **TOL[torch.float32])
