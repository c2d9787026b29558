"""Triton backend of sbp.linear_cross_entropy vs the torch backend and a float64 dense oracle
(DESIGN.md 3.6).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with 16 x 16 x 16 tiles,
so the shapes are small and odd: vocab not a multiple of the tile (several vocab splits in the
forward, a partial last tile), one kept row, ignore_index rows kept and dropped, and the backward's
vocabulary chunks made small so that several run, the last one partial. fp32 is compared tightly,
fp16 loosely (its logits are rounded to fp16 like F.linear's, dlogits are stored in fp16 for the two
products). GPU-only tests (bf16, which the interpreter lacks) skip without one.
"""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from conftest import HAS_CUDA, requires_cuda
from helpers import dropped

triton_ce = pytest.importorskip("sbp_kernels.triton.cross_entropy", reason="needs triton")
from sbp_kernels.triton import gemm  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# (loss, gradients) tolerances against the torch backend and the float64 oracle
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=2e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=5e-2),
}
# (lead, n, c, vocab, kept positions)
SHAPES = [
    ((2,), 13, 20, 37, (0, 3, 4, 9, 12)),
    ((3,), 7, 5, 23, (4,)),  # one kept row
    ((), 9, 33, 17, tuple(range(9))),  # every row kept, h without a batch dim
    ((2, 2), 6, 16, 50, (1, 5)),
]


def _inputs(lead, n, c, vocab, dtype, bias, ignore_index=-100):
    h = torch.randn(*lead, n, c, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, c, device=DEVICE) / c**0.5).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype) if bias else None
    target = torch.randint(0, vocab, (*lead, n), device=DEVICE)
    target.view(-1)[1::3] = ignore_index  # ignored rows, kept and dropped
    return h, w, b, target


