"""The Triton launchers as torch.library ops (sbp_kernels/triton/library.py): where the kernels
compile, each op is a triton_op whose launches AOTAutograd traces into the graph (inductor then
sees and calls the kernels themselves); under the interpreter, a custom op with its fake kernel.

The traced graphs need no GPU: a child process without TRITON_INTERPRET declares the ops as they
are declared on a GPU and traces each one, functionalized on fake CPU tensors, as AOTAutograd
does under torch.compile. (Running the kernels needs a GPU: test_cuda_graphs.py and the Triton op
tests compile and run them there.)
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import sbp_kernels  # noqa: F401  (declares the ops)
from sbp_kernels.triton import attention, cross_entropy, linear, mlp  # noqa: F401

# Traced in the child: op name -> the names of the kernels its functionalized graph launches, and
# the other call_function targets (there must be no opaque call of an sbp op left).
TRACE = r"""
import json, logging, torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
import sbp_kernels
from sbp_kernels.triton import attention, cross_entropy, linear, mlp

# Without a GPU, torch cannot compile a kernel to find which arguments it writes and says so at
# length; it then assumes every tensor argument is written, which is still a correct graph.
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
t = lambda *shape, dtype=torch.float32: torch.randn(shape).to(dtype)
keep = torch.tensor([0, 2, 5])
i64 = dict(dtype=torch.int64)
ops = torch.ops.sbp
cases = {
    "kept_rows_backward_triton": (ops.kept_rows_backward_triton, (t(2, 6, 12), t(2, 3, 16), t(12, 16), keep, 1.0, False,
                                  True, True, True)),
    "gather_rows_triton": (ops.gather_rows_triton, (t(2, 6, 16), keep, 1)),
    "mlp_backward_triton": (ops.mlp_backward_triton, (t(2, 6, 8), t(2, 3, 8), t(2, 3, 16), t(16, 8), t(8, 16), keep,
                            "gelu", 1.0, [True] * 5)),
    "attention_forward_triton": (ops.attention_forward_triton, (t(1, 2, 6, 16), t(1, 2, 6, 16), t(1, 2, 6, 16), True,
                                 0.25, None)),
    "attention_backward_triton": (ops.attention_backward_triton, (t(1, 2, 6, 16), t(1, 2, 3, 16), t(1, 2, 3, 16),
                                  t(1, 2, 3, 16), t(1, 2, 3, 16), t(1, 2, 3), keep, True, 0.25, "qkv", 1.0, None)),
    "linear_cross_entropy_forward_triton": (ops.linear_cross_entropy_forward_triton, (t(2, 6, 16), t(32, 16),
                                            torch.randint(32, (2, 6)), None, -100, "mean")),
    "linear_cross_entropy_backward_triton": (ops.linear_cross_entropy_backward_triton, (t(2, 3, 16), t(32, 16), None,
                                             torch.randint(32, (2, 3)), t(2, 3), keep, t(1), 6, -100,
                                             [True, True, False])),
}
found = {}
for name, (op, args) in cases.items():
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*tensor_args, op=op, args=args, tensors=tensors):
        full = list(args)
        for i, a in zip(tensors, tensor_args):
            full[i] = a
        return op(*full)

    graph = make_fx(dispatch_functionalize(call), tracing_mode="fake")(*[args[i] for i in tensors]).graph
    kernels, others = [], []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernels.append(getattr(kernel, "fn", kernel).__name__)
        else:
            others.append(str(node.target))
    found[name] = {"kernels": kernels, "others": others}
