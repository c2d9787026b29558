"""SBP forms of position-wise modules: norms, dropout, and any other position-wise module.

Each is a mixin that `convert` swaps a module into (base.swap: the module keeps its class, its
parameters and its state_dict keys); in training mode with grad enabled it saves only the kept
positions' activations, otherwise it is the module itself.

- SBPLayerNorm: a LayerNorm over the last dim (nn.LayerNorm, timm's LayerNorm / LayerNorm2d,
  Hugging Face's) through sbp_kernels.layer_norm (closed-form kept-rows backward, saves x_K).
- SBPRMSNorm: an RMSNorm (Llama / Qwen / Mistral form, or Gemma's 1 + weight) through
  sbp_kernels.rms_norm; `rms_form(module)` says which form a module computes, checked on a probe.
- SBPDropout: nn.Dropout through sbp_kernels.dropout (same mask as the dense model's, kept rows'
  mask saved as bool).
- SBPTokenwise: any other position-wise module through sbp_kernels.tokenwise (exact forward, a
  graph for the kept rows only).

Where the positions are (`positions`, set by convert on the module): "rows" (dim -2: [B, n, C],
or [B, h, n, d] for a per-head q / k norm), "channels_last" ([B, H, W, C]: the H*W pixels, laid
out (H, W)), "channels_first" ([B, C, H, W], normalised over C: timm's LayerNorm2d), or an int dim
([B, n, h, d] with positions on dim 1: Hugging Face's per-head q / k norms). grad_scale is not
applied here: in a block, the branch's linear / attention / MLP op applies it once.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import replay
from ..ops import dropout as dropout_op
from ..ops import norm as norm_op
from ..ops import tokenwise as tokenwise_op
from .base import SBPModule

__all__ = ["SBPDropout", "SBPLayerNorm", "SBPRMSNorm", "SBPTokenwise", "rms_form"]


def rows_view(x, positions):
    """(x as a [..., n, c] view with the positions on dim -2, n, layout of the n positions or None,
    a function mapping an output of that view's shape back to x's layout)."""
    if positions == "channels_last" and x.dim() == 4:
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c), h * w, (h, w), lambda y: y.reshape(b, h, w, y.shape[-1])
    if positions == "channels_first" and x.dim() == 4:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return rows, h * w, (h, w), lambda y: y.reshape(b, h, w, y.shape[-1]).permute(0, 3, 1, 2)
    if isinstance(positions, int) and x.dim() >= 3 and positions % x.dim() != x.dim() - 2:
        rows = x.movedim(positions, -2)
        return rows, rows.shape[-2], None, lambda y: y.movedim(-2, positions)
    return x, x.shape[-2], None, lambda y: y


class _PositionWise(SBPModule):
    """Shared forward: run `_sbp_forward(rows, keep_idx)` on the positions' row view while SBP is
    active, the module's own forward otherwise."""

    positions = "rows"

    def forward(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 3 or not self._sbp_active():
            return super().forward(x, *args, **kwargs)
        rows, n, layout, back = rows_view(x, self.positions)
        keep_idx = self._keep_idx(n, x.device, layout=layout)
        return back(self._sbp_forward(rows, keep_idx))


class SBPTokenwise(_PositionWise):
    """Any position-wise module: its own forward on every row without a graph, and on the kept
    rows with one (sbp_kernels.tokenwise). A channels_first module (a 1x1-conv MLP on [B, C, H, W])
    runs on the map itself and on its kept pixels laid out as a [B, C, n_keep, 1] map. Dropout
    inside the module (F.dropout) draws its masks once, in the forward on every row, as the dense
    module does; the kept rows' forward applies the kept rows of the same masks."""

    def forward(self, x, *args, **kwargs):
        if (self.positions != "channels_first" or args or kwargs or not isinstance(x, torch.Tensor)
                or x.dim() != 4 or not self._sbp_active()):
            return super().forward(x, *args, **kwargs)
        _, _, h, w = x.shape
        keep_idx = self._keep_idx(h * w, x.device, layout=(h, w))
        forward = super(_PositionWise, self).forward

        def on_pixels(pixels):  # [B, C, h * w] (all of them) or [B, C, n_keep] (the kept ones)
            grid = (h, w) if pixels.shape[2] == h * w else (pixels.shape[2], 1)
            return forward(pixels.unflatten(2, grid)).flatten(2)

        def kept_mask(mask):  # a mask of a [B, C', h, w] map -> its kept pixels, [B, C', n_keep, 1]
            if mask.dim() != 4 or mask.shape[2:] != (h, w):
                return None
            return mask.flatten(2).index_select(2, keep_idx)[..., None]

        fn = _same_dropout_masks(on_pixels, kept_mask)
        return tokenwise_op.apply(fn, x.flatten(2), keep_idx, 2).unflatten(2, (h, w))

    def _sbp_forward(self, rows, keep_idx):
        n = rows.shape[-2]

        def kept_mask(mask):  # a mask of [..., n, c'] rows -> its kept rows
            return mask.index_select(-2, keep_idx) if mask.dim() >= 2 and mask.shape[-2] == n else None

        fn = _same_dropout_masks(super(_PositionWise, self).forward, kept_mask)
        return tokenwise_op.apply(fn, rows, keep_idx, -2)


def _same_dropout_masks(fn, kept_mask):
    """fn for tokenwise, which calls it on every row first (without a graph), then on the kept rows:
    the dropout masks the first call draws (F.dropout's own draw: the dense model's masks) are
    kept, and the second call applies their kept rows (kept_mask(mask)) instead of drawing new
    ones. So the kept rows' gradient is that of the output, and the global RNG advances as in the
    dense model."""
    masks, calls = [], []

    def run(t):
        with _DropoutMasks(masks, kept_mask, reuse=bool(calls)):
            calls.append(True)
            return fn(t)

    return run


class _DropoutMasks(TorchFunctionMode):
    """F.dropout calls draw their masks and keep them in `masks` or, with reuse, apply the kept rows
    of the kept ones, in call order."""

    def __init__(self, masks, kept_mask, reuse):
        super().__init__()
        self.masks, self.kept_mask, self.reuse = masks, kept_mask, reuse

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training = _dropout_args(*args, **kwargs)
            if training and p > 0:
                if not self.reuse:
                    # F.dropout's own draw (kept for, or taken from, a recompute-mode block's record)
                    out, mask = replay.dropout(x, p, self.kept_mask)
                    self.masks.append(mask)
                    return out
                mask = self.kept_mask(self.masks.pop(0)) if self.masks else None
                if mask is not None and mask.shape == x.shape:
                    return x * mask * (1.0 / (1.0 - p) if p < 1 else 0.0)
        return func(*args, **kwargs)


def _dropout_args(input, p=0.5, training=True, inplace=False):
    return input, p, training


class SBPLayerNorm(_PositionWise):
    """A module computing F.layer_norm over its last dim with `weight`, `bias`, `eps`."""

    def _sbp_forward(self, rows, keep_idx):
        return norm_op.apply_layer_norm(rows, self.weight, self.bias, keep_idx, self.eps, self.backend)


class SBPRMSNorm(_PositionWise):
    """An RMSNorm module; rms_form (set by convert from `rms_form(module)`) says how it computes."""

    rms_form = None  # (eps attribute name, weight_offset, scale_in_float)

    def _sbp_forward(self, rows, keep_idx):
        eps_attr, offset, in_float = self.rms_form
        return norm_op.apply_rms_norm(
            rows, self.weight, keep_idx, getattr(self, eps_attr), offset, in_float, self.backend
        )


class SBPDropout(_PositionWise, nn.Dropout):
    """nn.Dropout with the same mask as dense, saving the kept rows' mask only."""

    def _sbp_forward(self, rows, keep_idx):
        return dropout_op.apply(rows, keep_idx, self.p, self.backend)


def layer_norm_like(m, positions="rows"):
    """Whether m computes F.layer_norm over the channels with m.weight, m.bias, m.eps (checked on a
    probe laid out as `positions` says)."""
    weight, bias, eps = getattr(m, "weight", None), getattr(m, "bias", None), getattr(m, "eps", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return False
    c = weight.shape[0]
    probe = _probe(m, (2, c, 3, 2) if positions == "channels_first" else (2, 3, 2, c) if positions == "channels_last"
                   else (2, 3, c))
    rows, _, _, back = rows_view(probe, positions)
    with torch.no_grad():
        try:
            out = m(probe)
        except Exception:  # noqa: BLE001  (a module that does not take this layout)
            return False
        return _equal(out, back(F.layer_norm(rows, (c,), weight, bias, eps)))


def rms_form(m):
    """(eps attribute, weight_offset, scale_in_float) of the RMSNorm form m computes exactly
    (checked on a probe in float32 and bfloat16), or None."""
    weight = getattr(m, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    for eps_attr in ("variance_epsilon", "eps"):
        eps = getattr(m, eps_attr, None)
        if not isinstance(eps, float):
            continue
        for form in ((eps_attr, 0.0, False), (eps_attr, 1.0, True), (eps_attr, 0.0, True)):
            probes = [_probe(m, (2, 3, weight.shape[0]), dtype) for dtype in (weight.dtype, torch.bfloat16)]
            with torch.no_grad():
                if all(_equal(m(p), norm_op._rms_norm(p, weight, eps, form[1], form[2])) for p in probes):
                    return form
    return None


def _probe(m, shape, dtype=None):
    weight = getattr(m, "weight")
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(device=weight.device, dtype=dtype or weight.dtype) * 3


def _equal(a, b):
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