def _run(backend, inputs, target, keep, flags=(True, True, True), grad_loss=0.7, **kwargs):
    """(loss, [grad_h, grad_w, grad_b]) of the op; None for an input without a gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(f) for t, f in zip(inputs, flags)]
    h, w, b = leaves
    loss = sbp_kernels.linear_cross_entropy(h, w, target, keep, b, backend=backend, **kwargs)
    loss.backward(torch.tensor(grad_loss, dtype=loss.dtype, device=DEVICE))
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _oracle(inputs, target, keep, ignore_index=-100, reduction="mean", grad_scale=1.0, grad_loss=0.7):
    """float64 dense autograd with dL/dlogits zero on dropped rows (their logits detached)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    h, w, b = leaves
    logits = F.linear(h, w, b)
    kept = ~dropped(keep, h.shape[-2]).to(DEVICE)
    logits = torch.where(kept[:, None], logits, logits.detach())
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    (loss * grad_scale * grad_loss).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_torch_backend_and_dense_oracle(dtype, reduction, bias, chunks, monkeypatch):
    if chunks == "several":  # 16 classes per backward chunk: 2-4 chunks, the last one partial
        monkeypatch.setattr(triton_ce, "_CHUNK_ELEMENTS", 16)
    for lead, n, c, vocab, kept in SHAPES:
        inputs = _inputs(lead, n, c, vocab, dtype, bias)
        target, keep = inputs[3], torch.tensor(kept, device=DEVICE)
        kwargs = dict(reduction=reduction, grad_scale=2.0)
        loss, grads = _run("triton", inputs[:3], target, keep, **kwargs)
        ref_loss, ref_grads = _run("torch", inputs[:3], target, keep, **kwargs)
        dense_loss, dense_grads = _oracle(inputs[:3], target, keep, reduction=reduction, grad_scale=2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
        torch.testing.assert_close(loss.double(), dense_loss, **TOL[dtype])
        for g, ref, dense, t in zip(grads, ref_grads, dense_grads, inputs):
            assert (g is None) == (t is None)
            if g is not None:
                assert g.dtype == dtype and g.shape == t.shape
                torch.testing.assert_close(g, ref, **TOL[dtype])
                torch.testing.assert_close(g.double(), dense, **TOL[dtype])
        assert not grads[0][..., dropped(keep, n).to(DEVICE), :].any()  # exact zeros on dropped rows


def test_custom_ignore_index_in_range_and_all_kept_rows_ignored():
    """ignore_index may be a class; kept rows whose target is ignored take no gradient; "mean"
    divides by the targets that are not ignored over ALL rows."""
    inputs = _inputs((2,), 11, 9, 21, torch.float32, True, ignore_index=2)
    target = inputs[3]
    keep = torch.tensor([1, 4, 7], device=DEVICE)
    target[:, keep] = 2  # every kept row ignored: zero gradients, the loss still over the other rows
    loss, grads = _run("triton", inputs[:3], target, keep, ignore_index=2)
    dense_loss, dense_grads = _oracle(inputs[:3], target, keep, ignore_index=2)
    torch.testing.assert_close(loss.double(), dense_loss, **TOL[torch.float32])
    assert all(not g.any() for g in grads)
    target[:, 4] = 5
    loss, grads = _run("triton", inputs[:3], target, keep, ignore_index=2)
    dense_loss, dense_grads = _oracle(inputs[:3], target, keep, ignore_index=2)
    torch.testing.assert_close(loss.double(), dense_loss, **TOL[torch.float32])
    for g, dense in zip(grads, dense_grads):
        torch.testing.assert_close(g.double(), dense, **TOL[torch.float32])


# (h, weight, bias) requires_grad flags
@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (True, True, True)])
def test_frozen_weight_launches_no_weight_gemm(flags, monkeypatch):
    """A frozen LM head (LoRA fine-tuning): no dW product; an h without grad: no dh kernel."""
    launched = []
    for kernel in (gemm._weight_gemm_kernel, triton_ce._dh_kernel):
        monkeypatch.setattr(kernel, "run", lambda *a, kernel=kernel, run=kernel.run, **k: launched.append(kernel)
                            or run(*a, **k))
    monkeypatch.setattr(triton_ce, "_CHUNK_ELEMENTS", 16)  # several chunks
    inputs = _inputs((2,), 12, 8, 40, torch.float32, True)
    keep = torch.tensor([0, 5, 6, 11], device=DEVICE)
    _, grads = _run("triton", inputs[:3], inputs[3], keep, flags=flags)
    _, dense_grads = _oracle(inputs[:3], inputs[3], keep)
    for g, flag, dense in zip(grads, flags, dense_grads):
        assert (g is not None) == flag
        if flag:
            torch.testing.assert_close(g.double(), dense, **TOL[torch.float32])
    chunks = -(-40 // triton_ce._chunk_width(2 * 4, 40))  # 3 of 16 classes under the interpreter
    assert launched.count(gemm._weight_gemm_kernel) == (chunks if flags[1] else 0)
    assert launched.count(triton_ce._dh_kernel) == (chunks if flags[0] else 0)


def test_forward_kernel_splits_and_lse():
    """The forward's vocab splits (3 under the interpreter, one per 16-class tile) give every row's
    exact lse, and the loss of a target outside the vocabulary is NaN (never a silently finite
    number)."""
    h, w, b, target = _inputs((2,), 13, 20, 37, torch.float32, True)
    loss, lse = triton_ce.forward(h, w, target, b, -100, "sum")
    logits = F.linear(h.double(), w.double(), b.double())
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits.reshape(-1, 37), target.reshape(-1),
                                                              reduction="sum"), atol=1e-4, rtol=1e-5)
    target[0, 2] = 37
    assert triton_ce.forward(h, w, target, b, -100, "sum")[0].isnan()


@pytest.mark.parametrize("row_tiles, vocab_tiles, splits", [(64, 1002, 2), (128, 1002, 1), (32, 1002, 4),
                                                            (2, 3, 3), (200, 1002, 7), (5000, 1002, 1)])
