"""SBPTransformerEncoderLayer: nn.TransformerEncoderLayer whose training backward runs on kept tokens.

A subclass of nn.TransformerEncoderLayer with the same constructor, submodules, parameters and
state_dict keys (self_attn stays a plain nn.MultiheadAttention, linear1 / linear2 plain
nn.Linear), so checkpoints load both ways and code reading the layer's attributes keeps working.

Training forward (training mode, grad enabled, no masks but a causal one, dropout 0): one keep
set per layer call (the open `sbp_kernels.step`'s, else drawn once by this layer) for all of

- norm1 / norm2 through sbp_kernels.tokenwise: exact on every token, a graph (and saved
  activations) only for kept tokens;
- self-attention: in_proj and out_proj through sbp_kernels.linear, the attention through
  sbp_kernels.attention (mode "qkv"); a `src_mask` with `is_causal=True` runs causal attention;
- the feed-forward linear1 -> activation -> linear2 through sbp_kernels.mlp (relu, gelu,
  gelu-tanh, silu, as a function, a module or the name given to the constructor);

for norm_first True and False and batch_first True and False (and unbatched inputs). The
residual adds save nothing, so nothing of a dropped token is saved for backward. With norm_first
(pre-norm) the residual stream carries the full gradient and only the branches are sub-sampled;
with post-norm the norms sit on the residual stream, so a dropped token receives no gradient
through this layer at all. grad_scale multiplies each branch's gradients once (at the attention's
output projection and in the MLP).

Anything else runs nn.TransformerEncoderLayer's own forward, dense, with one warning per layer and
reason: a src_key_padding_mask, a src_mask other than a causal one flagged by is_causal, dropout
> 0 in training, an unsupported activation, linear1 / linear2 / self_attn that are not the plain
torch modules, nested-tensor inputs. In eval mode or under no_grad / inference_mode the layer is
exactly nn.TransformerEncoderLayer (the same code path, fast path included).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention
from ..ops.linear import linear
from ..ops.mlp import mlp
from ..ops.tokenwise import tokenwise
from .base import SBPModule
from .linear import SBPLinear, activation_name

__all__ = ["SBPTransformerEncoderLayer"]

# Activation functions the layer may hold (nn.TransformerEncoderLayer turns "relu" / "gelu" into
# F.relu / F.gelu) -> the sbp mlp activation name.
_ACT_FUNCTIONS = ((F.relu, "relu"), (F.gelu, "gelu"), (F.silu, "silu"))


def _activation(act):
    """The sbp mlp activation name of a layer's activation, or None when it has none."""
    for fn, name in _ACT_FUNCTIONS:
        if act is fn:
            return name
    if isinstance(act, nn.Module):
        try:
            return activation_name(act)
        except ValueError:
            return None
    return None


def _dropout_p(m):
    """The drop probability of a dropout slot (0 for None / Identity); None if it is not a dropout."""
    if m is None or isinstance(m, nn.Identity):
        return 0.0
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p
    return None


