"""The C++ autograd faces of the torch backend (csrc/eager.cpp) against the Python faces of the same
formulas (ops/*.py, themselves checked against dense autograd in test_linear / test_mlp / test_norm
/ test_attention): the same output and gradients, on the layouts and index types the row copies of
csrc/rows.h walk (strided and position-first views, expanded gradients, int32 / int64 keep_idx);
and what their hand-made backward nodes owe autograd."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sbp_kernels
from sbp_kernels.ops import attention as attention_op
from sbp_kernels.ops import linear as linear_op
from sbp_kernels.ops import mlp as mlp_op
from sbp_kernels.ops import norm as norm_op

pytestmark = pytest.mark.skipif(not sbp_kernels._extension.loaded, reason="the C++ extension is not built")

KEEP = [0, 3, 4, 8]  # of n = 9 positions


def _layouts(batch, n, c):
    """x [batch, n, c] contiguous, position-first ([n, batch, c] memory) and with a strided last dim."""
    g = torch.Generator().manual_seed(0)
    yield "contiguous", torch.randn(batch, n, c, dtype=torch.float64, generator=g)
    yield "position-first", torch.randn(n, batch, c, dtype=torch.float64, generator=g).transpose(0, 1)
    yield "strided", torch.randn(batch, n, 2 * c, dtype=torch.float64, generator=g)[..., ::2]


def _run(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    out.backward(grad(out))
    return out.detach(), [t.grad for t in inputs if t is not None], out.grad_fn


GRADS = {"random": lambda out: torch.randn_like(out), "expanded": lambda out: torch.ones(()).double().expand_as(out)}


def _both_faces(monkeypatch, module, fn, inputs, grad):
    """(C++ face's output, grads), (Python face's output, grads); the first must be the C++ node."""
    torch.manual_seed(1)
    cpp_out, cpp_grads, node = _run(fn, inputs, grad)
    assert node.name().startswith("Sbp")
    monkeypatch.setattr(module, "cpp_eager", lambda backend: False)
    torch.manual_seed(1)
    py_out, py_grads, node = _run(fn, inputs, grad)
    assert not node.name().startswith("Sbp")
    return (cpp_out, cpp_grads), (py_out, py_grads)


def _assert_same(cpp, py):
    torch.testing.assert_close(cpp[0], py[0], rtol=0, atol=0)
    for a, b in zip(cpp[1], py[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("op", ["linear", "layer_norm", "mlp"])
def test_row_ops_match_python_face(monkeypatch, op, grad, index_dtype):
    keep = torch.tensor(KEEP, dtype=index_dtype)
    for _, x in _layouts(2, 9, 6):
        g = torch.Generator().manual_seed(2)
        if op == "linear":
            module, params = linear_op, [torch.randn(5, 6, dtype=torch.float64, generator=g), torch.randn(5).double()]
            fn = lambda x, w, b: sbp_kernels.linear(x, w, b, keep, 0.5)  # noqa: E731
        elif op == "layer_norm":
            module, params = norm_op, [torch.randn(6).double(), torch.randn(6).double()]
            fn = lambda x, w, b: sbp_kernels.layer_norm(x, w, b, keep)  # noqa: E731
        else:
            module = mlp_op
            params = [torch.randn(7, 6, dtype=torch.float64, generator=g), torch.randn(7).double(),
                      torch.randn(6, 7, dtype=torch.float64, generator=g), torch.randn(6).double()]
            fn = lambda x, w1, b1, w2, b2: sbp_kernels.mlp(x, w1, b1, w2, b2, keep, "gelu", 0.5)  # noqa: E731
        cpp, py = _both_faces(monkeypatch, module, fn, [x, *params], GRADS[grad])
        monkeypatch.undo()
        _assert_same(cpp, py)
        assert not cpp[1][0][:, [1, 2, 5, 6, 7]].any()  # dropped rows get exactly zero


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("kv_heads, causal, padded", [(2, False, False), (1, True, False), (2, False, True)])
def test_attention_matches_python_face(monkeypatch, kv_heads, causal, padded, grad, index_dtype):
    keep = torch.tensor(KEEP, dtype=index_dtype)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 2, 4, dtype=torch.float64, generator=g).transpose(1, 2)  # [B, h, n, d] of [B, n, h, d]
    k, v = (torch.randn(2, kv_heads, 9, 4, dtype=torch.float64, generator=g) for _ in range(2))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    fn = lambda q, k, v: sbp_kernels.attention(q, k, v, keep, causal, key_padding_mask=mask if padded else None)  # noqa: E731
    cpp, py = _both_faces(monkeypatch, attention_op, fn, [q, k, v], GRADS[grad])
    _assert_same(cpp, py)
    assert cpp[0].transpose(1, 2).is_contiguous()  # the output's [B, n, h, d] layout


class _Ops(TorchDispatchMode):
    """Records the ATen ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_node_computes_only_the_gradients_asked_for():
    """autograd.grad of x alone: no weight or bias gradient is computed (the node asks the engine
    which of its inputs this backward needs, not only which required grad in the forward)."""
    x, w, b = (torch.randn(shape, requires_grad=True) for shape in ((2, 9, 6), (5, 6), (5,)))
    keep = torch.tensor(KEEP)
    out = sbp_kernels.linear(x, w, b, keep)
    with _Ops() as ops:
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)
    assert ops.names.count("mm") + ops.names.count("matmul") + ops.names.count("bmm") == 1  # dy_K @ W only
    assert "sum" not in ops.names  # no bias gradient
    with _Ops() as ops:
        grad_w, grad_b = torch.autograd.grad(out, (w, b), torch.ones_like(out))
    assert "mm" in ops.names and "sum" in ops.names
    expected = torch.zeros_like(x)
    expected[:, KEEP] = w.sum(0)
    torch.testing.assert_close(grad_x, expected)
    torch.testing.assert_close(grad_b, torch.full((5,), 2.0 * len(KEEP)))


