"""The formulas of DESIGN.md section 3 in plain PyTorch, on kept rows only.

This is the `torch` backend and the oracle every other backend is tested against. Shapes follow
the kernels' row views: position axis 1, batch axis 0, channels last; `keep_idx` indexes axis 1.
"""
import math

import torch
import torch.nn.functional as F


def kept_rows_backward(grad_out, x_kept, weight, keep_idx, grad_scale, channels_first, c_in=None,
                       needs=(True, True, True)):
    """Backward of y = x @ weight.T (+ bias) on kept rows (DESIGN.md 3.1, 3.2).

    grad_out [B, n, c_out] (any strides), x_kept [B, n_keep, c_in] (None when the weight needs no
    gradient), weight [c_out, c_in] (None when x needs none); needs: (x, weight, bias) flags.
    Returns grad_x [B, n, c_in] (zero on dropped rows; stored [B, c_in, n] when channels_first),
    grad_weight [c_out, c_in], grad_bias [c_out], each None when not needed.
    """
    batch, n, c_out = grad_out.shape
    c_in = weight.shape[1] if c_in is None else c_in
    need_dx, need_dw, need_db = needs
    dy_kept = _scaled_kept_rows(grad_out, keep_idx, grad_scale)
    grad_weight = _weight_grad(dy_kept, x_kept) if need_dw else None
    grad_bias = dy_kept.sum((0, 1)) if need_db else None
    grad_x = None
    if need_dx:
        grad_x = _zeros_rows(grad_out, batch, n, c_in, channels_first)
        grad_x.index_copy_(1, keep_idx.long(), dy_kept @ weight)
    return grad_x, grad_weight, grad_bias


def empty_rows(like, batch, n, channels, channels_first):
    """An uninitialised [batch, n, channels] tensor, stored [batch, channels, n] when channels_first."""
    if channels_first:
        return like.new_empty(batch, channels, n).transpose(1, 2)
    return like.new_empty(batch, n, channels)


def _zeros_rows(like, batch, n, channels, channels_first):
    return empty_rows(like, batch, n, channels, channels_first).zero_()


def _gelu_new(h):
    """GELU in the tanh form written out, as GPT-2 / BERT's original code (Hugging Face
    NewGELUActivation) computes it, operation for operation."""
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


# activation name -> (forward, backward(grad, pre_activation)); the backward functions are the
# ones PyTorch's own autograd uses, so r = 1 matches dense gradients exactly ("gelu_new" is the
# tanh GELU written out: same function, so the same derivative).
ACTIVATIONS = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="none")),
    "gelu_tanh": (
        lambda h: F.gelu(h, approximate="tanh"),
        lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    ),
    "gelu_new": (_gelu_new, lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh")),
    "relu": (F.relu, lambda g, h: torch.ops.aten.threshold_backward(g, h, 0)),
    "silu": (F.silu, torch.ops.aten.silu_backward),
}


def activation_of(fn):
    """The ACTIVATIONS name of a callable (an activation module or function) that computes exactly
    what that activation computes, else None. Recognised by behaviour, bitwise, on a probe of
    inputs across the range (and in half precision), so every library's class for GELU / SiLU /
    ReLU is found and nothing that differs by a rounding is taken for one."""
    probe = torch.cat([torch.linspace(-12, 12, 2001), torch.tensor([0.0, -0.0, 1e-6, -1e-6, 80.0, -80.0])])
    for name, (forward, _) in ACTIVATIONS.items():
        try:
            if all(torch.equal(fn(p.clone()), forward(p)) for p in (probe, probe.half())):
                return name
        except Exception:  # noqa: BLE001  (anything that is not an elementwise function)
            return None
    return None


def _scaled_kept_rows(grad_out, keep_idx, grad_scale):
    dy_kept = grad_out.index_select(1, keep_idx)
    return dy_kept * grad_scale if grad_scale != 1.0 else dy_kept


def _weight_grad(dy_rows, x_rows):
    """sum over rows of dy_rows^T x_rows, both [B, n_keep, c]."""
    return dy_rows.flatten(0, 1).t() @ x_rows.flatten(0, 1)


def _scatter_rows(dx_kept, keep_idx, n):
    """[B, n_keep, c] kept rows -> [B, n, c] with zeros on dropped rows."""
    grad_x = dx_kept.new_zeros((dx_kept.shape[0], n, dx_kept.shape[2]))
    return grad_x.index_copy_(1, keep_idx.long(), dx_kept)


