"""sbp::mlp and sbp::gated_mlp (DESIGN.md 3.4): MLPs that save only x and the hidden
pre-activations of kept rows, so the wide hidden tensors of dropped rows are never stored.

- mlp: fc2(act(fc1(x))) (timm Mlp, ViT / ConvNeXt, BERT, GPT-2); saves x_K and h_K = fc1(x)_K.
- gated_mlp: down(act(gate(x)) * up(x)) (SwiGLU / GeGLU of Llama, Qwen, Mistral, Gemma, timm
  SwiGLU / GluMlp); saves x_K and the kept rows of gate(x) and up(x).

Each op is a composite of its *_forward op, which also returns those kept rows for the autograd
formula to save (setup_context sees inputs and outputs only). Nothing is saved or computed that
nobody needs: x_K only when a first-layer weight needs a gradient, and no weight-gradient GEMM for
a frozen weight.
"""
import math

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .. import replay
from .. import reference
from ..reference import ACTIVATIONS
from ..validation import (
    check_bias, check_grad_scale, check_in_kernel, check_keep_idx, check_like, check_tensor, is_real,
)
from . import _library  # noqa: F401  (declares the schemas)
from ._common import (
    autocast_inputs, cpp_eager, cpp_face, eager, gather_rows, in_memory_order, kept_rows_for_cpp, needs_graph,
    own_keep_idx, traced,
)

_MLP_EAGER = cpp_face("mlp_eager")


def mlp(x, w1, b1, w2, b2, keep_idx, activation="gelu", grad_scale=1.0, dropout_p=0.0, *, backend="auto"):
    """fc2(dropout(act(fc1(x)))) exactly; gradients only through positions keep_idx of dim -2.

    x [..., n, c_in], w1 [hidden, c_in], b1 [hidden] or None, w2 [c_out, hidden], b2 [c_out] or
    None; activation one of reference.ACTIVATIONS ("gelu" (erf, as nn.GELU()), "gelu_tanh",
    "relu", "silu", ...); dropout_p: dropout of the hidden activation (as nn.Dropout draws it;
    the kept rows of its mask are saved as bool).
    """
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    check_args(x, _layers(w1, b1, w2, b2), keep_idx, activation, grad_scale, backend, dropout_p)
    keep_idx = own_keep_idx(keep_idx)
    return apply(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend)


