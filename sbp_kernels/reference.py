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


# --- attention (DESIGN.md 3.3) -------------------------------------------------------------------
# Layout [B, h, n, d], token axis 2. Computed in float32 (float64 for float64 inputs) and cast back.

_ATTENTION_BLOCK_ELEMENTS = 1 << 24  # scores held at once: bounds the reference's memory


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _query_blocks(n_rows, batch_heads, n_cols):
    """Slices of query rows such that one block's scores hold about _ATTENTION_BLOCK_ELEMENTS."""
    step = max(1, _ATTENTION_BLOCK_ELEMENTS // max(1, batch_heads * n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def attention_forward(q, k, v, causal, scale):
    """(out, lse) of exact softmax attention, out in q's dtype, lse [B, h, n] in float32 (float64
    for float64 inputs): the row log-sum-exp of scale * q k^T (key j > query i masked if causal)."""
    batch, heads, n, _ = q.shape
    acc = _acc_dtype(q.dtype)
    k_t, v_a = k.to(acc).transpose(-1, -2), v.to(acc)
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, n), dtype=acc)
    for rows in _query_blocks(n, batch * heads, n):
        s = (q[:, :, rows].to(acc) @ k_t) * scale
        if causal:
            qpos = torch.arange(n, device=q.device)[rows]
            s = s.masked_fill(torch.arange(n, device=q.device) > qpos[:, None], float("-inf"))
        lse_rows = torch.logsumexp(s, -1)
        out[:, :, rows] = (torch.exp(s - lse_rows[..., None]) @ v_a).to(q.dtype)
        lse[:, :, rows] = lse_rows
    return out, lse


def attention_backward(dout_kept, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, n, causal, scale, mode, grad_scale):
    """Backward of exact attention on kept tokens (DESIGN.md 3.3).

    dout_kept, q_kept, out_kept [B, h, n_keep, d] and lse_kept [B, h, n_keep]: the kept query rows.
    k_saved, v_saved: the kept rows [B, h, n_keep, d] (mode "qkv") or all rows [B, h, n, d]
    (mode "q"). For kept queries i and keys j (kept in mode "qkv", all in mode "q"; j <= i in
    original positions when causal): P_ij = exp(scale q_i.k_j - lse_i), dV_j = sum_i P_ij dO_i,
    dS_ij = P_ij (dO_i.v_j - dO_i.o_i), dQ_i = scale sum_j dS_ij k_j, dK_j = scale sum_i dS_ij q_i,
    all times grad_scale. Returns full-size dq, dk, dv [B, h, n, d], zero on tokens that take no
    gradient. Blocks of query rows keep the probability matrix at most ~2^24 elements at a time.
    """
    batch, heads, n_keep, d = q_kept.shape
    dtype, acc = q_kept.dtype, _acc_dtype(q_kept.dtype)
    q_a, k_a, v_a = q_kept.to(acc), k_saved.to(acc), v_saved.to(acc)
    do_a = dout_kept.to(acc) * grad_scale
    delta = (do_a * out_kept.to(acc)).sum(-1)  # D_i = dO_i . o_i
    qpos = keep_idx
    kpos = keep_idx if mode == "qkv" else torch.arange(n, device=keep_idx.device)
    dk_a = torch.zeros_like(k_a)
    dv_a = torch.zeros_like(v_a)
    dq_a = torch.empty_like(q_a)
    for rows in _query_blocks(n_keep, batch * heads, k_a.shape[2]):
        p = torch.exp((q_a[:, :, rows] @ k_a.transpose(-1, -2)) * scale - lse_kept[:, :, rows, None].to(acc))
        if causal:
            p = p.masked_fill(kpos > qpos[rows, None], 0.0)
        dv_a += p.transpose(-1, -2) @ do_a[:, :, rows]
        ds = p * (do_a[:, :, rows] @ v_a.transpose(-1, -2) - delta[:, :, rows, None])
        dq_a[:, :, rows] = (ds @ k_a) * scale
        dk_a += (ds.transpose(-1, -2) @ q_a[:, :, rows]) * scale
    dq = q_kept.new_zeros((batch, heads, n, d))
    dq[:, :, keep_idx] = dq_a.to(dtype)
    if mode == "q":
        return dq, dk_a.to(dtype), dv_a.to(dtype)
    dk = q_kept.new_zeros((batch, heads, n, d))
    dv = q_kept.new_zeros((batch, heads, n, d))
    dk[:, :, keep_idx] = dk_a.to(dtype)
    dv[:, :, keep_idx] = dv_a.to(dtype)
    return dq, dk, dv
