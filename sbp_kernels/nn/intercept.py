"""SBPIntercepted: a module whose own forward runs with its activation-saving functional calls
routed to the sbp ops.

Attention modules compute scaled dot-product attention inline (timm's Attention, EvaAttention,
BEiT's Attention, Swin's WindowAttention call F.scaled_dot_product_attention; EVA and BEiT call F.linear on their qkv
weight with a concatenated bias). Rather than re-implementing each forward, the module's OWN
forward runs under a TorchFunctionMode that sends, for inputs with a position axis (dim -2):

- F.scaled_dot_product_attention -> sbp attention (mode "qkv"; a boolean mask broadcast over
  queries becomes the key padding mask, any other mask an additive bias; enable_gqa, is_causal,
  scale and dropout_p are honoured),
- F.linear -> sbp linear, F.layer_norm -> sbp layer_norm, F.dropout -> sbp dropout,

all on the step's keep set for the number of positions they see. Every other call runs as it
is. grad_scale multiplies the gradient of the module's output, once. So every argument the module takes (rope, masks, shared relative position bias, ...) is
honoured by construction, and the forward is the module's own.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops import attention as attention_op
from ..ops import dropout as dropout_op
from ..ops import linear as linear_op
from ..ops import norm as norm_op
from ..ops._common import autocast_inputs, scale_grad
from .base import SBPModule

__all__ = ["SBPIntercepted"]


class SBPIntercepted(SBPModule):
    """Mixin: the module's own forward, with its functional calls routed to sbp ops while SBP is
    active (training, grad enabled); exactly the module otherwise."""

    def forward(self, *args, **kwargs):
        if not self._sbp_active():
            return super().forward(*args, **kwargs)
        # timm's modules with an unfused path (fused_attn=False, Swin's default) take the fused one
        # while SBP runs: the same math, through F.scaled_dot_product_attention.
        unfused = self.__dict__.get("fused_attn") is False
        try:
            if unfused:
                self.fused_attn = True
            with _Router(self):
                out = super().forward(*args, **kwargs)
        finally:
            if unfused:
                self.fused_attn = False
        return scale_grad(out, self.grad_scale)


class _Router(TorchFunctionMode):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def keep(self, n, device):
        return self.module._keep_idx(n, device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            out = route(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def _sdpa(router, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if q.dim() != 4 or k.shape[-2] != q.shape[-2] or (k.shape[1] != q.shape[1] and not enable_gqa):
        return NotImplemented  # cross-attention, or heads SDPA itself would reject
    key_padding_mask = attn_bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[1:3] == (1, 1):
            key_padding_mask = attn_mask[:, 0, 0, :].expand(q.shape[0], -1)
        elif attn_mask.dtype == torch.bool:
            attn_bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        else:
            attn_bias = attn_mask
    m = router.module
    q, k, v = autocast_inputs(q, k, v)
    keep_idx = router.keep(q.shape[-2], q.device)
    return attention_op.apply(
        q, k, v, keep_idx, bool(is_causal), scale, "qkv", 1.0, key_padding_mask, attn_bias, float(dropout_p), m.backend
    )


def _linear(router, x, weight, bias=None):
    if x.dim() < 3:
        return NotImplemented
    x, weight, bias = autocast_inputs(x, weight, bias)
    m = router.module
    return linear_op.apply(x, weight, bias, router.keep(x.shape[-2], x.device), 1.0, m.backend)


def _layer_norm(router, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if x.dim() < 3 or len(normalized_shape) != 1:
        return NotImplemented
    return norm_op.apply_layer_norm(x, weight, bias, router.keep(x.shape[-2], x.device), eps, router.module.backend)


def _dropout(router, x, p=0.5, training=True, inplace=False):
    if x.dim() < 3 or not training or p == 0:
        return NotImplemented
    return dropout_op.apply(x, router.keep(x.shape[-2], x.device), p, router.module.backend)


_ROUTES = {
    F.scaled_dot_product_attention: _sdpa,
    F.linear: _linear,
    F.layer_norm: _layer_norm,
    F.dropout: _dropout,
}
