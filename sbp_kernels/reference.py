"""The formulas of DESIGN.md section 3 in plain PyTorch, on kept rows only.

This is the `torch` backend and the oracle every other backend is tested against. Shapes follow
the kernels' row views: position axis 1, batch axis 0, channels last; `keep_idx` indexes axis 1.
"""
import torch
import torch.nn.functional as F


def kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first):
    """Backward of y = x @ weight.T (+ bias) on kept rows (DESIGN.md 3.1, 3.2).

    grad_out [B, n, c_out] (any strides), x_kept [B, n_keep, c_in], weight [c_out, c_in].
    Returns grad_x [B, n, c_in] (zero on dropped rows; stored [B, c_in, n] when channels_first),
    grad_weight [c_out, c_in], grad_bias [c_out].
    """
    batch, n, c_out = grad_out.shape
    c_in = weight.shape[1]
    dy_kept = grad_out.index_select(1, keep_idx) * grad_scale
    grad_weight = dy_kept.reshape(-1, c_out).t() @ x_kept.reshape(-1, c_in)
    grad_bias = dy_kept.sum((0, 1))
    grad_x = _zeros_rows(grad_out, batch, n, c_in, channels_first)
    grad_x[:, keep_idx] = dy_kept @ weight
    return grad_x, grad_weight, grad_bias


def _zeros_rows(like, batch, n, channels, channels_first):
    if channels_first:
        return like.new_zeros(batch, channels, n).transpose(1, 2)
    return like.new_zeros(batch, n, channels)


# activation name -> (forward, backward(grad, pre_activation)); the backward functions are the
# ones PyTorch's own autograd uses, so r = 1 matches dense gradients exactly.
ACTIVATIONS = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="none")),
    "gelu_tanh": (
        lambda h: F.gelu(h, approximate="tanh"),
        lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    ),
    "relu": (F.relu, lambda g, h: torch.ops.aten.threshold_backward(g, h, 0)),
    "silu": (F.silu, torch.ops.aten.silu_backward),
}


def mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale):
    """Backward of fc2(act(fc1(x))) on kept rows (DESIGN.md 3.4).

    grad_out [B, n, c_out], x_kept [B, n_keep, c_in], h_kept [B, n_keep, hidden] (fc1 output
    before the activation). Returns grad_x [B, n, c_in], grad_w1, grad_b1, grad_w2, grad_b2.
    """
    act, act_backward = ACTIVATIONS[activation]
    batch, n, c_out = grad_out.shape
    c_in, hidden = w1.shape[1], w1.shape[0]
    dy_kept = grad_out.index_select(1, keep_idx) * grad_scale
    grad_w2 = dy_kept.reshape(-1, c_out).t() @ act(h_kept).reshape(-1, hidden)
    grad_b2 = dy_kept.sum((0, 1))
    dh_kept = act_backward(dy_kept @ w2, h_kept)
    grad_w1 = dh_kept.reshape(-1, hidden).t() @ x_kept.reshape(-1, c_in)
    grad_b1 = dh_kept.sum((0, 1))
    grad_x = _zeros_rows(grad_out, batch, n, c_in, False)
    grad_x[:, keep_idx] = dh_kept @ w1
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
