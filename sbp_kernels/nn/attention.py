"""SBPMultiheadAttention: nn.MultiheadAttention (self-attention) whose backward runs on kept tokens.

A subclass of nn.MultiheadAttention (same constructor, parameters and state_dict keys, so
load_state_dict works both ways); convert swaps an nn.MultiheadAttention into it in place. In
training mode with grad enabled, self-attention with the packed in_proj_weight runs in_proj and
out_proj through sbp_kernels.linear and the attention through sbp_kernels.attention (mode "qkv"):
key_padding_mask (bool or additive), attn_mask ([n, n] or [B * h, n, n], bool or additive),
is_causal and attention dropout (the same mask as the dense module draws for the same seed) are
honoured; the output is laid out in memory as the dense module's is. Cases the SBP path does not
cover (need_weights=True, cross-attention, kdim / vdim != embed_dim, add_bias_kv, add_zero_attn)
run nn.MultiheadAttention's own forward, with one warning per module and reason. In eval mode or
under no_grad it is exactly nn.MultiheadAttention.
"""
import torch
from torch import nn

from ..ops import attention as attention_op
from ..ops import linear as linear_op
from ..ops._common import autocast_inputs
from .base import SBPModule


class SBPMultiheadAttention(SBPModule, nn.MultiheadAttention):
    """nn.MultiheadAttention with stochastic backpropagation over tokens (self-attention).

    Extra constructor arguments: keep_ratio (0.5), strategy ("grid"), grad_scale (1.0),
    backend ("auto"). forward takes the arguments of nn.MultiheadAttention.forward plus the
    keyword `keep_idx` (sorted unique token positions) to override the sampled keep set. On the
    SBP path the returned attention weights are None (need_weights=False is required).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, keep_ratio=0.5,
                 strategy="grid", grad_scale=1.0, backend="auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    def _fallback_reason(self, query, key, value, need_weights, attn_mask, is_causal):
        if is_causal and attn_mask is None:
            return "is_causal needs attn_mask (as in nn.MultiheadAttention)"
        if need_weights:
            return "need_weights=True needs the attention map (pass need_weights=False)"
        if not self._qkv_same_embed_dim:
            return "kdim / vdim differ from embed_dim"
        if not (query is key and key is value):
            return "query, key and value are not the same tensor (cross-attention)"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        if query.dim() not in (2, 3):
            return f"query must be 2-D or 3-D, got shape {tuple(query.shape)}"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, *, keep_idx=None):
        dense_args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not self._sbp_active():
            return super().forward(*dense_args)
        reason = self._fallback_reason(query, key, value, need_weights, attn_mask, is_causal)
        if reason is not None:
            self._warn_fallback(reason)
            return super().forward(*dense_args)
        x = query.unsqueeze(1) if query.dim() == 2 else query  # unbatched [n, E] -> [n, 1, E]
        if self.batch_first and query.dim() == 3:
            x = x.transpose(0, 1)
        # x: [n, B, E] (a view); the ops see its [B, n, E] view and keep its memory order.
        out = self.sbp_attention(x.transpose(0, 1), key_padding_mask, attn_mask, is_causal, keep_idx)
        out = out.transpose(0, 1)
        if query.dim() == 2:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def sbp_attention(self, x, key_padding_mask=None, attn_mask=None, is_causal=False, keep_idx=None):
        """Self-attention of x [B, n, E] -> [B, n, E] on the SBP path (also used by
        SBPTransformerEncoderLayer). is_causal is nn.MultiheadAttention's hint that attn_mask is
        the causal mask: causal attention runs and attn_mask is not read."""
        batch, n, embed = x.shape
        heads = self.num_heads
        keep_idx = self._keep_idx(n, x.device, keep_idx)
        x, w_in, b_in, w_out, b_out = autocast_inputs(
            x, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias
        )
        qkv = linear_op.apply(x, w_in, b_in, keep_idx, 1.0, self.backend)
        q, k, v = qkv.unflatten(-1, (3, heads, embed // heads)).permute(2, 0, 3, 1, 4).unbind(0)
        padding, bias = _masks(key_padding_mask, None if is_causal else attn_mask, batch, heads, n, q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = attention_op.apply(q, k, v, keep_idx, bool(is_causal), None, "qkv", 1.0, padding, bias, dropout,
                                 self.backend)
        out = out.transpose(1, 2).reshape(batch, n, embed)
        # The dense module's output is laid out [n, B, E]: so is this one (a dropout after it
        # then draws the same mask).
        out = linear_op.apply(out, w_out, b_out, keep_idx, self.grad_scale, self.backend)
        return out.transpose(0, 1).contiguous().transpose(0, 1)


def _masks(key_padding_mask, attn_mask, batch, heads, n, dtype):
    """nn.MultiheadAttention's masks as the op's (key padding mask: True = a real token; additive
    bias [B, h, n, n] or broadcastable). A bool mask is True where attention is NOT allowed."""
    padding = bias = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            padding = ~key_padding_mask
        else:
            bias = key_padding_mask.to(dtype).view(batch, 1, 1, n)
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        mask = mask.to(dtype)
        mask = mask.view(batch, heads, n, n) if mask.dim() == 3 else mask
        bias = mask if bias is None else bias + mask
    return padding, bias
