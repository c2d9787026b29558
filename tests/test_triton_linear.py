"""Triton backend of sbp.linear / sbp.pointwise_conv vs the torch reference (DESIGN.md 3.1, 3.2).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, so the
shapes are tiny and odd (n not a multiple of the 16-row interpreter tile, channels 5 / 16 / 33).
Tolerances: fp32 atol = rtol = 1e-4; fp16 atol = rtol = 2e-2 (fp16 inputs rounded alike, sums of
at most ~80 products of unit-scale values, accumulated in fp32 by Triton and by torch on CPU in a
different order). GPU-only tests (bf16, which the interpreter lacks, and H100-sized shapes that
exercise the autotuned tiles) compare errors against an fp32 reference instead.
"""
import pytest
import torch
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels import reference

from conftest import HAS_CUDA, requires_cuda
from helpers import assert_all_close, compiled_and_eager_grads

triton_linear = pytest.importorskip("sbp_kernels.triton.linear", reason="needs triton")
from sbp_kernels.triton import gemm  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _keep(n, n_keep, dtype=torch.int64, device=DEVICE):
    """A sorted random keep set of n_keep positions out of n."""
    return torch.randperm(n)[:n_keep].sort().values.to(device=device, dtype=dtype)


def _grads(fn, inputs, dy):
    """Output of fn(*inputs) and the gradients of <output, dy> w.r.t. the inputs (None if unused)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, dy))
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


# (batch shape, n, n_keep, c_in, c_out, bias, grad_scale)
LINEAR_CASES = [
    ((2,), 1, 1, 5, 16, True, 1.0),
    ((2,), 7, 3, 5, 33, True, 2.0),
    ((1,), 37, 19, 33, 16, False, 0.5),
    ((2, 3), 37, 1, 16, 5, True, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"B{c[0]}-n{c[1]}-k{c[2]}-{c[3]}x{c[4]}")
def test_linear_matches_torch_backend(case, dtype):
    batch, n, n_keep, c_in, c_out, has_bias, grad_scale = case
    x = torch.randn(*batch, n, c_in, device=DEVICE, dtype=dtype)
    weight = torch.randn(c_out, c_in, device=DEVICE, dtype=dtype) / c_in**0.5
    bias = torch.randn(c_out, device=DEVICE, dtype=dtype) if has_bias else None
    dy = torch.randn(*batch, n, c_out, device=DEVICE, dtype=dtype)
    keep = _keep(n, n_keep)
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = _grads(
            lambda x, w, b: sbp_kernels.linear(x, w, b, keep, grad_scale, backend=backend), (x, weight, bias), dy
        )
    y, grads = outs["triton"]
    torch.testing.assert_close(y, F.linear(x, weight, bias), atol=0, rtol=0)  # forward is exact
    assert_all_close(grads, outs["torch"][1], **TOL[dtype])
    dropped = torch.ones(n, dtype=torch.bool, device=DEVICE)
    dropped[keep] = False
    assert (grads[0][..., dropped, :] == 0).all()


def test_linear_int32_keep_idx_and_leading_dims():
    x = torch.randn(2, 3, 37, 16, device=DEVICE)
    weight, bias = torch.randn(33, 16, device=DEVICE), torch.randn(33, device=DEVICE)
    dy = torch.randn(2, 3, 37, 33, device=DEVICE)
    keep64 = _keep(37, 12)
    _, expected = _grads(lambda *t: sbp_kernels.linear(*t, keep64, 3.0, backend="torch"), (x, weight, bias), dy)
    _, actual = _grads(
        lambda *t: sbp_kernels.linear(*t, keep64.int(), 3.0, backend="triton"), (x, weight, bias), dy
    )
    assert_all_close(actual, expected, **TOL[torch.float32])


@pytest.mark.parametrize("n", [1, 7, 37])
def test_linear_keep_all_equals_dense_autograd(n):
    """r = 1: exactly the dense gradients of F.linear."""
    x = torch.randn(2, n, 33, device=DEVICE)
    weight, bias = torch.randn(5, 33, device=DEVICE), torch.randn(5, device=DEVICE)
    dy = torch.randn(2, n, 5, device=DEVICE)
    keep = torch.arange(n, device=DEVICE)
    _, expected = _grads(F.linear, (x, weight, bias), dy)
    _, actual = _grads(lambda *t: sbp_kernels.linear(*t, keep, backend="triton"), (x, weight, bias), dy)
    assert_all_close(actual, expected, **TOL[torch.float32])


def test_linear_non_contiguous_keep_idx():
    """A strided keep_idx view (every other element of a longer tensor) is read as its values."""
    x, weight, bias = torch.randn(2, 9, 16, device=DEVICE), torch.randn(5, 16, device=DEVICE), torch.randn(5, device=DEVICE)
    dy = torch.randn(2, 9, 5, device=DEVICE)
    keep = torch.arange(9, device=DEVICE)[::2]
    assert not keep.is_contiguous()
    _, expected = _grads(lambda *t: sbp_kernels.linear(*t, keep.contiguous(), backend="torch"), (x, weight, bias), dy)
    _, actual = _grads(lambda *t: sbp_kernels.linear(*t, keep, backend="triton"), (x, weight, bias), dy)
    assert_all_close(actual, expected, **TOL[torch.float32])
    torch.testing.assert_close(triton_linear.gather_rows(x, keep, 1), x[:, keep.contiguous()], atol=0, rtol=0)


def test_linear_float64():
    """float64 accumulates in float64 (the GEMM's tl.dot returns float64 for float64 operands)."""
    x = torch.randn(2, 9, 33, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(17, 33, device=DEVICE, dtype=torch.float64)
    bias = torch.randn(17, device=DEVICE, dtype=torch.float64)
    dy = torch.randn(2, 9, 17, device=DEVICE, dtype=torch.float64)
    keep = torch.tensor([0, 4, 5, 8], device=DEVICE)
    _, expected = _grads(lambda *t: sbp_kernels.linear(*t, keep, 2.0, backend="torch"), (x, weight, bias), dy)
    _, actual = _grads(lambda *t: sbp_kernels.linear(*t, keep, 2.0, backend="triton"), (x, weight, bias), dy)
    assert all(g.dtype == torch.float64 for g in actual)
    assert_all_close(actual, expected, atol=1e-10, rtol=1e-10)


def test_linear_sum_backward_reads_expanded_grad():
    """y.sum().backward() hands the backward a stride-0 expanded dy."""
    x, weight = torch.randn(2, 7, 5, device=DEVICE), torch.randn(16, 5, device=DEVICE)
    keep = torch.tensor([0, 4, 6], device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        xl, wl = x.clone().requires_grad_(), weight.clone().requires_grad_()
        sbp_kernels.linear(xl, wl, None, keep, backend=backend).sum().backward()
        results.append((xl.grad, wl.grad))
    assert_all_close(results[1], results[0], **TOL[torch.float32])


def _to_format(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("weight_4d", [True, False], ids=["w4d", "w2d"])
def test_pointwise_conv_matches_torch_backend(channels_last, weight_4d, dtype):
    batch, c_in, c_out, height, width = 2, 5, 33, 3, 5  # 15 positions
    x = _to_format(torch.randn(batch, c_in, height, width, device=DEVICE, dtype=dtype), channels_last)
    weight = torch.randn(c_out, c_in, *((1, 1) if weight_4d else ()), device=DEVICE, dtype=dtype) / c_in**0.5
    bias = torch.randn(c_out, device=DEVICE, dtype=dtype)
    dy = _to_format(torch.randn(batch, c_out, height, width, device=DEVICE, dtype=dtype), channels_last)
    keep = _keep(height * width, 7)
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = _grads(
            lambda x, w, b: sbp_kernels.pointwise_conv(x, w, b, keep, 2.0, backend=backend), (x, weight, bias), dy
        )
    y, grads = outs["triton"]
    dense_weight = weight if weight_4d else weight[:, :, None, None]
    torch.testing.assert_close(y, F.conv2d(x, dense_weight, bias), atol=0, rtol=0)
    assert_all_close(grads, outs["torch"][1], **TOL[dtype])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert grads[0].is_contiguous(memory_format=memory_format)  # grad_x keeps x's memory format
    assert grads[1].shape == weight.shape


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pointwise_conv_keep_all_equals_dense_conv2d(channels_last):
    x = _to_format(torch.randn(2, 16, 1, 7, device=DEVICE), channels_last)
    weight, bias = torch.randn(5, 16, 1, 1, device=DEVICE), torch.randn(5, device=DEVICE)
    dy = _to_format(torch.randn(2, 5, 1, 7, device=DEVICE), not channels_last)  # dy in the other format
    keep = torch.arange(7, device=DEVICE)
    _, expected = _grads(F.conv2d, (x, weight, bias), dy)
    _, actual = _grads(lambda *t: sbp_kernels.pointwise_conv(*t, keep, backend="triton"), (x, weight, bias), dy)
    assert_all_close(actual, expected, **TOL[torch.float32])


def _strided_grad_outs(batch, n, c_out):
    yield "contiguous", torch.randn(batch, n, c_out, device=DEVICE)
    yield "transposed", torch.randn(batch, c_out, n, device=DEVICE).transpose(1, 2)  # NCHW conv dy
    yield "expanded", torch.randn(1, 1, c_out, device=DEVICE).expand(batch, n, c_out)  # stride 0
    yield "sliced", torch.randn(batch, 2 * n, c_out + 3, device=DEVICE)[:, ::2, 1 : c_out + 1]


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kept_rows_backward_direct_strided(channels_first, index_dtype):
    batch, n, c_in, c_out = 2, 37, 33, 16
    keep = _keep(n, 17, index_dtype)
    x_kept = torch.randn(batch, keep.numel(), c_in, device=DEVICE)
    weight = torch.randn(c_out, c_in, device=DEVICE)
    for name, grad_out in _strided_grad_outs(batch, n, c_out):
        actual = triton_linear.kept_rows_backward(grad_out, x_kept, weight, keep, 1.5, channels_first)
        expected = reference.kept_rows_backward(grad_out, x_kept, weight, keep, 1.5, channels_first)
        assert_all_close(actual, expected, **TOL[torch.float32])
        assert actual[0].stride() == expected[0].stride(), name  # [B, c_in, n] storage when channels_first


def test_kept_rows_backward_direct_fp16():
    batch, n, c_in, c_out = 2, 7, 5, 33
    keep = torch.tensor([0, 3, 6], device=DEVICE)
    args = (
        torch.randn(batch, c_out, n, device=DEVICE, dtype=torch.float16).transpose(1, 2),
        torch.randn(batch, 3, c_in, device=DEVICE, dtype=torch.float16),
        torch.randn(c_out, c_in, device=DEVICE, dtype=torch.float16),
        keep,
    )
    actual = triton_linear.kept_rows_backward(*args, 0.5, False)
    expected = reference.kept_rows_backward(*(a.float() if a.is_floating_point() else a for a in args), 0.5, False)
    assert all(a.dtype == torch.float16 for a in actual)
    assert_all_close([a.float() for a in actual], expected, **TOL[torch.float16])


@pytest.mark.parametrize(
    "layout", ["contiguous_dim-2", "nchw_rows", "channels_last_rows", "dim0"],
)
def test_gather_rows(layout):
    if layout == "contiguous_dim-2":
        x, dim = torch.randn(2, 3, 37, 5, device=DEVICE), -2
    elif layout == "dim0":
        x, dim = torch.randn(37, 16, device=DEVICE, dtype=torch.float16), 0
    else:
        x4 = torch.randn(2, 33, 5, 7, device=DEVICE)
        if layout == "channels_last_rows":
            x4 = x4.contiguous(memory_format=torch.channels_last)
        x, dim = x4.flatten(2).transpose(1, 2), 1  # the [B, H*W, C] row view pointwise conv saves from
    for index_dtype in (torch.int64, torch.int32):
        keep = _keep(x.shape[dim], 11, index_dtype)
        out = triton_linear.gather_rows(x, keep, dim)
        assert out.is_contiguous()
        torch.testing.assert_close(out, x.index_select(dim, keep), atol=0, rtol=0)


def test_opcheck_kept_rows_backward():
    keep = torch.tensor([1, 2, 6], device=DEVICE)
    x_kept, weight = torch.randn(2, 3, 5, device=DEVICE), torch.randn(16, 5, device=DEVICE)
    cases = [
        (torch.randn(2, 7, 16, device=DEVICE), x_kept, weight, keep, 2.0, False),
        (torch.randn(2, 16, 7, device=DEVICE).transpose(1, 2), x_kept, weight, keep.int(), 1.0, True),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.sbp.kept_rows_backward_triton.default, args)


def test_opcheck_gather_rows():
    x = torch.randn(2, 7, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.sbp.gather_rows_triton.default, (x, torch.tensor([0, 3], device=DEVICE), 1))


def test_bad_input_is_rejected():
    keep = torch.tensor([0, 1])
    grad_out, x_kept, weight = torch.randn(2, 7, 16), torch.randn(2, 2, 5), torch.randn(16, 5)
    with pytest.raises(TypeError, match="weight"):
        triton_linear.kept_rows_backward(grad_out, x_kept, weight.half(), keep, 1.0, False)
    with pytest.raises(ValueError, match="weight"):
        triton_linear.kept_rows_backward(grad_out, x_kept, weight[:, :4], keep, 1.0, False)
    with pytest.raises(ValueError, match="x_kept"):
        triton_linear.kept_rows_backward(grad_out, x_kept[:, :1], weight, keep, 1.0, False)


# (batch, n, n_keep, M = a's channels, N = b's channels, gather_b): weight GEMMs at odd shapes.
WEIGHT_GEMM_CASES = [
    (3, 37, 19, 33, 5, True),  # 57 rows: 4 interpreter K steps, split across batch boundaries
    (2, 50, 50, 17, 40, True),  # every position kept
    (1, 70, 41, 3, 2, False),  # compact b (the MLP's dW1)
    (1, 7, 7, 5, 3, True),  # 7 rows: one split, one partial K step
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", WEIGHT_GEMM_CASES, ids=lambda c: f"B{c[0]}-n{c[1]}-k{c[2]}-{c[3]}x{c[4]}")
def test_weight_gemm_split_k_and_gathered_loop(case, with_bias):
    """The weight GEMM's split-K reduction and its gathered K loop (row offsets loaded one K step
    ahead, also across batch and split boundaries) against float64, at odd shapes: out^T = s *
    sum act(a)^T b over the kept rows, bias = s * the row sums of b. Deterministic: a second run
    gives the same bits."""
    batch, n, n_keep, m, n_out, gather_b = case
    keep = _keep(n, n_keep)
    a = torch.randn(batch, n_keep, m, device=DEVICE)
    b = torch.randn(batch, n if gather_b else n_keep, n_out, device=DEVICE)
    rows = b[:, keep] if gather_b else b
    for activation in (None, "gelu"):
        act_a = F.gelu(a.double()) if activation else a.double()
        expected = 1.5 * torch.einsum("bkm,bkn->nm", act_a, rows.double())
        results = []
        for _ in range(2):
            out = torch.full((n_out, m), float("nan"), device=DEVICE)
            bias = torch.full((n_out,), float("nan"), device=DEVICE) if with_bias else None
            gemm.weight_gemm(a, b, out, bias, keep, gather_b=gather_b, scale=1.5, activation=activation)
            results.append((out, bias))
            torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
            if with_bias:
                torch.testing.assert_close(bias.double(), 1.5 * rows.double().sum((0, 1)), **TOL[torch.float32])
        assert torch.equal(results[0][0], results[1][0])
        assert not with_bias or torch.equal(results[0][1], results[1][1])


def test_weight_gemm_splits_fill_a_wave():
    """Splits in whole K steps of every config give every config at least one wave of programs
    (unless the rows run out: one K step per split), and there are none when the tiles alone
    fill the GPU."""
    configs = gemm._weight_gemm_kernel.configs
    granule = max(c.kwargs["BLOCK_K"] for c in configs)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if HAS_CUDA else gemm.HOPPER_SMS
    for m, n_out, k in ((33, 5, 57), (768, 768, 64 * 99), (96, 384, 64 * 1568), (4096, 4096, 50)):
        splits, k_split = gemm.split_k(m, n_out, k, torch.device(DEVICE))
        tiles = min(-(-m // c.kwargs["BLOCK_M"]) * -(-n_out // c.kwargs["BLOCK_N"]) for c in configs)
        assert k_split % granule == 0 and (splits - 1) * k_split < k <= splits * k_split
        assert tiles * splits >= sms or k_split == granule
        assert splits == 1 or tiles < sms
    assert gemm.split_k(33, 5, 57, torch.device(DEVICE))[0] > 1  # the odd shapes above really split


def _count_weight_gemms(monkeypatch):
    launches = []
    run = gemm._weight_gemm_kernel.run
    monkeypatch.setattr(gemm._weight_gemm_kernel, "run", lambda *a, **k: launches.append(1) or run(*a, **k))
    return launches


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, True), (True, False, True), (False, False, True)],
    ids=["frozen", "no_dx", "no_dw", "bias_only"],
)
def test_kept_rows_backward_skips_gradients_not_needed(needs, monkeypatch):
    """A frozen weight launches no weight GEMM; each gradient not asked for comes back None."""
    launches = _count_weight_gemms(monkeypatch)
    batch, n, c_in, c_out = 2, 37, 33, 16
    keep = _keep(n, 17)
    args = (torch.randn(batch, n, c_out, device=DEVICE), torch.randn(batch, 17, c_in, device=DEVICE),
            torch.randn(c_out, c_in, device=DEVICE), keep, 1.5, False)
    actual = triton_linear.kept_rows_backward(*args, *needs)
    expected = reference.kept_rows_backward(*args)
    assert len(launches) == int(needs[1])
    for got, want, need in zip(actual, expected, needs):
        if need:
            torch.testing.assert_close(got, want, **TOL[torch.float32])
        else:
            assert got is None


def test_opcheck_kept_rows_backward_needs():
    keep = torch.tensor([1, 2, 6], device=DEVICE)
    args = (torch.randn(2, 7, 16, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE),
            torch.randn(16, 5, device=DEVICE), keep, 2.0, False, True, False, True)
    torch.library.opcheck(torch.ops.sbp.kept_rows_backward_triton.default, args)


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 16), torch.nn.Linear(16, 5, bias=False)

    def forward(self, x, keep, backend):
        h = sbp_kernels.linear(x, self.fc1.weight, self.fc1.bias, keep, 2.0, backend=backend)
        return sbp_kernels.linear(torch.relu(h), self.fc2.weight, None, keep, 2.0, backend=backend)


def test_torch_compile_fullgraph_traces_triton_backward():
    """torch.compile(fullgraph=True) (aot_eager: no C++ compiler needed) runs the Triton custom ops."""
    model = _TwoLinears().to(DEVICE)
    x, keep = torch.randn(2, 7, 5, device=DEVICE), torch.tensor([0, 2, 3, 6], device=DEVICE)
    compiled, eager = compiled_and_eager_grads(model, x, keep, "triton")
    assert_all_close(compiled, eager, **TOL[torch.float32])


def _error_vs_fp32(dtype, run):
    """Per gradient, max |run(dtype) - run(fp32, same rounded inputs)| / max |fp32 result| for the
    triton and the torch backend (FlashAttention's test: Triton may err at most ~2x what torch does)."""
    high = run(torch.float32, "torch", dtype)
    errors = {}
    for backend in ("triton", "torch"):
        low = run(dtype, backend, dtype)
        errors[backend] = [
            ((a.float() - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
            for a, e in zip(low, high)
            if e is not None
        ]
    return errors


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 197, 99, 384, 1536), (2, 1000, 1, 33, 70), (3, 64, 64, 256, 256)])
def test_linear_gpu_error_within_twice_torch(dtype, shape):
    """GPU, H100-sized tiles: the Triton error is at most 2x torch's at the same precision (+ slack)."""
    batch, n, n_keep, c_in, c_out = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, n, c_in, device="cuda", generator=gen)
    weight = torch.randn(c_out, c_in, device="cuda", generator=gen) / c_in**0.5
    bias = torch.randn(c_out, device="cuda", generator=gen)
    dy = torch.randn(batch, n, c_out, device="cuda", generator=gen)
    keep = _keep(n, n_keep, device="cuda")

    def run(compute_dtype, backend, input_dtype):
        inputs = [t.to(input_dtype).to(compute_dtype) for t in (x, weight, bias)]
        return _grads(
            lambda *t: sbp_kernels.linear(*t, keep, 2.0, backend=backend), inputs, dy.to(input_dtype).to(compute_dtype)
        )[1]

    errors = _error_vs_fp32(dtype, run)
    # relative to the largest gradient entry: about one rounding of it in the low precision
    slack = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for got, ref in zip(errors["triton"], errors["torch"]):
        assert got <= 2 * ref + slack, errors


@requires_cuda
def test_pointwise_conv_gpu_bf16_channels_last():
    x = torch.randn(4, 96, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(384, 96, 1, 1, device="cuda", dtype=torch.bfloat16) / 96**0.5
    dy = torch.randn(4, 384, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    keep = _keep(196, 98, device="cuda")
    outs = {
        b: _grads(lambda *t: sbp_kernels.pointwise_conv(*t, None, keep, backend=b), (x, weight), dy)
        for b in ("torch", "triton")
    }
    assert_all_close(outs["triton"][1], outs["torch"][1], atol=0.1, rtol=0.05)
    assert outs["triton"][1][0].is_contiguous(memory_format=torch.channels_last)
