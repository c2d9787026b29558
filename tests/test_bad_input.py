"""Bad input raises ValueError / TypeError naming the argument (DESIGN.md section 7): every argument
of every public function, keep_idx in every op, and a keep_idx changed in place between calls
(through .numpy() or .data, which autograd's version counter does not see) is checked again."""
import math
import warnings

import pytest
import torch

import sbp_kernels

KEEP = torch.tensor([0, 2, 5])
N = 6  # positions of every sample below


def _r(*shape, **kwargs):
    return torch.randn(*shape, **kwargs)


# op -> (function, builder of its positional arguments in order; the first one takes gradients)
SPECS = {
    "linear": (sbp_kernels.linear, lambda: dict(x=_r(2, N, 4), weight=_r(3, 4), bias=_r(3), keep_idx=KEEP)),
    "pointwise_conv": (
        sbp_kernels.pointwise_conv, lambda: dict(x=_r(2, 4, 2, 3), weight=_r(3, 4, 1, 1), bias=_r(3), keep_idx=KEEP)
    ),
    "mlp": (
        sbp_kernels.mlp,
        lambda: dict(x=_r(2, N, 4), w1=_r(8, 4), b1=_r(8), w2=_r(3, 8), b2=_r(3), keep_idx=KEEP),
    ),
    "gated_mlp": (
        sbp_kernels.gated_mlp,
        lambda: dict(x=_r(2, N, 4), w_gate=_r(8, 4), b_gate=None, w_up=_r(8, 4), b_up=None, w_down=_r(3, 8),
                     b_down=_r(3), keep_idx=KEEP),
    ),
    "attention": (
        sbp_kernels.attention, lambda: dict(q=_r(2, 4, N, 8), k=_r(2, 2, N, 8), v=_r(2, 2, N, 8), keep_idx=KEEP)
    ),
    "layer_norm": (sbp_kernels.layer_norm, lambda: dict(x=_r(2, N, 4), weight=_r(4), bias=_r(4), keep_idx=KEEP)),
    "rms_norm": (sbp_kernels.rms_norm, lambda: dict(x=_r(2, N, 4), weight=_r(4), keep_idx=KEEP)),
    "dropout": (sbp_kernels.dropout, lambda: dict(x=_r(2, N, 4), keep_idx=KEEP, p=0.5)),
    "linear_cross_entropy": (
        sbp_kernels.linear_cross_entropy,
        lambda: dict(h=_r(2, N, 4), weight=_r(7, 4), target=torch.randint(0, 7, (2, N)), keep_idx=KEEP),
    ),
    "tokenwise": (sbp_kernels.tokenwise, lambda: dict(fn=torch.tanh, x=_r(2, N, 4), keep_idx=KEEP)),
}
OPS = sorted(SPECS)
WITH_GRAD_SCALE = ["linear", "pointwise_conv", "mlp", "gated_mlp", "attention", "linear_cross_entropy"]


