"""SBPTransformerEncoderLayer: nn.TransformerEncoderLayer whose training backward runs on kept tokens.

A subclass of nn.TransformerEncoderLayer with the same constructor, submodules, parameters and
state_dict keys (self_attn stays an nn.MultiheadAttention, linear1 / linear2 nn.Linear), so
checkpoints load both ways and code reading the layer's attributes keeps working; convert swaps
a layer into it in place.

Training forward (training mode, grad enabled): one keep set per layer call (the open
`sbp_kernels.step`'s, else drawn by this layer) for all of

- norm1 / norm2 through sbp_kernels.layer_norm (closed-form kept-rows backward);
- self-attention: in_proj and out_proj through sbp_kernels.linear, the attention through
  sbp_kernels.attention (mode "qkv") with src_mask, src_key_padding_mask, is_causal and attention
  dropout;
- the feed-forward linear1 -> activation -> dropout -> linear2 through sbp_kernels.mlp (relu, gelu,
  gelu-tanh, silu, as a function, a module or the name given to the constructor);
- dropout1 / dropout2 through sbp_kernels.dropout;

for norm_first True and False and batch_first True and False (and unbatched inputs). Every
intermediate is laid out in memory as the dense layer's, and the dropouts are drawn in the dense
layer's order, so the same seed gives the same masks and the same output. The residual adds save
nothing, so nothing of a dropped token is saved for backward. With norm_first (pre-norm) the
residual stream carries the full gradient and only the branches are sub-sampled; with post-norm
the norms sit on the residual stream, so a dropped token receives no gradient through this layer
at all. grad_scale multiplies each branch's gradients once (at the attention's output projection
and in the MLP).

Anything else runs nn.TransformerEncoderLayer's own forward, dense, with one warning per layer and
reason: an unsupported activation, linear1 / linear2 / self_attn that are not the plain torch
modules, nested-tensor inputs. In eval mode or under no_grad / inference_mode the layer is
exactly nn.TransformerEncoderLayer (the same code path, fast path included).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dropout as dropout_op
from ..ops import mlp as mlp_op
from ..ops import norm as norm_op
from ..ops._common import autocast_inputs
from .attention import SBPMultiheadAttention
from .base import SBPModule, swap
from .linear import plain_linear
from .mlp import activation_name, dropout_p

__all__ = ["SBPTransformerEncoderLayer"]

class SBPTransformerEncoderLayer(SBPModule, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer with stochastic backpropagation over tokens (see module doc).

    Same constructor as nn.TransformerEncoderLayer plus keyword-only keep_ratio, strategy,
    grad_scale, backend (SBPModule). forward takes nn.TransformerEncoderLayer's arguments plus the
    keyword `keep_idx` (sorted unique token positions) to fix the keep set of the call.
    """

    def __init__(
        self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
        batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *,
        keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto",
    ):
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
            bias, device, dtype,
        )
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    def _init_sbp(self, keep_ratio=0.5, strategy="grid", grad_scale=1.0, backend="auto"):
        super()._init_sbp(keep_ratio, strategy, grad_scale, backend)
        # The attention's SBP path is SBPMultiheadAttention's, with the layer's settings.
        swap(self.self_attn, SBPMultiheadAttention, **self.sbp_settings())

    def _fallback_reason(self, src):
        """Why the SBP path cannot run this call, or None (then also the activation name)."""
        if not isinstance(src, torch.Tensor) or src.is_nested or src.dim() not in (2, 3):
            return "src must be a 2-D or 3-D dense tensor", None
        attn = self.self_attn
        if not isinstance(attn, SBPMultiheadAttention) or not attn._qkv_same_embed_dim:
            return "self_attn must be an nn.MultiheadAttention with kdim = vdim = embed_dim", None
        if attn.bias_k is not None or attn.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported", None
        drops = [dropout_p(getattr(self, name, None)) for name in ("dropout", "dropout1", "dropout2")]
        if any(p is None for p in drops):
            return "dropout / dropout1 / dropout2 must be nn.Dropout modules", None
        if not (plain_linear(self.linear1) and plain_linear(self.linear2)):
            return "linear1 / linear2 must be plain nn.Linear modules", None
        cached = self.__dict__.get("_sbp_activation")
        if cached is None or cached[0] is not self.activation:  # recognised once per activation
            try:
                cached = self.__dict__["_sbp_activation"] = (self.activation, activation_name(self.activation))
            except ValueError:
                return f"activation {self.activation!r} is not supported (relu, gelu, gelu-tanh, silu are)", None
        return None, cached[1]

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, keep_idx=None):
        dense_args = (src, src_mask, src_key_padding_mask, is_causal)
        if not self._sbp_active():
            return super().forward(*dense_args)
        reason, act = self._fallback_reason(src)
        if reason is not None:
            self._warn_fallback(reason)
            return super().forward(*dense_args)
        unbatched = src.dim() == 2
        batch_first = self.self_attn.batch_first  # nn.TransformerEncoderLayer keeps it there only
        seq = src.unsqueeze(1) if unbatched else (src.transpose(0, 1) if batch_first else src)
        x = seq.transpose(0, 1)  # [B, n, E] view; the ops keep its memory order
        keep_idx = self._keep_idx(x.shape[1], x.device, keep_idx)  # one keep set for every op
        masks = (src_key_padding_mask, src_mask, is_causal, keep_idx)
        if self.norm_first:
            x = x + self._sbp_attention(self._norm(self.norm1, x, keep_idx), *masks)
            x = x + self._sbp_feed_forward(self._norm(self.norm2, x, keep_idx), keep_idx, act)
        else:
            x = self._norm(self.norm1, x + self._sbp_attention(x, *masks), keep_idx)
            x = self._norm(self.norm2, x + self._sbp_feed_forward(x, keep_idx, act), keep_idx)
        if unbatched:
            return x.squeeze(0)
        return x if batch_first else x.transpose(0, 1)

    def _norm(self, norm, x, keep_idx):
        return norm_op.apply_layer_norm(x, norm.weight, norm.bias, keep_idx, norm.eps, self.backend)

    def _sbp_attention(self, x, key_padding_mask, attn_mask, is_causal, keep_idx):
        out = self.self_attn.sbp_attention(x, key_padding_mask, attn_mask, is_causal, keep_idx)
        return dropout_op.apply(out, keep_idx, self.dropout1.p if self.training else 0.0, self.backend)

    def _sbp_feed_forward(self, x, keep_idx, act):
        l1, l2 = self.linear1, self.linear2
        x, w1, b1, w2, b2 = autocast_inputs(x, l1.weight, l1.bias, l2.weight, l2.bias)
        out = mlp_op.apply(x, w1, b1, w2, b2, keep_idx, act, self.grad_scale, self.dropout.p, self.backend)
        return dropout_op.apply(out, keep_idx, self.dropout2.p, self.backend)
