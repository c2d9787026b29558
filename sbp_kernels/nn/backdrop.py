"""Gradient-masking layers of DESIGN.md 3.6: Backdrop (Golkar & Cranmer 2018) and augmented
dropout (Gao et al., ICML 2019).

Both draw their masks in forward and apply them in backward through a torch.autograd.Function
that saves only the mask: Backdrop's is one bool per sample or per (sample, patch), augmented
dropout's one bit per element (packed 8 to a byte). The masking itself is a single broadcast
multiply in plain PyTorch (one elementwise kernel per op, on any device); a fused kernel would
save little, so there is none.
"""
import math
import numbers

import torch
import torch.nn as nn

__all__ = ["Backdrop", "AugmentedDropout"]


def _check_p(p, name):
    if (
        not isinstance(p, numbers.Real)
        or isinstance(p, bool)
        or math.isnan(p)
        or not 0 <= p < 1
    ):
        raise ValueError(f"{name} must be a real number in [0, 1), got {p!r}")
    return float(p)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _uniform(shape, device, generator):
    """U[0, 1) float32 of `shape` on device, drawn on the generator's device when one is given."""
    draw_on = device if generator is None else generator.device
    return torch.rand(shape, device=draw_on, generator=generator).to(device)


class _BackdropFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by mask * N / |mask| broadcast to x."""

    @staticmethod
    def forward(ctx, x, mask, view_shape, patch):
        ctx.save_for_backward(mask)
        ctx.view_shape, ctx.patch, ctx.hw = view_shape, patch, tuple(x.shape[-2:])
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        # N / |b|; when nothing is kept the mask is all zero and so is the gradient.
        scale = mask.numel() / mask.sum().clamp(min=1)
        factor = mask.to(grad.dtype) * scale.to(grad.dtype)
        if ctx.patch is not None:  # [S, nph, npw] -> [S, H, W]: edge patches are partial
            (ph, pw), (h, w) = ctx.patch, ctx.hw
            factor = factor.repeat_interleave(ph, 1).repeat_interleave(pw, 2)[:, :h, :w]
        return grad * factor.reshape(ctx.view_shape), None, None, None


class Backdrop(nn.Module):
    """Backdrop masking layer (Golkar & Cranmer, "Backdrop: stochastic backpropagation", 2018).

    The forward is the identity. The backward keeps the gradient of a Bernoulli(1 - p) random
    subset b of the N mask elements and scales it by N / |b| (the l1-preserving factor of the
    paper; if no element is kept the gradient is all zero). The mask elements are

    - without patch_size: the samples along `dim` (default 0, the batch): N = x.shape[dim];
    - with patch_size (an int or (ph, pw)): every (sample along `dim`, patch) pair, the patches
      tiling the last two dims (H, W) of a feature map without overlap; H and W need not be
      multiples of the patch size (edge patches are partial). N = S * ceil(H/ph) * ceil(W/pw).
      The mask is broadcast over the channels and within each patch. Several Backdrop layers with
      different patch sizes give the paper's multi-scale masking.

    The mask is drawn at each forward in training mode with grad enabled (from `generator` if
    given: a CPU generator draws on CPU, the mask then moves to x's device) and saved for
    backward; nothing the size of x is saved. In eval mode, under no_grad or with p = 0 the layer
    is the identity. Like every custom autograd Function returning its input, the output must not
    be modified in place (put an in-place activation before Backdrop, not after).
    """

    def __init__(self, p, dim=0, patch_size=None, generator=None):
        super().__init__()
        self.p = _check_p(p, "p")
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.dim = dim
        if patch_size is not None:
            pair = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair)
            ):
                raise ValueError(
                    f"patch_size must be a positive int or a pair (ph, pw) of them, got {patch_size!r}"
                )
            patch_size = tuple(pair)
        self.patch_size = patch_size
        self.generator = _check_generator(generator)

    def extra_repr(self):
        patch = "" if self.patch_size is None else f", patch_size={self.patch_size}"
        return f"p={self.p}, dim={self.dim}{patch}"

    def _mask_layout(self, x):
        """(mask shape, shape broadcasting the [S, H, W] / [S] factor to x)."""
        if not -x.dim() <= self.dim < x.dim():
            raise ValueError(f"dim must index a dim of x (shape {tuple(x.shape)}), got {self.dim}")
        dim = self.dim % x.dim()
        view_shape = [1] * x.dim()
        view_shape[dim] = x.shape[dim]
        if self.patch_size is None:
            return (x.shape[dim],), tuple(view_shape)
        if x.dim() < 3 or dim >= x.dim() - 2:
            raise ValueError(
                f"patch_size needs x of at least 3 dims with the sample dim before the last two "
                f"(H, W), got x of shape {tuple(x.shape)} and dim={self.dim}"
            )
        (ph, pw), (h, w) = self.patch_size, x.shape[-2:]
        view_shape[-2:] = [h, w]
        return (x.shape[dim], -(-h // ph), -(-w // pw)), tuple(view_shape)

    def forward(self, x):
        if not self.training or self.p == 0 or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        mask_shape, view_shape = self._mask_layout(x)
        mask = _uniform(mask_shape, x.device, self.generator) >= self.p  # kept with prob. 1 - p
        return _BackdropFunction.apply(x, mask, view_shape, self.patch_size)


_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(mask):
    """bool tensor -> flat uint8 tensor of ceil(numel / 8) bytes (bit i of byte j: element 8j+i)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def unpack_bits(packed, shape):
    """Inverse of pack_bits: the bool tensor of `shape`."""
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    return (packed[:, None] & bits).ne(0).view(-1)[: math.prod(shape)].view(shape)


class _AugmentedDropoutFunction(torch.autograd.Function):
    """out = x * keep_f / (1 - p_f); grad_x = grad * keep_fb / ((1 - p_f)(1 - p_b))."""

    @staticmethod
    def forward(ctx, x, keep_f, keep_fb, scale_f, scale_b):
        ctx.save_for_backward(pack_bits(keep_fb))
        ctx.shape, ctx.scale_b = x.shape, scale_b
        return x * keep_f * scale_f

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape) * ctx.scale_b, None, None, None, None