def mlp_backward(grad_out, x_kept, h_kept, w1, w2, keep_idx, activation, grad_scale, needs=(True,) * 5,
                 drop_kept=None, dropout_p=0.0):
    """Backward of fc2(dropout(act(fc1(x)))) on kept rows (DESIGN.md 3.4).

    grad_out [B, n, c_out], x_kept [B, n_keep, c_in] (None when w1 needs no gradient), h_kept
    [B, n_keep, hidden] (fc1 output before the activation); needs: (x, w1, b1, w2, b2) flags;
    drop_kept: the dropout keep mask of the kept rows [B, n_keep, hidden] (bool) or None.
    Returns grad_x [B, n, c_in], grad_w1, grad_b1, grad_w2, grad_b2, None where not needed.
    """
    act, act_backward = ACTIVATIONS[activation]
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    dy_kept = _scaled_kept_rows(grad_out, keep_idx, grad_scale)
    keep_scaled = None if drop_kept is None else drop_kept.to(h_kept.dtype) / (1.0 - dropout_p)
    if need_w2:
        a_kept = act(h_kept) if keep_scaled is None else act(h_kept) * keep_scaled
        grad_w2 = _weight_grad(dy_kept, a_kept)
    else:
        grad_w2 = None
    grad_b2 = dy_kept.sum((0, 1)) if need_b2 else None
    if not (need_x or need_w1 or need_b1):
        return None, None, None, grad_w2, grad_b2
    da_kept = dy_kept @ w2
    dh_kept = act_backward(da_kept if keep_scaled is None else da_kept * keep_scaled, h_kept)
    grad_w1 = _weight_grad(dh_kept, x_kept) if need_w1 else None
    grad_b1 = dh_kept.sum((0, 1)) if need_b1 else None
    grad_x = _scatter_rows(dh_kept @ w1, keep_idx, grad_out.shape[1]) if need_x else None
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def gated_mlp_backward(grad_out, x_kept, g_kept, u_kept, w_gate, w_up, w_down, keep_idx, activation, grad_scale,
                       needs=(True,) * 7):
    """Backward of down(act(gate(x)) * up(x)) on kept rows (DESIGN.md 3.4).

    grad_out [B, n, c_out]; x_kept [B, n_keep, c_in] (None when neither gate nor up weight needs a
    gradient); g_kept, u_kept [B, n_keep, hidden] the gate pre-activation and the up output.
    needs: (x, w_gate, b_gate, w_up, b_up, w_down, b_down). Returns the seven gradients, None where
    not needed.
    """
    act, act_backward = ACTIVATIONS[activation]
    need_x, need_wg, need_bg, need_wu, need_bu, need_wd, need_bd = needs
    dy_kept = _scaled_kept_rows(grad_out, keep_idx, grad_scale)
    a_kept = act(g_kept)
    grad_wd = _weight_grad(dy_kept, a_kept * u_kept) if need_wd else None
    grad_bd = dy_kept.sum((0, 1)) if need_bd else None
    if not (need_x or need_wg or need_bg or need_wu or need_bu):
        return None, None, None, None, None, grad_wd, grad_bd
    da_kept = dy_kept @ w_down
    dg_kept = act_backward(da_kept * u_kept, g_kept)
    du_kept = da_kept * a_kept
    grad_wg = _weight_grad(dg_kept, x_kept) if need_wg else None
    grad_bg = dg_kept.sum((0, 1)) if need_bg else None
    grad_wu = _weight_grad(du_kept, x_kept) if need_wu else None
    grad_bu = du_kept.sum((0, 1)) if need_bu else None
    grad_x = _scatter_rows(dg_kept @ w_gate + du_kept @ w_up, keep_idx, grad_out.shape[1]) if need_x else None
    return grad_x, grad_wg, grad_bg, grad_wu, grad_bu, grad_wd, grad_bd


# --- attention (DESIGN.md 3.3) -------------------------------------------------------------------
# Layout [B, h, n, d], token axis 2. Computed in float32 (float64 for float64 inputs) and cast back.