def _plain_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward in (nn.Linear.forward, SBPLinear.forward)


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

    @classmethod
    def from_module(cls, layer, **settings):
        """An SBPTransformerEncoderLayer that SHARES layer's submodules and parameters (an optimizer
        built over layer's parameters keeps working) and copies its other attributes (norm_first,
        activation, train / eval mode, hooks). layer must be an nn.TransformerEncoderLayer that
        does not override forward, _sa_block or _ff_block. `settings`: keep_ratio, strategy,
        grad_scale, backend."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"layer must be an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        for method in ("forward", "_sa_block", "_ff_block"):
            if getattr(type(layer), method) not in (
                getattr(nn.TransformerEncoderLayer, method), getattr(cls, method)
            ):
                raise TypeError(
                    f"layer is a {type(layer).__name__} with its own {method}; only plain "
                    f"nn.TransformerEncoderLayer modules can be converted"
                )
        new = cls.__new__(cls)
        # The same submodules, parameters and attributes; the containers are copied so that later
        # changes to one layer's hooks or children do not leak into the other.
        new.__dict__.update(
            {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()}
        )
        new.__dict__.pop("_sbp_warned", None)
        new._init_sbp(**settings)
        return new

    def _fallback_reason(self, src, src_mask, src_key_padding_mask, is_causal):
        """Why the SBP path cannot run this call, or None (then also the activation name)."""
        if src_key_padding_mask is not None:
            return "src_key_padding_mask is not supported", None
        if src_mask is not None and not is_causal:
            return "src_mask is not supported (only a causal src_mask with is_causal=True)", None
        if src_mask is None and is_causal:
            return "is_causal needs src_mask (as in nn.TransformerEncoderLayer)", None
        if not isinstance(src, torch.Tensor) or src.is_nested or src.dim() not in (2, 3):
            return "src must be a 2-D or 3-D dense tensor", None
        attn = self.self_attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return "self_attn must be an nn.MultiheadAttention with kdim = vdim = embed_dim", None
        if attn.bias_k is not None or attn.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported", None
        drops = [_dropout_p(getattr(self, name, None)) for name in ("dropout", "dropout1", "dropout2")]
        if attn.dropout > 0 or any(p is None or p > 0 for p in drops):
            return "dropout > 0 in training is not supported (use dropout=0)", None
        if not (_plain_linear(self.linear1) and _plain_linear(self.linear2)):
            return "linear1 / linear2 must be plain nn.Linear modules", None
        act = _activation(self.activation)
        if act is None:
            return f"activation {self.activation!r} is not supported (relu, gelu, gelu-tanh, silu are)", None
        return None, act

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, keep_idx=None):
        dense_args = (src, src_mask, src_key_padding_mask, is_causal)
        if not self._sbp_active():
            return super().forward(*dense_args)
        reason, act = self._fallback_reason(src, src_mask, src_key_padding_mask, is_causal)
        if reason is not None:
            self._warn_fallback(reason)
            return super().forward(*dense_args)
        if src.dim() == 2:  # unbatched [S, E]
            x = src.unsqueeze(0)
        else:
            # nn.TransformerEncoderLayer keeps batch_first on its self_attn only.
            x = src if self.self_attn.batch_first else src.transpose(0, 1)
        keep_idx = self._keep_idx(x.shape[1], x.device, keep_idx)  # one keep set for every op
        causal = src_mask is not None
        if self.norm_first:
            x = x + self._sbp_attention(tokenwise(self.norm1, x, keep_idx), keep_idx, causal)
            x = x + self._sbp_feed_forward(tokenwise(self.norm2, x, keep_idx), keep_idx, act)
        else:
            x = tokenwise(self.norm1, x + self._sbp_attention(x, keep_idx, causal), keep_idx)
            x = tokenwise(self.norm2, x + self._sbp_feed_forward(x, keep_idx, act), keep_idx)
        if src.dim() == 2:
            return x.squeeze(0)
        return x if self.self_attn.batch_first else x.transpose(0, 1)

    def _sbp_attention(self, x, keep_idx, causal):
        """Self-attention of x [B, n, E] (as SBPMultiheadAttention._sbp_forward)."""
        attn = self.self_attn
        batch, n, embed = x.shape
        heads = attn.num_heads
        qkv = linear(x, attn.in_proj_weight, attn.in_proj_bias, keep_idx, backend=self.backend)
        q, k, v = qkv.reshape(batch, n, 3, heads, embed // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, keep_idx, causal=causal, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, n, embed)
        return linear(out, attn.out_proj.weight, attn.out_proj.bias, keep_idx, self.grad_scale, backend=self.backend)

    def _sbp_feed_forward(self, x, keep_idx, act):
        l1, l2 = self.linear1, self.linear2
        return mlp(x, l1.weight, l1.bias, l2.weight, l2.bias, keep_idx, act, self.grad_scale, backend=self.backend)