def test_vocab_splits_fill_whole_waves(row_tiles, vocab_tiles, splits):
    """Llama heads at 4 x 2048 tokens: 64 row tiles of 128 rows take 2 splits (128 programs of 132)."""
    assert triton_ce._vocab_splits(row_tiles, vocab_tiles, 132) == splits
    programs = row_tiles * splits
    assert splits == vocab_tiles or programs >= 0.95 * 132 * -(-programs // 132)


def test_strided_inputs_int32_keep_idx_and_determinism():
    """h, weight and bias read in place through their strides (views of larger tensors)."""
    bases = [torch.randn(20, 2, 11, device=DEVICE), torch.randn(30, 18, device=DEVICE), torch.randn(60, device=DEVICE)]
    target = torch.randint(0, 30, (2, 20), device=DEVICE)
    keep = torch.tensor([0, 7, 8, 19], device=DEVICE)

    def views(h, w, b):
        return h.transpose(0, 1)[..., :9], w[:, ::2], b[::2]

    results = []
    for keep_idx in (keep.int(), keep):
        leaves = [t.clone().requires_grad_() for t in bases]
        inputs = views(*leaves)
        assert not any(t.is_contiguous() for t in inputs)
        loss = sbp_kernels.linear_cross_entropy(*inputs[:2], target, keep_idx, inputs[2], backend="triton")
        loss.backward(torch.tensor(0.7, device=DEVICE))
        results.append([loss.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*results))  # the same bits, run after run
    dense_loss, dense_grads = _oracle(views(*bases), target, keep)
    torch.testing.assert_close(results[0][0].double(), dense_loss, **TOL[torch.float32])
    for g, dense in zip(views(*results[0][1:]), dense_grads):
        torch.testing.assert_close(g.double(), dense, **TOL[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_behaves_as_the_dense_op(reduction):
    h, w, b, target = _inputs((0,), 5, 4, 7, torch.float32, True)
    keep = torch.tensor([1, 3], device=DEVICE)
    loss, grads = _run("triton", (h, w, b), target, keep, reduction=reduction)
    dense = F.cross_entropy(F.linear(h, w, b).reshape(-1, 7), target.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss, dense, equal_nan=True)  # mean of nothing: NaN, as F.cross_entropy
    assert grads[0].shape == h.shape and not grads[1].any() and not grads[2].any()


def test_refusals_and_no_grad():
    h, w, _, target = _inputs((2,), 5, 4, 7, torch.float64, False)
    keep = torch.tensor([1, 3], device=DEVICE)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        sbp_kernels.linear_cross_entropy(h.requires_grad_(), w, target, keep, backend="triton")
    with pytest.raises(ValueError, match="no classes or no channels"):
        sbp_kernels.linear_cross_entropy(h.float()[..., :0], w.float()[:, :0], target, keep, backend="triton")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="no bfloat16"):
            sbp_kernels.linear_cross_entropy(h.bfloat16(), w.bfloat16(), target, keep, backend="triton")
    with torch.no_grad():  # no graph: the forward alone, on the backend asked for
        loss = sbp_kernels.linear_cross_entropy(h.float(), w.float(), target, keep, backend="triton")
    torch.testing.assert_close(loss.double(), F.cross_entropy(F.linear(h, w).reshape(-1, 7), target.reshape(-1)),
                               **TOL[torch.float32])


def test_opcheck_triton_ops():
    h, w, b, target = _inputs((2,), 5, 16, 19, torch.float32, True)
    keep = torch.tensor([1, 3, 4], device=DEVICE)
    for bias in (b, None):
        torch.library.opcheck(torch.ops.sbp.linear_cross_entropy_forward_triton.default,
                              (h, w, target, bias, -100, "mean"))
    _, lse = triton_ce.forward(h, w, target, b, -100, "mean")
    scale = torch.tensor([0.25], device=DEVICE)
    args = (h[:, keep].contiguous(), w, b, target[:, keep], lse[:, keep].contiguous(), keep, scale, 5, -100)
    for needs in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.sbp.linear_cross_entropy_backward_triton.default, args + (needs,))


def test_compile_fullgraph_triton_backend():
    h, w, b, target = _inputs((2,), 9, 16, 21, torch.float32, True)
    keep = torch.tensor([0, 2, 3, 8], device=DEVICE)

    def f(h, w, b):
        return sbp_kernels.linear_cross_entropy(h, w, target, keep, b, grad_scale=2.0, backend="triton")

    eager, compiled = ([t.clone().requires_grad_() for t in (h, w, b)] for _ in range(2))
    loss = f(*eager)
    loss.backward()
    torch._dynamo.reset()
    compiled_loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, atol=1e-6, rtol=1e-6)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, a.grad, atol=1e-6, rtol=1e-6)


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_on_gpu_matches_torch_backend(reduction, monkeypatch):
    """bf16 (the LM-head dtype) on tiles of the GPU configs, three backward chunks (2048, 2048, 904
    classes): errors relative to the largest gradient entry, both backends rounding like bf16 GEMMs."""
    monkeypatch.setattr(triton_ce, "_CHUNK_ELEMENTS", 300 * 2048)
    inputs = _inputs((2,), 300, 256, 5000, torch.bfloat16, True)
    keep = torch.randperm(300, device=DEVICE)[:150].sort().values
    loss, grads = _run("triton", inputs[:3], inputs[3], keep, reduction=reduction)
    ref_loss, ref_grads = _run("torch", inputs[:3], inputs[3], keep, reduction=reduction)
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16 and g.shape == ref.shape
        assert (g.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
