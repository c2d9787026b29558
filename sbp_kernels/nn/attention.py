"""SBP self-attention modules: drop-in replacements whose backward runs on kept tokens only.

- SBPMultiheadAttention: a subclass of nn.MultiheadAttention (same constructor, parameters and
  state_dict keys, so load_state_dict works both ways), for self-attention with the packed
  in_proj_weight. Cases the SBP path does not cover (need_weights=True, attn_mask without the
  is_causal hint, key_padding_mask, kdim / vdim != embed_dim, cross-attention, add_bias_kv,
  add_zero_attn, attention dropout while training) run nn.MultiheadAttention's own forward, with
  one warning per module and reason.
- SBPSelfAttention: timm's ViT `Attention` block (qkv Linear -> attention -> proj Linear, same
  parameter names: qkv.weight, qkv.bias, proj.weight, proj.bias, and q_norm / k_norm / norm when
  present).

In training mode with grad enabled, each forward takes the step's keep set (SBPModule._keep_idx,
shared with every SBP layer of the same token count) or the `keep_idx` forward kwarg: the projections run through sbp_kernels linear and the
attention through sbp attention (mode "qkv"), so only kept tokens' activations are saved and
gradients flow only through kept tokens. The forward output is exact either way. In eval mode
or under no_grad the modules compute exactly the dense module's output (its own code path).
grad_scale multiplies the gradients once, at the output projection.
"""
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention
from ..ops.linear import linear
from ..ops.tokenwise import tokenwise
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

    @classmethod
    def from_module(cls, module, **sbp_kwargs):
        """An SBPMultiheadAttention with module's configuration and train/eval mode that SHARES its
        parameters (as SBPLinear.from_linear does: an optimizer built before keeps working)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device="meta", **sbp_kwargs,
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = module.out_proj
        return new.train(module.training)

    def _fallback_reason(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        if need_weights:
            return "need_weights=True needs the attention map (pass need_weights=False)"
        if not self._qkv_same_embed_dim:
            return "kdim / vdim differ from embed_dim"
        if not (query is key and key is value):
            return "query, key and value are not the same tensor (cross-attention)"
        if key_padding_mask is not None:
            return "key_padding_mask is not supported"
        if attn_mask is not None and not is_causal:
            return "attn_mask is not supported (only the is_causal hint with a causal attn_mask)"
        if attn_mask is None and is_causal:
            return "is_causal needs attn_mask (as in nn.MultiheadAttention)"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        if self.dropout > 0.0:
            return "attention dropout is not supported"
        if query.dim() not in (2, 3):
            return f"query must be 2-D or 3-D, got shape {tuple(query.shape)}"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, *, keep_idx=None):
        dense_args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not self._sbp_active():
            return super().forward(*dense_args)
        reason = self._fallback_reason(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is not None:
            self._warn_fallback(reason)
            return super().forward(*dense_args)
        x = query
        if x.dim() == 2:  # unbatched (L, E)
            x = x.unsqueeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        out = self._sbp_forward(x, keep_idx, causal=is_causal)
        if query.dim() == 2:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _sbp_forward(self, x, keep_idx, causal):
        batch, n, embed = x.shape
        keep_idx = self._keep_idx(n, x.device, keep_idx)
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias, keep_idx, backend=self.backend)
        q, k, v = qkv.reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, keep_idx, causal=causal, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, n, embed)
        return linear(out, self.out_proj.weight, self.out_proj.bias, keep_idx, self.grad_scale, backend=self.backend)


class SBPSelfAttention(SBPModule, nn.Module):
    """timm's ViT Attention (qkv -> scaled dot-product attention -> proj) with SBP over tokens.

    x [B, N, dim] -> [B, N, dim]. Parameter names follow timm: qkv.weight, qkv.bias, proj.weight,
    proj.bias (q_norm, k_norm, norm as timm's qk_norm / scale_norm options). forward(x,
    attn_mask=None, *, keep_idx=None); an attn_mask, or attention dropout while training, runs the
    dense path (one warning).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, proj_bias=True, attn_drop=0.0,
                 proj_drop=0.0, norm_layer=nn.LayerNorm, *, keep_ratio=0.5, strategy="grid", grad_scale=1.0,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_sbp(keep_ratio, strategy, grad_scale, backend)

    @classmethod
    def from_module(cls, module, **sbp_kwargs):
        """An SBPSelfAttention from any module with `qkv` and `proj` nn.Linear and `num_heads`
        (timm's Attention): the same submodules (parameters shared, not copied), scale, dropouts,
        norms and train/eval mode."""
        for name in ("qkv", "proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise TypeError(f"module must have an nn.Linear `{name}` (timm's Attention), got {type(module).__name__}")
        if not isinstance(getattr(module, "num_heads", None), int):
            raise TypeError(f"module must have an int `num_heads`, got {type(module).__name__}")
        dim = module.qkv.in_features
        if module.qkv.out_features != 3 * dim or module.proj.in_features != dim:
            raise ValueError(
                f"module.qkv must map dim -> 3 * dim and module.proj take dim={dim}, got qkv "
                f"{module.qkv.in_features} -> {module.qkv.out_features}, proj {module.proj.in_features} -> "
                f"{module.proj.out_features}"
            )
        new = cls(
            dim, module.num_heads, qkv_bias=module.qkv.bias is not None, proj_bias=module.proj.bias is not None,
            device="meta", **sbp_kwargs,
        )
        for name in ("qkv", "proj", "q_norm", "k_norm", "norm", "attn_drop", "proj_drop"):
            if isinstance(getattr(module, name, None), nn.Module):
                setattr(new, name, getattr(module, name))
        new.scale = float(getattr(module, "scale", new.scale))
        return new.train(module.training)

    def _qkv_heads(self, qkv, batch, n):
        q, k, v = qkv.reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x, attn_mask=None, *, keep_idx=None):
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D [B, N, dim], got shape {tuple(x.shape)}")
        batch, n, dim = x.shape
        if self._sbp_active():
            reason = None
            if attn_mask is not None:
                reason = "attn_mask is not supported"
            elif self.attn_drop.p > 0.0:
                reason = "attention dropout is not supported"
            if reason is None:
                return self._sbp_forward(x, keep_idx)
            self._warn_fallback(reason)
        q, k, v = self._qkv_heads(self.qkv(x), batch, n)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        out = self.norm(out.transpose(1, 2).reshape(batch, n, dim))
        return self.proj_drop(self.proj(out))

    def _sbp_forward(self, x, keep_idx):
        batch, n, dim = x.shape
        keep_idx = self._keep_idx(n, x.device, keep_idx)
        qkv = linear(x, self.qkv.weight, self.qkv.bias, keep_idx, backend=self.backend)
        q, k, v = self._qkv_heads(qkv, batch, n)
        # Token-wise norms keep a graph (and saved activations) for kept tokens only.
        if not isinstance(self.q_norm, nn.Identity):
            q = tokenwise(self.q_norm, q, keep_idx, dim=2)
        if not isinstance(self.k_norm, nn.Identity):
            k = tokenwise(self.k_norm, k, keep_idx, dim=2)
        out = attention(q, k, v, keep_idx, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, n, dim)
        if not isinstance(self.norm, nn.Identity):
            out = tokenwise(self.norm, out, keep_idx, dim=1)
        out = linear(out, self.proj.weight, self.proj.bias, keep_idx, self.grad_scale, backend=self.backend)
        return self.proj_drop(out)