print(json.dumps(found))
"""

EXPECTED_KERNELS = {
    "kept_rows_backward_triton": ["_weight_gemm_kernel", "_row_gemm_kernel"],
    "gather_rows_triton": ["_gather_rows_kernel"],
    "mlp_backward_triton": ["_weight_gemm_kernel", "_row_gemm_kernel", "_weight_gemm_kernel", "_row_gemm_kernel"],
    "attention_forward_triton": ["_fwd_kernel"],
    "attention_backward_triton": ["_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
    "linear_cross_entropy_forward_triton": ["_lse_kernel"],
    "linear_cross_entropy_backward_triton": ["_dlogits_kernel", "_weight_gemm_kernel", "_dh_kernel"],
}


def _traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRACE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_graphs_launch_the_kernels_themselves():
    """Functionalized as under torch.compile, every op is traced into launches of its own Triton
    kernels (which inductor calls from its generated code) and ATen ops: no opaque sbp op is left."""
    found = _traced()
    assert set(found) == set(EXPECTED_KERNELS)
    for name, kernels in EXPECTED_KERNELS.items():
        assert sorted(found[name]["kernels"]) == sorted(kernels), name
        assert not [t for t in found[name]["others"] if t.startswith("sbp.")], (name, found[name]["others"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="where the kernels compile, the launchers are triton_ops")
def test_interpreted_launchers_are_custom_ops_with_their_fake_kernels():
    """Under TRITON_INTERPRET=1 (these tests) an interpreted kernel cannot be traced: the op is opaque,
    and fake tensors take their shapes from the registered fake kernel without running the launcher."""
    from torch._library.triton import triton_ops_to_kernels
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not [name for name in triton_ops_to_kernels if name.startswith("sbp::")]
    with FakeTensorMode():
        grad_x, grad_w, grad_b = torch.ops.sbp.kept_rows_backward_triton(
            torch.empty(2, 6, 12), torch.empty(2, 3, 16), torch.empty(12, 16), torch.tensor([0, 2, 5]), 1.0, True,
            True, True, True,
        )
    assert grad_x.shape == (2, 6, 16) and grad_x.stride() == (96, 1, 6)  # channels-first storage
    assert grad_w.shape == (12, 16) and grad_b.shape == (12,)


def test_inductor_calls_the_kernels_on_a_gpu():
    """On a GPU, inductor's generated code launches the package's Triton kernels itself (no call of
    the sbp op), and the compiled forward and backward equal eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator(device="cuda").manual_seed(0)
    x, w, b = (torch.randn(shape, device="cuda", generator=g, requires_grad=True) for shape in
               ((2, 64, 64), (96, 64), (96,)))
    keep = torch.arange(0, 64, 2, device="cuda")

    def step(x, w, b):
        out = sbp_kernels.linear(x, w, b, keep, backend="triton")
        out.square().sum().backward()
        return out

    eager_out = step(x, w, b)
    eager_grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    out, code = run_and_get_code(torch.compile(step), x, w, b)
    text = "\n".join(code)
    assert "_weight_gemm_kernel" in text and "_row_gemm_kernel" in text
    assert "kept_rows_backward_triton" not in text
    torch.testing.assert_close(out, eager_out)
    for t, expected in zip((x, w, b), eager_grads):
        torch.testing.assert_close(t.grad, expected, rtol=1e-4, atol=1e-4)


def test_eager_calls_run_the_launcher_without_dispatching_the_op(monkeypatch):
    """On plain tensors outside any trace or mode the launcher runs directly (no custom-op dispatch);
    under a dispatch mode (a fake-tensor step) or with fake tensors, the op itself, whose fake kernel
    gives the shapes without launching anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sbp_kernels.triton import library

    op = linear._gather_rows_op
    launched = []
    launcher = library._launchers[op]
    monkeypatch.setitem(library._launchers, op, lambda *args: launched.append(args) or launcher(*args))
    x, keep = torch.randn(2, 6, 16), torch.tensor([0, 2, 5])
    torch.testing.assert_close(linear.gather_rows(x, keep, 1), x[:, keep], rtol=0, atol=0)
    assert len(launched) == 1
    with FakeTensorMode():
        fake = linear.gather_rows(torch.empty(2, 6, 16), torch.tensor([0, 2, 5]), 1)
    assert fake.shape == (2, 3, 16) and len(launched) == 1
    with FakeTensorMode() as mode:
        fake_x, fake_keep = mode.from_tensor(x), mode.from_tensor(keep)
    assert linear.gather_rows(fake_x, fake_keep, 1).shape == (2, 3, 16) and len(launched) == 1