_ATTENTION_BLOCK_ELEMENTS = 1 << 24  # scores held at once: bounds the reference's memory


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _query_blocks(n_rows, batch_heads, n_cols):
    """Slices of query rows such that one block's scores hold about _ATTENTION_BLOCK_ELEMENTS."""
    step = max(1, _ATTENTION_BLOCK_ELEMENTS // max(1, batch_heads * n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _groups(t, kv_heads):
    """[B, h, n, d] -> [B, h_kv, h / h_kv, n, d] (a view): query head j belongs to kv head j // g."""
    return t.unflatten(1, (kv_heads, t.shape[1] // kv_heads))


def _bias_groups(bias, kv_heads):
    """An additive bias broadcastable to [B, h, rows, cols] -> its [B|1, h_kv|1, g|1, rows, cols] view."""
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if bias.shape[1] == 1:
        return bias.unsqueeze(1)
    return _groups(bias, kv_heads)


def _masked(qpos, kpos, causal, key_valid):
    """[B|1, 1, 1, rows, cols] bool: True where key kpos is masked for query qpos (causal in
    original positions; key_valid [B, cols] False for padding), or None when nothing is masked."""
    mask = None
    if causal:
        mask = (kpos[None, :] > qpos[:, None])[None, None, None]
    if key_valid is not None:
        pad = ~key_valid[:, None, None, None, :]
        mask = pad if mask is None else mask | pad
    return mask


def attention_forward(q, k, v, causal, scale, key_padding_mask=None, attn_bias=None):
    """(out, lse) of exact softmax attention (DESIGN.md 3.3), out in q's dtype and shape, lse
    [B, h, n] in float32 (float64 for float64 inputs): the row log-sum-exp of
    scale * q k^T + attn_bias with key j > query i masked if causal and padding keys masked.

    q [B, h, n, d], k and v [B, h_kv, n, d] (grouped-query attention: query head j reads kv head
    j // (h / h_kv)); key_padding_mask [B, n] bool (True = a real token) or None; attn_bias None or
    broadcastable to [B, h, n, n]. A query whose keys are all masked gets out = 0 and lse = +inf.
    """
    batch, heads, n, _ = q.shape
    kv_heads = k.shape[1]
    acc = _acc_dtype(q.dtype)
    k_t, v_a = k.to(acc).transpose(-1, -2)[:, :, None], v.to(acc)[:, :, None]
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, n), dtype=acc)
    q_g, out_g, lse_g = _groups(q, kv_heads), _groups(out, kv_heads), _groups(lse, kv_heads)
    bias = None if attn_bias is None else _bias_groups(attn_bias, kv_heads)
    pos = torch.arange(n, device=q.device)
    for rows in _query_blocks(n, batch * heads, n):
        s = (q_g[:, :, :, rows].to(acc) @ k_t) * scale
        if bias is not None:
            s = s + _rows_of(bias, rows).to(acc)
        mask = _masked(pos[rows], pos, causal, key_padding_mask)
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        lse_rows = torch.logsumexp(s, -1)
        lse_rows = lse_rows.masked_fill(lse_rows == float("-inf"), float("inf"))  # rows with no key
        out_g[:, :, :, rows] = (torch.exp(s - lse_rows[..., None]) @ v_a).to(q.dtype)
        lse_g[:, :, :, rows] = lse_rows
    return out, lse


def attention_backward(dout_kept, q_kept, k_saved, v_saved, out_kept, lse_kept, keep_idx, n, causal, scale, mode,
                       grad_scale, key_padding_mask=None, bias_saved=None, drop_kept=None, dropout_p=0.0):
    """Backward of exact attention on kept tokens (DESIGN.md 3.3).

    dout_kept, q_kept, out_kept [B, h, n_keep, d] and lse_kept [B, h, n_keep]: the kept query rows.
    k_saved, v_saved: the kept rows [B, h_kv, n_keep, d] (mode "qkv") or all rows [B, h_kv, n, d]
    (mode "q"). key_padding_mask: the full [B, n] mask or None. bias_saved: the additive bias at
    the kept query rows and the saved key columns (broadcastable to [B, h, n_keep, cols]) or None.
    drop_kept: the attention-dropout keep mask M at those rows and columns [B, h, n_keep, cols]
    (bool) or None; with it P~ = P M / (1 - dropout_p) takes P's place in the output and
    dP_ij = (dO_i.v_j) M_ij / (1 - dropout_p) (D_i = dO_i.o_i holds as it is). For kept queries i
    and keys j (kept in mode "qkv", all in mode "q"; j <= i in original positions when causal; j a
    real token): P_ij = exp(scale q_i.k_j + b_ij - lse_i),
    dV_j = sum_i P_ij dO_i, dS_ij = P_ij (dO_i.v_j - dO_i.o_i), dQ_i = scale sum_j dS_ij k_j,
    dK_j = scale sum_i dS_ij q_i (summed over the query heads of a kv group), all times grad_scale.
    Returns full-size dq [B, h, n, d], dk, dv [B, h_kv, n, d] (zero on tokens that take no
    gradient) and the gradient of bias_saved (its shape; None without a bias). Blocks of query
    rows keep the probability matrix at most ~2^24 elements at a time.
    """
    batch, heads, n_keep, d = q_kept.shape
    kv_heads, n_cols = k_saved.shape[1], k_saved.shape[2]
    dtype, acc = q_kept.dtype, _acc_dtype(q_kept.dtype)
    q_a, k_a, v_a = _groups(q_kept.to(acc), kv_heads), k_saved.to(acc)[:, :, None], v_saved.to(acc)[:, :, None]
    do_a = _groups(dout_kept.to(acc), kv_heads)
    if grad_scale != 1.0:
        do_a = do_a * grad_scale
    delta = (do_a * _groups(out_kept.to(acc), kv_heads)).sum(-1)  # D_i = dO_i . o_i
    lse_a = _groups(lse_kept.to(acc), kv_heads)
    kpos = keep_idx if mode == "qkv" else torch.arange(n, device=keep_idx.device)
    key_valid = None
    if key_padding_mask is not None:
        key_valid = key_padding_mask.index_select(1, keep_idx) if mode == "qkv" else key_padding_mask
    bias = None if bias_saved is None else _bias_groups(bias_saved, kv_heads)
    drop = None if drop_kept is None else _groups(drop_kept, kv_heads)
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    dk_a = torch.zeros_like(k_a[:, :, 0])
    dv_a = torch.zeros_like(v_a[:, :, 0])
    dq_a = torch.empty_like(q_a)
    for rows in _query_blocks(n_keep, batch * heads, n_cols):
        s = (q_a[:, :, :, rows] @ k_a.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + _rows_of(bias, rows).to(acc)
        p = torch.exp(s - lse_a[:, :, :, rows, None])
        mask = _masked(keep_idx[rows], kpos, causal, key_valid)
        if mask is not None:
            p = p.masked_fill(mask, 0.0)
        do_rows = do_a[:, :, :, rows]
        dp = do_rows @ v_a.transpose(-1, -2)
        if drop is not None:
            keep_scaled = drop[:, :, :, rows].to(acc) / (1.0 - dropout_p)
            dv_a += ((p * keep_scaled).transpose(-1, -2) @ do_rows).sum(2)
            dp = dp * keep_scaled
        else:
            dv_a += (p.transpose(-1, -2) @ do_rows).sum(2)
        ds = p * (dp - delta[:, :, :, rows, None])
        if dbias is not None:
            block = _rows_of(dbias, rows)
            block += _sum_to(ds, block.shape)
        dq_a[:, :, :, rows] = (ds @ k_a) * scale
        dk_a += (ds.transpose(-1, -2) @ q_a[:, :, :, rows]).sum(2) * scale
    dq = q_kept.new_zeros((batch, heads, n, d))
    dq[:, :, keep_idx] = dq_a.flatten(1, 2).to(dtype)
    dbias = None if dbias is None else dbias.reshape(bias_saved.shape).to(bias_saved.dtype)
    if mode == "q":
        return dq, dk_a.to(dtype), dv_a.to(dtype), dbias
    dk = q_kept.new_zeros((batch, kv_heads, n, d))
    dv = q_kept.new_zeros((batch, kv_heads, n, d))
    dk[:, :, keep_idx] = dk_a.to(dtype)
    dv[:, :, keep_idx] = dv_a.to(dtype)
    return dq, dk, dv, dbias


def _rows_of(bias, rows):
    """The query rows `rows` of a bias whose row dim may be broadcast (size 1): a view."""
    return bias if bias.shape[-2] == 1 else bias[..., rows, :]


def _sum_to(t, shape):
    """t summed over the dims where `shape` (same rank) has size 1."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t