def gated_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation="silu", grad_scale=1.0, *,
              backend="auto"):
    """down(act(gate(x)) * up(x)) exactly; gradients only through positions keep_idx of dim -2.

    x [..., n, c_in], w_gate and w_up [hidden, c_in], w_down [c_out, hidden], biases or None.
    """
    x, w_gate, b_gate, w_up, b_up, w_down, b_down = autocast_inputs(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    check_args(x, _gated_layers(w_gate, b_gate, w_up, b_up, w_down, b_down), keep_idx, activation, grad_scale, backend)
    keep_idx = own_keep_idx(keep_idx)
    return apply_gated(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale, backend)


# The activations of the MLP's C++ face (csrc/eager.cpp), by its codes.
EAGER_ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def apply(x, w1, b1, w2, b2, keep_idx, activation="gelu", grad_scale=1.0, dropout_p=0.0, backend="auto"):
    """sbp.mlp on checked arguments (a step's keep set): the modules' entry point."""
    args = (x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend)
    if not needs_graph(x, w1, b1, w2, b2):
        return _mlp_forward(*args, gather=False)[0]
    if traced():
        return torch.ops.sbp.mlp(*args)
    if dropout_p == 0 and activation in EAGER_ACTIVATIONS and cpp_eager(resolve_backend(backend, x, dropout_p)):
        x_kept = kept_rows_for_cpp(x, keep_idx, -2, w1.requires_grad)
        return _MLP_EAGER(x, w1, b1, w2, b2, keep_idx, x_kept, EAGER_ACTIVATIONS[activation], grad_scale)
    return MlpFunction.apply(*args)[0]


def apply_gated(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation="silu", grad_scale=1.0,
                backend="auto"):
    """sbp.gated_mlp on checked arguments (a step's keep set): the modules' entry point."""
    args = (x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    if not needs_graph(*args):
        return _dense_gated(*args, activation)
    if traced():
        return torch.ops.sbp.gated_mlp(*args, keep_idx, activation, grad_scale, backend)
    return GatedMlpFunction.apply(*args, keep_idx, activation, grad_scale, backend)[0]


def check_args(x, layers, keep_idx, activation, grad_scale, backend, dropout_p=0.0):
    """layers: (weight, bias, weight name, bias name, input) per linear layer, input None for x or
    the index of the layer whose output it reads (see _layers / _gated_layers)."""
    check_tensor(x, "x", min_ndim=2)
    for w, b, w_name, b_name, reads in layers:
        in_features = x.shape[-1] if reads is None else layers[reads][0].shape[0]
        check_tensor(w, w_name, ndim=2)
        check_like(w, x, w_name, "x")
        if w.shape[1] != in_features:
            raise ValueError(f"{w_name} must have shape [out, {in_features}], got {tuple(w.shape)}")
        check_bias(b, w.shape[0], x, b_name)
    if len(layers) == 3 and layers[1][0].shape != layers[0][0].shape:  # gated: up matches gate
        raise ValueError(f"w_up must have the shape of w_gate {tuple(layers[0][0].shape)}, got {tuple(layers[1][0].shape)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not is_real(dropout_p) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    check_keep_idx(keep_idx, x.shape[-2], x.device)
    check_grad_scale(grad_scale)
    _backend.check_name(backend)


def _layers(w1, b1, w2, b2):
    return ((w1, b1, "w1", "b1", None), (w2, b2, "w2", "b2", 0))


def _gated_layers(w_gate, b_gate, w_up, b_up, w_down, b_down):
    return (
        (w_gate, b_gate, "w_gate", "b_gate", None), (w_up, b_up, "w_up", "b_up", None),
        (w_down, b_down, "w_down", "b_down", 0),
    )


def _dense_gated(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    return F.linear(ACTIVATIONS[activation][0](F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)


def _mlp_forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend, gather=True):
    """(out, kept rows of fc1's output, kept rows of the dropout mask (empty without dropout))."""
    hidden = in_memory_order(F.linear, x, w1, b1)
    a = ACTIVATIONS[activation][0](hidden)
    mask = None
    if dropout_p > 0:
        a, mask = replay.dropout(a, dropout_p, lambda m: gather_rows(m, keep_idx, -2))
    out = in_memory_order(F.linear, a, w2, b2)
    if not gather:
        return out, None, None
    be = resolve_backend(backend, x, dropout_p)
    mask_kept = x.new_empty((0,), dtype=torch.bool) if mask is None else gather_rows(mask, keep_idx, -2, be)
    return out, gather_rows(hidden, keep_idx, -2, be), mask_kept


def resolve_backend(backend, x, dropout_p):
    def limits(name):
        return "the Triton MLP backward has no dropout" if name == "triton" and dropout_p > 0 else None

    return _backend.resolve(backend, "mlp", x.device, limits=limits)


def _gated_mlp_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale, backend):
    gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
    out = F.linear(ACTIVATIONS[activation][0](gate) * up, w_down, b_down)
    be = _backend.resolve(backend, "gated_mlp", x.device)
    return out, gather_rows(gate, keep_idx, -2, be), gather_rows(up, keep_idx, -2, be)


@torch.library.impl("sbp::mlp", "CompositeImplicitAutograd")
def _mlp_composite(x, w1, b1, w2, b2, keep_idx, activation="gelu", grad_scale=1.0, dropout_p=0.0, backend="auto"):
    return torch.ops.sbp.mlp_forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend)[0]


@torch.library.impl("sbp::gated_mlp", "CompositeImplicitAutograd")
def _gated_mlp_composite(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation="silu", grad_scale=1.0,
                         backend="auto"):
    args = (x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale, backend)
    return torch.ops.sbp.gated_mlp_forward(*args)[0]


@torch.library.impl("sbp::mlp_forward", "CompositeExplicitAutograd")
def _mlp_forward_kernel(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend):
    check_in_kernel(check_args, x, _layers(w1, b1, w2, b2), keep_idx, activation, grad_scale, backend, dropout_p)
    return _mlp_forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend)


@torch.library.impl("sbp::gated_mlp_forward", "CompositeExplicitAutograd")
def _gated_mlp_forward_kernel(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale,
                              backend):
    weights = (w_gate, b_gate, w_up, b_up, w_down, b_down)
    check_in_kernel(check_args, x, _gated_layers(*weights), keep_idx, activation, grad_scale, backend)
    return _gated_mlp_forward(x, *weights, keep_idx, activation, grad_scale, backend)


@torch.library.register_fake("sbp::mlp_forward")
def _mlp_forward_fake(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend):
    check_args(x, _layers(w1, b1, w2, b2), keep_idx, activation, grad_scale, backend, dropout_p)
    out = x.new_empty((*x.shape[:-1], w2.shape[0]))
    kept = (*x.shape[:-2], keep_idx.shape[0], w1.shape[0])
    return out, x.new_empty(kept), x.new_empty(kept if dropout_p > 0 else (0,), dtype=torch.bool)


@torch.library.register_fake("sbp::gated_mlp_forward")
def _gated_mlp_forward_fake(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale,
                            backend):
    weights = (w_gate, b_gate, w_up, b_up, w_down, b_down)
    check_args(x, _gated_layers(*weights), keep_idx, activation, grad_scale, backend)
    out = x.new_empty((*x.shape[:-1], w_down.shape[0]))
    kept = (*x.shape[:-2], keep_idx.shape[0], w_gate.shape[0])
    return out, x.new_empty(kept), x.new_empty(kept)


def _needs(ctx, biases):
    """needs_input_grad of the tensor inputs, False for absent biases."""
    flags = list(ctx.needs_input_grad)
    for i, b in biases:
        flags[i] = flags[i] and b is not None
    return tuple(flags)


class MlpFunction(torch.autograd.Function):
    """The eager face of sbp::mlp_forward; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend):
        return _mlp_forward(x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, keep_idx, activation, grad_scale, dropout_p, backend = inputs
        ctx.backend = resolve_backend(backend, x, dropout_p)
        ctx.activation, ctx.grad_scale, ctx.dropout_p = activation, grad_scale, dropout_p
        ctx.x_shape = x.shape
        ctx.needs = _needs(ctx, ((2, b1), (4, b2)))[:5]
        ctx.mark_non_differentiable(output[1], output[2])
        x_kept = gather_rows(x, keep_idx, -2, ctx.backend) if ctx.needs[1] else None
        ctx.save_for_backward(x_kept, output[1], output[2], w1 if ctx.needs[0] else None, w2, keep_idx)

    @staticmethod
    def backward(ctx, grad_out, _grad_hidden_kept, _grad_mask_kept):
        x_kept, h_kept, drop_kept, w1, w2, keep_idx = ctx.saved_tensors
        *lead, n, c_in = ctx.x_shape
        batch, n_keep = math.prod(lead), keep_idx.shape[0]
        grads = mlp_backward(
            ctx.backend,
            grad_out.reshape(batch, n, grad_out.shape[-1]),
            None if x_kept is None else x_kept.reshape(batch, n_keep, c_in),
            h_kept.reshape(batch, n_keep, h_kept.shape[-1]),
            w1, w2, keep_idx, ctx.activation, ctx.grad_scale, ctx.needs,
            drop_kept.reshape(batch, n_keep, h_kept.shape[-1]) if ctx.dropout_p > 0 else None, ctx.dropout_p,
        )
        grad_x = None if grads[0] is None else grads[0].view(ctx.x_shape)
        return (grad_x, *grads[1:], None, None, None, None, None)


class GatedMlpFunction(torch.autograd.Function):
    """The eager face of sbp::gated_mlp_forward; setup_context and backward are the op's formula."""

    @staticmethod
    def forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale, backend):
        return _gated_mlp_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale,
                                  backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep_idx, activation, grad_scale, backend = inputs
        ctx.backend = _backend.resolve(backend, "gated_mlp", x.device)
        ctx.activation, ctx.grad_scale = activation, grad_scale
        ctx.x_shape = x.shape
        ctx.needs = _needs(ctx, ((2, b_gate), (4, b_up), (6, b_down)))[:7]
        ctx.mark_non_differentiable(output[1], output[2])
        need_x = ctx.needs[0]
        x_kept = gather_rows(x, keep_idx, -2, ctx.backend) if ctx.needs[1] or ctx.needs[3] else None
        ctx.save_for_backward(
            x_kept, output[1], output[2], w_gate if need_x else None, w_up if need_x else None, w_down, keep_idx
        )

    @staticmethod
    def backward(ctx, grad_out, _grad_gate_kept, _grad_up_kept):
        x_kept, g_kept, u_kept, w_gate, w_up, w_down, keep_idx = ctx.saved_tensors
        *lead, n, c_in = ctx.x_shape
        batch, n_keep = math.prod(lead), keep_idx.shape[0]
        hidden = g_kept.shape[-1]
        grads = reference.gated_mlp_backward(
            grad_out.reshape(batch, n, grad_out.shape[-1]),
            None if x_kept is None else x_kept.reshape(batch, n_keep, c_in),
            g_kept.reshape(batch, n_keep, hidden),
            u_kept.reshape(batch, n_keep, hidden),
            w_gate, w_up, w_down, keep_idx, ctx.activation, ctx.grad_scale, ctx.needs,
        )
        grad_x = None if grads[0] is None else grads[0].view(ctx.x_shape)
        return (grad_x, *grads[1:], None, None, None, None)


def mlp_backward(backend, grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs, drop_kept,
                 dropout_p):
    if backend == "torch":
        return reference.mlp_backward(
            grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs, drop_kept, dropout_p
        )
    from ..triton import mlp as triton_mlp  # imported lazily: triton is optional

    return triton_mlp.mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs=needs)


torch.library.register_autograd("sbp::mlp_forward", MlpFunction.backward, setup_context=MlpFunction.setup_context)
torch.library.register_autograd(
    "sbp::gated_mlp_forward", GatedMlpFunction.backward, setup_context=GatedMlpFunction.setup_context
)
MlpFunction = eager(MlpFunction)
GatedMlpFunction = eager(GatedMlpFunction)