class AugmentedDropout(nn.Module):
    """Augmented dropout (Gao et al., "Demystifying Dropout", ICML 2019): forward and backward
    dropout with separate masks.

    Forward: out = x * eps_f / (1 - p_forward), eps_f ~ Bernoulli(1 - p_forward) elementwise
    (nn.Dropout's forward). Backward: grad_x = grad_out * eps_f * eps_b / ((1 - p_forward) *
    (1 - p_backward)), eps_b ~ Bernoulli(1 - p_backward) independent of eps_f. That is the
    forward-dropout gradient further dropped by eps_b and rescaled by 1 / (1 - p_backward), so its
    expectation over eps_b is the plain dropout gradient. Both masks come from one uniform draw
    u: eps_f = [u >= p_f], eps_f * eps_b = [u >= p_f + p_b (1 - p_f)].

    Saved for backward: only eps_f * eps_b, packed one bit per element (nn.Dropout saves a byte).
    In eval mode the layer is the identity; both p's must lie in [0, 1).
    """

    def __init__(self, p_forward=0.5, p_backward=0.5, generator=None):
        super().__init__()
        self.p_forward = _check_p(p_forward, "p_forward")
        self.p_backward = _check_p(p_backward, "p_backward")
        self.generator = _check_generator(generator)

    def extra_repr(self):
        return f"p_forward={self.p_forward}, p_backward={self.p_backward}"

    def forward(self, x):
        p_f, p_b = self.p_forward, self.p_backward
        if not self.training or (p_f == 0 and p_b == 0):
            return x
        u = _uniform(x.shape, x.device, self.generator)
        keep_f = u >= p_f
        scale_f = 1.0 / (1.0 - p_f)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x * keep_f * scale_f
        keep_fb = u >= p_f + p_b * (1.0 - p_f)  # >= p_f in floating point too: a subset of keep_f
        del u
        return _AugmentedDropoutFunction.apply(x, keep_f, keep_fb, scale_f, scale_f / (1.0 - p_b))