@pytest.mark.parametrize("op", ["linear", "layer_norm", "mlp", "attention"])
def test_node_frees_what_it_saved_after_backward(op):
    """A second backward through the graph is the usual autograd error (the saved rows were freed);
    with retain_graph the node can run again and gives the same gradients."""
    keep = torch.tensor(KEEP)
    x = torch.randn(2, 9, 6, requires_grad=True)
    fns = {
        "linear": lambda: sbp_kernels.linear(x, torch.randn(5, 6), None, keep),
        "layer_norm": lambda: sbp_kernels.layer_norm(x, None, None, keep),
        "mlp": lambda: sbp_kernels.mlp(x, torch.randn(7, 6), None, torch.randn(6, 7), None, keep),
        "attention": lambda: sbp_kernels.attention(x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), keep),
    }
    out = fns[op]()
    assert out.grad_fn.name().startswith("Sbp")
    (first,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (again,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.sum(), x)


def test_node_refuses_forward_mode_ad():
    """A dual input is an error, also where no input requires grad (the op then records no node, but
    would drop the tangent)."""
    import torch.autograd.forward_ad as fwad

    w = torch.randn(5, 6, requires_grad=True)
    keep = torch.tensor(KEEP)
    with fwad.dual_level():
        x = fwad.make_dual(torch.randn(2, 9, 6), torch.randn(2, 9, 6))
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            sbp_kernels.linear(x, w, None, keep)
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            torch.ops.sbp.linear_eager(x, w.detach(), None, keep, None, 1.0)
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            torch.ops.sbp.layer_norm_eager(x, None, None, keep, None, 1e-5)


def _faces(op, x, params, keep):
    if op == "linear":
        return sbp_kernels.linear(x, *params, keep)
    if op == "layer_norm":
        return sbp_kernels.layer_norm(x, *params, keep)
    if op == "mlp":
        return sbp_kernels.mlp(x, *params, keep)
    q = x.view(2, 9, 2, 3).transpose(1, 2)
    return sbp_kernels.attention(q, q * params[0][:3], q, keep).transpose(1, 2).reshape(2, 9, 6)


SHAPES = {
    "linear": [(6, 6), (6,)], "layer_norm": [(6,), (6,)], "mlp": [(7, 6), (7,), (6, 7), (6,)], "attention": [(6,)],
}
MODULES = {"linear": linear_op, "layer_norm": norm_op, "mlp": mlp_op, "attention": attention_op}


def _penalty_grads(op, monkeypatch, cpp):
    """The parameters' gradients of a penalty on the input gradient (create_graph=True), as a
    gradient penalty takes them."""
    if not cpp:
        monkeypatch.setattr(MODULES[op], "cpp_eager", lambda backend: False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    params = [torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True) for shape in SHAPES[op]]
    out = _faces(op, x, params, torch.tensor(KEEP)) + x.sin()
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    try:
        return torch.autograd.grad(grad_x.square().sum(), params, allow_unused=True)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("op", ["linear", "layer_norm", "mlp"])
def test_double_backward_matches_python_face(monkeypatch, op):
    """A backward with create_graph=True records the node's backward as differentiable ATen ops (the
    row copies give way to index_select / index_copy_), so a penalty on the input gradient has the
    same parameter gradients as with the Python faces."""
    cpp, py = _penalty_grads(op, monkeypatch, True), _penalty_grads(op, monkeypatch, False)
    for a, b in zip(cpp, py):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_double_backward_through_attention_raises_as_the_python_face(monkeypatch):
    for cpp in (True, False):
        with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
            _penalty_grads("attention", monkeypatch, cpp)


def test_saved_rows_carry_no_autograd_history():
    """The rows a face saves are plain tensors, also where the gather is ATen's (a non-contiguous
    keep_idx): no extra node per face, nothing more for saved-tensor hooks to see."""
    keep = torch.tensor([0, 9, 3, 9, 4, 9, 8, 9])[::2]  # [0, 3, 4, 8], not contiguous
    assert not keep.is_contiguous()
    x = torch.randn(2, 9, 6, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        torch.ops.sbp.linear_eager(x, torch.randn(5, 6, requires_grad=True), None, keep, None, 1.0)
        torch.ops.sbp.layer_norm_eager(x, None, None, keep, None, 1e-5)
        torch.ops.sbp.mlp_eager(x, torch.randn(7, 6), None, torch.randn(6, 7), None, keep, None, 0, 1.0)
        q = x.view(2, 9, 2, 3).transpose(1, 2)
        torch.ops.sbp.attention_eager(q, q, q, keep, False, 0.5, None)
    assert len(packed) == 3 + 2 + 4 + 6  # the defined tensors each face saves
    assert all(t is None or t.grad_fn is None for t in packed)


def test_compiled_autograd_over_the_cpp_faces_says_what_to_do():
    from torch._dynamo import compiled_autograd

    x = torch.randn(2, 9, 6, requires_grad=True)
    out = sbp_kernels.linear(x, torch.randn(5, 6), None, torch.tensor(KEEP))
    with pytest.raises(NotImplementedError, match="compiled_autograd = True before the forward"):
        with compiled_autograd._enable(torch.compile(backend="eager")):
            out.sum().backward()


def test_compiled_autograd_takes_the_python_faces():
    """With compiled autograd configured, the ops record the Python faces' autograd.Functions, which
    compiled autograd traces (the C++ faces' nodes are opaque to it), with the same gradients."""
    from torch._dynamo import compiled_autograd

    x, w = torch.randn(2, 9, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    keep = torch.tensor(KEEP)
    out = sbp_kernels.linear(x, w, None, keep)
    assert out.grad_fn.name() == "SbpLinearBackward"
    expected = torch.autograd.grad(out.square().sum(), (x, w))
    with torch._dynamo.config.patch(compiled_autograd=True):
        with sbp_kernels.step():  # a step asks once, when it opens
            assert sbp_kernels.linear(x, w, None, keep).grad_fn.name() == "LinearFunctionBackward"
        out = sbp_kernels.linear(x, w, None, keep)
        assert out.grad_fn.name() == "LinearFunctionBackward"
        with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
            out.square().sum().backward()
    for got, want in zip((x.grad, w.grad), expected):
        torch.testing.assert_close(got, want)
