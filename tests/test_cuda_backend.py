"""The compiled kernels of sbp::kept_rows_backward (csrc/cpu/kept_rows.cpp, csrc/cuda/kept_rows*)
against plain float64 PyTorch math: odd sizes, every grad_out layout the ops pass (contiguous rows,
NCHW and channels_last pointwise-conv views, a misaligned slice), both grad_x storage orders, int32
and int64 keep sets, every subset of the gradients asked for (`needs`: what is not asked for is not
computed and comes back as an empty tensor of its own; x_kept / weight may then be None), zero-width
channels. CPU tests need the extension; CUDA tests also need a GPU and a CUDA build.
"""
import itertools

import pytest
import torch

import sbp_kernels  # noqa: F401  (importing the package loads the extension)
from sbp_kernels import _extension

HAS_OP = _extension.loaded and hasattr(torch.ops.sbp, "kept_rows_backward")
requires_op = pytest.mark.skipif(
    not HAS_OP, reason=f"sbp::kept_rows_backward not registered: {_extension.error}"
)
requires_cuda_op = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and _extension.built_with_cuda),
    reason="needs a CUDA device and the extension built with its CUDA kernels",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# dtype -> (atol, rtol); half-precision atol is relative to the largest reference magnitude.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-10, 1e-10),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
LAYOUTS = ["contiguous", "nchw", "channels_last", "sliced"]
# (batch, n, n_keep, c_in, c_out): n not a multiple of 32 (the tile side), n_keep = 1 and = n,
# channel counts below, across and on the 16-byte vector width.
SHAPES = [
    (1, 37, 1, 5, 7),
    (3, 37, 37, 8, 16),
    (3, 70, 33, 64, 40),
    (1, 1, 1, 3, 1),
    (2, 100, 50, 33, 64),
]
GRAD_SCALE = 1.7


def make_grad_out(batch, n, c_out, layout, dtype, device):
    """grad_out [B, n, c_out] as the ops hand it to the kernel, with the layout's strides."""
    if layout == "contiguous":  # linear: rows of channels
        return torch.randn(batch, n, c_out, device=device).to(dtype)
    if layout == "sliced":  # odd row stride and a storage offset: no aligned vectors
        base = torch.randn(batch, 2 * n, c_out + 1, device=device).to(dtype)
        return base[:, ::2, 1:]
    # pointwise conv: dy [B, c_out, H, W] viewed as dy.flatten(2).transpose(1, 2)
    h = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    dy = torch.randn(batch, c_out, h, n // h, device=device).to(dtype)
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    return dy.flatten(2).transpose(1, 2)


def make_case(shape, layout, dtype, idx_dtype, device):
    batch, n, n_keep, c_in, c_out = shape
    grad_out = make_grad_out(batch, n, c_out, layout, dtype, device)
    x_kept = torch.randn(batch, n_keep, c_in, device=device).to(dtype)
    weight = torch.randn(c_out, c_in, device=device).to(dtype)
    keep_idx = torch.randperm(n)[:n_keep].sort().values.to(device=device, dtype=idx_dtype)
    return grad_out, x_kept, weight, keep_idx


def reference(grad_out, x_kept, weight, keep_idx, grad_scale):
    """Plain float64 math of DESIGN.md 3.1 on CPU: (grad_x, grad_weight, grad_bias)."""
    grad_out, x_kept, weight = (t.cpu().double() for t in (grad_out, x_kept, weight))
    keep_idx = keep_idx.cpu().long()
    batch, n, c_out = grad_out.shape
    dy_kept = grad_out[:, keep_idx] * grad_scale
    grad_weight = torch.einsum("bko,bki->oi", dy_kept, x_kept)
    grad_bias = dy_kept.sum((0, 1))
    grad_x = torch.zeros(batch, n, weight.shape[1], dtype=torch.float64)
    grad_x[:, keep_idx] = dy_kept @ weight
    return grad_x, grad_weight, grad_bias


def assert_close(actual, expected, dtype, relative=False):
    atol, rtol = TOL[dtype]
    if relative or dtype in (torch.float16, torch.bfloat16):
        atol *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.cpu().double(), expected, atol=atol, rtol=rtol)


def check_outputs(outputs, case, channels_first, relative=False):
    grad_out, x_kept, weight, keep_idx = case
    grad_x, grad_weight, grad_bias = outputs
    batch, n, c_out = grad_out.shape
    c_in = weight.shape[1]
    dtype, device = grad_out.dtype, grad_out.device
    for t in outputs:
        assert t.dtype == dtype and t.device == device
    assert grad_x.shape == (batch, n, c_in)
    assert grad_weight.shape == (c_out, c_in) and grad_bias.shape == (c_out,)
    # Storage order: [B, c_in, n] when channels_first, else [B, n, c_in].
    assert (grad_x.transpose(1, 2) if channels_first else grad_x).is_contiguous()
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep_idx.cpu().long()] = False
    assert (grad_x[:, dropped.to(device)] == 0).all()  # exactly zero, not just close
    for actual, expected in zip(outputs, reference(*case, GRAD_SCALE)):
        assert_close(actual, expected, dtype, relative)


ALL = [True, True, True]


def kept_rows_backward(case, grad_scale, channels_first, needs=ALL):
    grad_out, x_kept, weight, keep_idx = case
    return torch.ops.sbp.kept_rows_backward(
        grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, weight.shape[1], needs
    )