def call(op, requires_grad=False, **over):
    """SPECS[op] called with `over` replacing positional arguments or added as keywords; with
    requires_grad, the first floating tensor argument takes gradients (the op's autograd path)."""
    fn, build = SPECS[op]
    args = build()
    keywords = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    if requires_grad:
        name = next((k for k, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        if name is not None:
            args[name] = args[name].detach().clone().requires_grad_()
    return fn(*args.values(), **keywords)


def leaf_grad(op, keep_idx, **over):
    """The gradient of the op's first tensor argument for keep_idx (inputs and dropout masks from
    fixed seeds)."""
    fn, build = SPECS[op]
    torch.manual_seed(0)
    args = build()
    args.update(over, keep_idx=keep_idx)
    first = next(name for name, t in args.items() if isinstance(t, torch.Tensor))
    args[first] = args[first].requires_grad_()
    torch.manual_seed(1)
    out = fn(*args.values())
    (out.sum() if out.dim() else out).backward()
    return args[first].grad


KEEP_CASES = [
    (torch.tensor([0, 2, N]), ValueError, rf"keep_idx values must lie in \[0, {N}\)"),
    (torch.tensor([-1, 2]), ValueError, "keep_idx values must lie in"),
    (torch.tensor([2, 0, 5]), ValueError, "keep_idx must be sorted"),
    (torch.tensor([0, 2, 2]), ValueError, "without duplicates"),
    (torch.tensor([0.0, 2.0]), TypeError, "keep_idx must have dtype"),
    (torch.tensor([0, 2], dtype=torch.int16), TypeError, "keep_idx must have dtype"),
    (torch.tensor([[0, 2], [1, 3]]), ValueError, "per-sample"),
    (torch.tensor(3), ValueError, "keep_idx must be 1-D"),
    (torch.tensor([], dtype=torch.int64), ValueError, f"keep_idx must hold between 1 and n={N}"),
    (torch.arange(N + 1), ValueError, f"keep_idx must hold between 1 and n={N}"),
    ([0, 2], TypeError, "keep_idx must be a torch.Tensor"),
    (torch.tensor([0, 2], device="meta"), ValueError, "keep_idx must be on cpu"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", range(len(KEEP_CASES)))
def test_bad_keep_idx(op, case):
    keep_idx, error, match = KEEP_CASES[case]
    for requires_grad in (False, True):
        with pytest.raises(error, match=match):
            call(op, requires_grad, keep_idx=keep_idx)


@pytest.mark.parametrize("op", WITH_GRAD_SCALE)
@pytest.mark.parametrize(
    "grad_scale, error, match",
    [(math.nan, ValueError, "grad_scale must be finite"), (math.inf, ValueError, "grad_scale must be finite"),
     ("2", TypeError, "grad_scale must be a real number"), (True, TypeError, "grad_scale must be a real number")],
)
def test_bad_grad_scale(op, grad_scale, error, match):
    with pytest.raises(error, match=match):
        call(op, grad_scale=grad_scale)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["fast", None, "CUDA"])
def test_bad_backend(op, backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(op, backend=backend)


def _half(*shape):
    return torch.randn(*shape, dtype=torch.float16)


META = torch.device("meta")
# (op, overrides, error, message): one or more per argument of each function
ARG_CASES = [
    # linear
    ("linear", dict(x=_r(N)), ValueError, "x must have at least 2 dims"),
    ("linear", dict(x=torch.randint(0, 3, (2, N, 4))), TypeError, "x must have dtype"),
    ("linear", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("linear", dict(weight=_r(3, 5)), ValueError, r"weight must have shape \[c_out, 4\]"),
    ("linear", dict(weight=_r(3, 4, 1)), ValueError, "weight must be 2-D"),
    ("linear", dict(weight=_r(3, 4, dtype=torch.float64)), TypeError, "weight must have the dtype of x"),
    ("linear", dict(weight=_r(3, 4, device=META)), ValueError, "weight must be on the device of x"),
    ("linear", dict(bias=_r(4)), ValueError, r"bias must have shape \(3,\)"),
    ("linear", dict(bias=_half(3)), TypeError, "bias must have the dtype of x"),
    ("linear", dict(bias=[1.0, 2.0, 3.0]), TypeError, "bias must be a torch.Tensor"),
    # pointwise_conv
    ("pointwise_conv", dict(x=_r(2, 4, N)), ValueError, "x must be 4-D"),
    ("pointwise_conv", dict(x=_half(2, 4, 2, 3)), TypeError, "weight must have the dtype of x"),
    ("pointwise_conv", dict(weight=_r(3, 4, 3, 3)), ValueError, r"weight must have shape \[c_out, 4, 1, 1\]"),
    ("pointwise_conv", dict(weight=_r(3, 5)), ValueError, r"weight must have shape \[c_out, 4, 1, 1\] or \[c_out, 4\]"),
    ("pointwise_conv", dict(bias=_r(2)), ValueError, r"bias must have shape \(3,\)"),
    ("pointwise_conv", dict(x=_r(2, 4, 2, 2)), ValueError, r"keep_idx values must lie in \[0, 4\)"),  # H*W pixels
    # mlp
    ("mlp", dict(x=_r(4)), ValueError, "x must have at least 2 dims"),
    ("mlp", dict(w1=_r(8, 5)), ValueError, r"w1 must have shape \[out, 4\]"),
    ("mlp", dict(w1=_half(8, 4)), TypeError, "w1 must have the dtype of x"),
    ("mlp", dict(b1=_r(4)), ValueError, r"b1 must have shape \(8,\)"),
    ("mlp", dict(w2=_r(3, 7)), ValueError, r"w2 must have shape \[out, 8\]"),
    ("mlp", dict(b2=_r(8)), ValueError, r"b2 must have shape \(3,\)"),
    ("mlp", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("mlp", dict(activation=None), ValueError, "activation must be one of"),
    ("mlp", dict(dropout_p=1.0), ValueError, r"dropout_p must be a real number in \[0, 1\)"),
    ("mlp", dict(dropout_p=-0.1), ValueError, "dropout_p must be a real number"),
    ("mlp", dict(dropout_p="0.1"), ValueError, "dropout_p must be a real number"),
    # gated_mlp
    ("gated_mlp", dict(x=torch.randint(0, 2, (2, N, 4))), TypeError, "x must have dtype"),
    ("gated_mlp", dict(w_gate=_r(8, 5)), ValueError, r"w_gate must have shape \[out, 4\]"),
    ("gated_mlp", dict(b_gate=_r(7)), ValueError, r"b_gate must have shape \(8,\)"),
    ("gated_mlp", dict(w_up=_r(7, 4)), ValueError, r"w_up must have the shape of w_gate \(8, 4\)"),
    ("gated_mlp", dict(b_up=_r(7)), ValueError, r"b_up must have shape \(8,\)"),
    ("gated_mlp", dict(w_down=_r(3, 7)), ValueError, r"w_down must have shape \[out, 8\]"),
    ("gated_mlp", dict(w_down=_half(3, 8)), TypeError, "w_down must have the dtype of x"),
    ("gated_mlp", dict(b_down=_r(4)), ValueError, r"b_down must have shape \(3,\)"),
    ("gated_mlp", dict(activation="swish"), ValueError, "activation must be one of"),
    # attention
    ("attention", dict(q=_r(4, N, 8)), ValueError, "q must be 4-D"),
    ("attention", dict(q=torch.ones(2, 4, N, 8, dtype=torch.long)), TypeError, "q must have dtype"),
    ("attention", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("attention", dict(k=_r(2, 3, N, 8), v=_r(2, 3, N, 8)), ValueError, "h_kv dividing h=4"),
    ("attention", dict(k=_r(2, 2, N, 4)), ValueError, r"k and v must have shape \[B, h_kv, n, d\]"),
    ("attention", dict(k=_r(2, 2, N - 1, 8)), ValueError, r"k and v must have shape"),
    ("attention", dict(k=_r(1, 2, N, 8)), ValueError, r"k and v must have shape"),
    ("attention", dict(k=_r(2, 2, N, 8, dtype=torch.float64)), TypeError, "k must have the dtype of q"),
    ("attention", dict(v=_r(2, 4, N, 8)), ValueError, r"got k \(2, 2, 6, 8\) and v \(2, 4, 6, 8\)"),
    ("attention", dict(v=_half(2, 2, N, 8)), TypeError, "v must have the dtype of q"),
    ("attention", dict(v=_r(2, 2, N, 8, device=META)), ValueError, "v must be on the device of q"),
    ("attention", dict(v=None), TypeError, "v must be a torch.Tensor"),
    ("attention", dict(q=_r(2, 4, N, 0), k=_r(2, 2, N, 0), v=_r(2, 2, N, 0)), ValueError, "head dim d >= 1"),
    ("attention", dict(causal=1), TypeError, "causal must be a bool"),
    ("attention", dict(scale=0.0), ValueError, "scale must be a positive finite"),
    ("attention", dict(scale=-1.0), ValueError, "scale must be a positive finite"),
    ("attention", dict(scale=math.nan), ValueError, "scale must be a positive finite"),
    ("attention", dict(scale=math.inf), ValueError, "scale must be a positive finite"),
    ("attention", dict(scale="1"), TypeError, "scale must be a positive real"),
    ("attention", dict(scale=True), TypeError, "scale must be a positive real"),
    ("attention", dict(mode="kv"), ValueError, "mode must be one of"),
    ("attention", dict(mode=None), ValueError, "mode must be one of"),
    ("attention", dict(key_padding_mask=torch.ones(2, N)), TypeError, "key_padding_mask must have dtype"),
    ("attention", dict(key_padding_mask=torch.ones(2, N - 1, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be a bool \[B, n\] = \[2, 6\]"),
    ("attention", dict(key_padding_mask=torch.ones(N, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    ("attention", dict(key_padding_mask=torch.ones(2, N, dtype=torch.bool, device=META)), ValueError,
     "key_padding_mask must be a bool"),
    ("attention", dict(attn_bias=_r(N)), ValueError, r"attn_bias must be broadcastable to \[B, h, n, n\]"),
    ("attention", dict(attn_bias=_r(3, N, N)), ValueError, "attn_bias must be broadcastable"),
    ("attention", dict(attn_bias=_r(1, 1, 4, N, N)), ValueError, "attn_bias must be broadcastable"),
    ("attention", dict(attn_bias=_r(4, N, N - 1)), ValueError, "attn_bias must be broadcastable"),
    ("attention", dict(attn_bias=_r(4, N, N, device=META)), ValueError, "attn_bias must be broadcastable"),
    ("attention", dict(attn_bias=torch.zeros(4, N, N, dtype=torch.long)), TypeError, "attn_bias must have dtype"),
    ("attention", dict(dropout_p=1.0), ValueError, r"dropout_p must be a real number in \[0, 1\)"),
    ("attention", dict(dropout_p=-0.5), ValueError, "dropout_p must be a real number"),
    ("attention", dict(dropout_p=None), ValueError, "dropout_p must be a real number"),
    # layer_norm
    ("layer_norm", dict(x=_r(4)), ValueError, "x must have at least 2 dims"),
    ("layer_norm", dict(x=torch.ones(2, N, 4, dtype=torch.long)), TypeError, "x must have dtype"),
    ("layer_norm", dict(weight=_r(5)), ValueError, r"weight must have shape \[4\]"),
    ("layer_norm", dict(weight=torch.ones(4, dtype=torch.long)), TypeError, "weight must have dtype"),
    ("layer_norm", dict(weight=_r(4, device=META)), ValueError, "weight must be on the device of x"),
    ("layer_norm", dict(bias=_r(4, 1)), ValueError, r"bias must have shape \[4\]"),
    ("layer_norm", dict(bias="b"), TypeError, "bias must be a torch.Tensor"),
    ("layer_norm", dict(eps=-1e-5), ValueError, "eps must be a finite number >= 0"),
    ("layer_norm", dict(eps=math.nan), ValueError, "eps must be a finite number"),
    ("layer_norm", dict(eps="1e-5"), ValueError, "eps must be a finite number"),
    # rms_norm
    ("rms_norm", dict(x=_r(4)), ValueError, "x must have at least 2 dims"),
    ("rms_norm", dict(weight=_r(3)), ValueError, r"weight must have shape \[4\]"),
    ("rms_norm", dict(weight=[1.0] * 4), TypeError, "weight must be a torch.Tensor"),
    ("rms_norm", dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    ("rms_norm", dict(weight_offset="1"), TypeError, "weight_offset must be a real number"),
    ("rms_norm", dict(weight_offset=True), TypeError, "weight_offset must be a real number"),
    ("rms_norm", dict(scale_in_float=1), TypeError, "scale_in_float must be a bool"),
    # dropout
    ("dropout", dict(x=_r(N)), ValueError, "x must have at least 2 dims"),
    ("dropout", dict(x=torch.ones(2, N, 4, dtype=torch.long)), TypeError, "x must have dtype"),
    ("dropout", dict(p=1.0), ValueError, r"p must be a real number in \[0, 1\)"),
    ("dropout", dict(p=-0.1), ValueError, "p must be a real number"),
    ("dropout", dict(p="0.5"), ValueError, "p must be a real number"),
    ("dropout", dict(p=True), ValueError, "p must be a real number"),
    # linear_cross_entropy
    ("linear_cross_entropy", dict(h=_r(4)), ValueError, "h must have at least 2 dims"),
    ("linear_cross_entropy", dict(h=torch.ones(2, N, 4, dtype=torch.long)), TypeError, "h must have dtype"),
    ("linear_cross_entropy", dict(weight=_r(7, 5)), ValueError, r"weight must have shape \[vocab, 4\]"),
    ("linear_cross_entropy", dict(weight=_r(7)), ValueError, "weight must be 2-D"),
    ("linear_cross_entropy", dict(weight=_half(7, 4)), TypeError, "weight must have the dtype of h"),
    ("linear_cross_entropy", dict(target=torch.zeros(2, N)), TypeError, "target must have dtype"),
    ("linear_cross_entropy", dict(target=torch.zeros(2, N, dtype=torch.int32)), TypeError, "target must have dtype"),
    ("linear_cross_entropy", dict(target=torch.zeros(2, N - 1, dtype=torch.long)), ValueError,
     r"target must be an int64 tensor of shape \(2, 6\)"),
    ("linear_cross_entropy", dict(target=torch.zeros(2, N, dtype=torch.long, device=META)), ValueError,
     "target must be an int64 tensor"),
    ("linear_cross_entropy", dict(bias=_r(6)), ValueError, r"bias must have shape \[7\]"),
    ("linear_cross_entropy", dict(bias=_half(7)), TypeError, "bias must have the dtype of h"),
    ("linear_cross_entropy", dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    ("linear_cross_entropy", dict(ignore_index=False), TypeError, "ignore_index must be an int"),
    ("linear_cross_entropy", dict(reduction="none"), ValueError, "reduction must be one of"),
    ("linear_cross_entropy", dict(reduction=None), ValueError, "reduction must be one of"),
    # tokenwise
    ("tokenwise", dict(fn=3), TypeError, "fn must be callable"),
    ("tokenwise", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("tokenwise", dict(dim=3), ValueError, "dim must index a dim of x"),
]


@pytest.mark.parametrize("case", range(len(ARG_CASES)), ids=lambda i: f"{ARG_CASES[i][0]}-{i}")
def test_bad_argument(case):
    op, over, error, match = ARG_CASES[case]
    for requires_grad in (False, True):
        with pytest.raises(error, match=match):
            call(op, requires_grad, **over)


def test_every_argument_of_every_public_function_has_a_case():
    """The table above names each argument of each function at least once (keep_idx, grad_scale
    and backend have their own tests)."""
    import inspect

    named = {}
    for op, over, _, _ in ARG_CASES:
        named.setdefault(op, set()).update(over)
    for op, (fn, _) in SPECS.items():
        params = set(inspect.signature(fn).parameters) - {"keep_idx", "grad_scale", "backend"}
        assert params <= named.get(op, set()), (op, params - named.get(op, set()))


def test_direct_op_calls_validate_too():
    x, w = _r(2, N, 4), _r(3, 4)
    cases = [
        lambda: torch.ops.sbp.linear(x, w, None, torch.tensor([3, 1])),
        lambda: torch.ops.sbp.pointwise_conv(_r(2, 4, 2, 3), w, None, torch.tensor([0, 0])),
        lambda: torch.ops.sbp.mlp(x, _r(8, 4), None, _r(3, 8), None, torch.tensor([0, N])),
        lambda: torch.ops.sbp.gated_mlp(x, _r(8, 4), None, _r(8, 4), None, _r(3, 8), None, torch.tensor([2, 1])),
        lambda: torch.ops.sbp.attention(_r(1, 2, N, 8), _r(1, 2, N, 8), _r(1, 2, N, 8), torch.tensor([-1])),
        lambda: torch.ops.sbp.layer_norm(x, None, None, torch.tensor([1, 1])),
        lambda: torch.ops.sbp.rms_norm(x, None, torch.tensor([N])),
        lambda: torch.ops.sbp.dropout(x, torch.tensor([5, 4]), 0.5),
        lambda: torch.ops.sbp.linear_cross_entropy(x, _r(7, 4), torch.zeros(2, N, dtype=torch.long),
                                                   torch.tensor([0, 7])),
    ]
    for case in cases:
        with pytest.raises(ValueError, match="keep_idx"):
            case()
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.ops.sbp.attention(_r(1, 2, N, 8), _r(1, 2, N, 8), _r(1, 2, N, 8), KEEP, False, None, "x")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("in_step", [False, True])
@pytest.mark.parametrize("via", ["numpy", "data"])
def test_keep_idx_changed_in_place_between_calls_is_checked_again(op, in_step, via):
    """A validated keep_idx changed in place (no version bump) is validated again at the next
    call: a duplicate or an out-of-range value raises ValueError, never a raw RuntimeError, and a
    new valid set gives the gradients of that set (nothing stale, also inside a step, where
    gathers are shared between calls)."""
    keep = torch.tensor([0, 2, 5])

    def write(values):
        if via == "numpy":
            keep.numpy()[:] = values
        else:
            keep.data.copy_(torch.tensor(values))

    with sbp_kernels.step() if in_step else torch.enable_grad():
        first = leaf_grad(op, keep)
        assert torch.equal(first, leaf_grad(op, torch.tensor([0, 2, 5])))
        write([0, 2, 2])
        with pytest.raises(ValueError, match="without duplicates"):
            call(op, True, keep_idx=keep)
        write([0, 2, N])
        with pytest.raises(ValueError, match="keep_idx values must lie in"):
            call(op, True, keep_idx=keep)
        write([1, 3, 4])
        changed = leaf_grad(op, keep)
        assert torch.equal(changed, leaf_grad(op, torch.tensor([1, 3, 4])))


@pytest.mark.parametrize("op", OPS)
def test_keep_idx_changed_between_forward_and_backward(op):
    """The op keeps its own copy of the keep set for backward: changing the caller's tensor after
    the forward changes nothing."""
    fn, build = SPECS[op]
    torch.manual_seed(0)
    args = build()
    keep = torch.tensor([0, 2, 5])
    args["keep_idx"] = keep
    first = next(name for name, t in args.items() if isinstance(t, torch.Tensor))
    args[first].requires_grad_()
    torch.manual_seed(1)
    out = fn(*args.values())
    keep.numpy()[:] = [0, 0, 9]  # a duplicate and an out-of-range position
    (out.sum() if out.dim() else out).backward()
    assert torch.equal(args[first].grad, leaf_grad(op, torch.tensor([0, 2, 5])))


ZERO_BATCH = {
    "linear": dict(x=_r(0, N, 4)),
    "pointwise_conv": dict(x=_r(0, 4, 2, 3)),
    "mlp": dict(x=_r(0, N, 4)),
    "gated_mlp": dict(x=_r(0, N, 4)),
    "attention": dict(q=_r(0, 4, N, 8), k=_r(0, 2, N, 8), v=_r(0, 2, N, 8)),
    "layer_norm": dict(x=_r(0, N, 4)),
    "rms_norm": dict(x=_r(0, N, 4)),
    "dropout": dict(x=_r(0, N, 4)),
    "linear_cross_entropy": dict(h=_r(0, N, 4), target=torch.zeros(0, N, dtype=torch.long)),
    "tokenwise": dict(x=_r(0, N, 4)),
}


@pytest.mark.parametrize("op", OPS)
def test_zero_size_batch_behaves_as_the_dense_op(op):
    """An empty batch: the forward gives what the dense op gives (here: the op without a graph),
    and the backward runs, giving empty gradients."""
    with torch.no_grad():
        dense = call(op, **ZERO_BATCH[op])
    over = {name: t.clone() for name, t in ZERO_BATCH[op].items()}
    leaf = next(iter(over.values())).requires_grad_()
    out = call(op, **over)
    assert out.shape == dense.shape
    torch.testing.assert_close(out, dense, equal_nan=True)
    (out.sum() if out.dim() else out).backward()
    assert leaf.grad.shape == leaf.shape


def test_unavailable_backend_is_refused_with_reason():
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="backend='cuda' cannot run sbp.mlp.*has no cuda kernels"):
        sbp_kernels.mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None, KEEP, backend="cuda")
    for op in ("gated_mlp", "layer_norm", "rms_norm", "dropout"):
        with pytest.raises(ValueError, match=f"cannot run sbp.{op}"):
            call(op, True, backend="triton")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="backend='triton' cannot run sbp.linear on cpu"):
        sbp_kernels.linear(x, torch.randn(3, 4), None, KEEP, backend="triton")


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        sbp_kernels.set_backend("numpy")


def test_auto_backend_is_found_once_per_op_and_device(monkeypatch):
    """A GPU step resolves "auto" at every op: the answer is found once per op and device, and
    again when what it depends on changes (the default set by set_backend, triton's availability)."""
    backend = sbp_kernels.backend
    cuda = torch.device("cuda")
    monkeypatch.setattr(backend, "_found", {})
    monkeypatch.setattr(backend, "_triton_error", None)
    monkeypatch.setattr(backend, "_warned", set())
    searches = []
    search = backend._resolve
    monkeypatch.setattr(backend, "_resolve", lambda *args: searches.append(args) or search(*args))
    assert [backend.resolve("auto", "linear", cuda) for _ in range(3)] == ["triton"] * 3
    assert len(searches) == 1
    monkeypatch.setattr(backend, "_triton_error", "triton is not installed (a test)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one warning
        expected = "cuda" if sbp_kernels._extension.built_with_cuda else "torch"
        assert backend.resolve("auto", "linear", cuda) == expected
    monkeypatch.setattr(backend, "_default", "torch")
    assert backend.resolve("auto", "linear", cuda) == "torch"
    assert len(searches) == 3


def test_global_default_is_a_preference(monkeypatch):
    """set_backend names a preference: ops it cannot run fall back (one warning), calls that name
    a backend themselves must get it."""
    monkeypatch.setattr(sbp_kernels.backend, "_default", "cuda")
    monkeypatch.setattr(sbp_kernels.backend, "_warned", set())
    x = torch.randn(2, 6, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="sbp.mlp: running the torch backend"):
        sbp_kernels.mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None, KEEP).sum().backward()
    assert x.grad.abs().sum() > 0