def run_grid(layout, dtype, idx_dtype, channels_first, device):
    for shape in SHAPES:
        case = make_case(shape, layout, dtype, idx_dtype, device)
        outputs = kept_rows_backward(case, GRAD_SCALE, channels_first)
        check_outputs(outputs, case, channels_first)
        yield case, outputs


def check_needs(device):
    """Each subset of (x, weight, bias) gradients: the ones asked for equal the full call's, the
    others are empty tensors, distinct from each other (outputs must not alias); the tensors only
    an unasked gradient reads may be None."""
    case = make_case((2, 37, 9, 5, 7), "nchw", torch.float32, torch.int64, device)
    grad_out, x_kept, weight, keep_idx = case
    full = kept_rows_backward(case, GRAD_SCALE, True)
    for needs in itertools.product([False, True], repeat=3):
        outputs = torch.ops.sbp.kept_rows_backward(
            grad_out, x_kept if needs[1] else None, weight if needs[0] else None, keep_idx, GRAD_SCALE, True, 5,
            list(needs),
        )
        assert len({id(t) for t in outputs}) == 3
        for out, expected, need in zip(outputs, full, needs):
            if need:
                torch.testing.assert_close(out, expected)
            else:
                assert out.numel() == 0


def check_zero_width(device):
    """c_in = 0 or c_out = 0: the shapes nn.Linear's backward gives (zero-size or zeros)."""
    for c_in, c_out in ((0, 4), (5, 0), (0, 0)):
        case = make_case((2, 9, 3, c_in, c_out), "contiguous", torch.float32, torch.int64, device)
        grad_x, grad_weight, grad_bias = kept_rows_backward(case, GRAD_SCALE, False)
        assert grad_x.shape == (2, 9, c_in) and not grad_x.any()
        assert grad_weight.shape == (c_out, c_in) and not grad_weight.any()
        assert_close(grad_bias, reference(*case, GRAD_SCALE)[2], torch.float32)


@requires_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idx_dtype, channels_first", [(torch.int64, False), (torch.int32, True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_matches_reference(layout, idx_dtype, channels_first, dtype):
    for _ in run_grid(layout, dtype, idx_dtype, channels_first, "cpu"):
        pass


@requires_cuda_op
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_matches_reference(layout, idx_dtype, channels_first, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for case, outputs in run_grid(layout, dtype, idx_dtype, channels_first, "cuda"):
        if dtype in (torch.float32, torch.float64):  # and against the C++ CPU kernel
            cpu_case = [t.cpu() for t in case]
            expected = kept_rows_backward(cpu_case, GRAD_SCALE, channels_first)
            for actual, want in zip(outputs, expected):
                assert_close(actual, want.double(), dtype)


@requires_cuda_op
@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "nchw"])
def test_cuda_kernel_large_grid_stride(channels_first, layout):
    # More rows than one launch has threads or tiles: the grid-stride loops run several rounds.
    # grad_weight sums 60k products, so its tolerance is relative to its magnitude.
    case = make_case((2, 70_001, 30_011, 3, 5), layout, torch.float32, torch.int64, "cuda")
    outputs = kept_rows_backward(case, GRAD_SCALE, channels_first)
    check_outputs(outputs, case, channels_first, relative=True)


@requires_cuda_op
def test_cuda_kernel_uses_current_stream_and_captures_in_graph():
    case = make_case((2, 70, 33, 16, 24), "nchw", torch.float32, torch.int64, "cuda")
    expected = reference(*case, GRAD_SCALE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        kept_rows_backward(case, GRAD_SCALE, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = kept_rows_backward(case, GRAD_SCALE, True)
    for out in outputs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for actual, want in zip(outputs, expected):
        assert_close(actual, want, torch.float32)


@requires_op
def test_cpu_kernel_needs_subsets():
    check_needs("cpu")


@requires_op
def test_cpu_kernel_zero_width_channels():
    check_zero_width("cpu")


@requires_cuda_op
def test_cuda_kernel_needs_subsets():
    check_needs("cuda")


@requires_cuda_op
def test_cuda_kernel_zero_width_channels():
    check_zero_width("cuda")


@requires_cuda_op
def test_cuda_kernel_rejects_bad_arguments():
    grad_out, x_kept, weight, keep_idx = make_case(
        (2, 10, 4, 3, 5), "contiguous", torch.float32, torch.int64, "cuda"
    )

    def op(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, needs=ALL):
        return torch.ops.sbp.kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, 3,
                                                needs)

    with pytest.raises(RuntimeError, match="keep_idx"):
        op(grad_out, x_kept, weight, keep_idx.cpu(), 1.0, False)
    with pytest.raises(RuntimeError, match="keep_idx"):
        op(grad_out, x_kept, weight, keep_idx.view(2, 2), 1.0, False)
    with pytest.raises(RuntimeError, match="keep_idx"):
        op(grad_out, x_kept, weight, keep_idx.float(), 1.0, False)
    with pytest.raises(RuntimeError, match="x_kept"):
        op(grad_out, x_kept.double(), weight, keep_idx, 1.0, False)
    with pytest.raises(RuntimeError, match="x_kept"):
        op(grad_out, x_kept[:, :3], weight, keep_idx, 1.0, False)
    with pytest.raises(RuntimeError, match="weight"):
        op(grad_out, x_kept, weight[:4], keep_idx, 1.0, False)
    with pytest.raises(RuntimeError, match="weight gradient needs x_kept"):
        op(grad_out, None, weight, keep_idx, 1.0, False)
    with pytest.raises(RuntimeError, match="input gradient needs weight"):
        op(grad_out, x_kept, None, keep_idx, 1.0, False)
