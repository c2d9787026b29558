"""Whole models for the benchmark CLI's "vit" and "convnext" ops, and the comparison wrappers.

- vit(...), convnext(...): timm's own `vit_base_patch16_224` / `convnext_tiny` (pretrained=False,
  no download; other sizes as keyword overrides of those configs) when timm is installed, else the
  replicas below; `source()` says which ("timm" or "replica").
- The replicas (used only without timm) copy timm's class names, attribute names and forward code
  (timm.models.vision_transformer, timm.models.convnext, timm.layers) and answer to timm's
  qualified class names, so that `sbp_kernels.convert`'s timm adapters (which recognise timm's
  classes by qualified name, DESIGN.md 5) convert them as they convert timm's own. (So pickling a
  replica finds timm's class, where timm is installed: the replicas are for benchmarks only.)
  vit(depth, dim, heads, img, patch, num_classes): a VisionTransformer with a class token and
  `patch_embed.grid_size`; convnext(depths, dims): 4x4 stride-4 stem, LayerNorm2d + 2x2 stride-2
  downsample before stages 1-3, ConvNeXtBlocks (NHWC LayerNorm and Mlp), a pooled head.
- AnchorSBP: the papers' own way of doing SBP on a block (their reference implementation):
  the forward runs the block densely under no_grad and saves only the kept rows of its input;
  the backward re-runs the block on the kept rows with grad and backpropagates the kept rows of
  the output gradient (see AnchorSBP).
- Checkpointed: torch.utils.checkpoint of a block (use_reentrant=False).
- wrap(model, select, factory): replaces the modules that select(name, module) accepts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import keepset

__all__ = [
    "Attention", "Block", "ConvNeXt", "ConvNeXtBlock", "ConvNeXtStage", "LayerNorm", "LayerNorm2d",
    "LayerScale", "Mlp", "PatchEmbed", "VisionTransformer", "AnchorSBP", "Checkpointed", "convnext",
    "source", "vit", "wrap",
]  # fmt: skip


# --- timm replicas (timm.models.vision_transformer / convnext, timm.layers) -----------------------


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1  # the class token

    def __init__(
        self, img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4, init_values=0.5
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, init_values=init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class LayerNorm(nn.LayerNorm):  # timm.layers.LayerNorm: channels-last LayerNorm
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):  # timm.layers.LayerNorm2d: LayerNorm over C of an NCHW tensor
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, in_chs, mlp_ratio=4, conv_mlp=False, ls_init_value=0.5):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 7, padding=3, groups=in_chs)
        self.norm = LayerNorm(in_chs)
        self.mlp = Mlp(in_chs, int(mlp_ratio * in_chs))
        self.gamma = nn.Parameter(ls_init_value * torch.ones(in_chs)) if ls_init_value is not None else None
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs, out_chs, depth, ls_init_value=1e-6):
        super().__init__()
        if in_chs != out_chs:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, ls_init_value=ls_init_value) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), in_chans=3, num_classes=1000, ls_init_value=1e-6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        chs = [dims[0]] + list(dims)
        self.stages = nn.Sequential(
            *[ConvNeXtStage(chs[i], chs[i + 1], d, ls_init_value) for i, d in enumerate(depths)]
        )
        self.norm_pre = nn.Identity()
        self.head_norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.norm_pre(self.stages(self.stem(x)))
        return self.head(self.head_norm(x.mean((2, 3))))


# timm's qualified names of the replicas (see the module docstring).
for _cls, _module in (
    (Mlp, "timm.layers.mlp"), (Attention, "timm.layers.attention"), (LayerScale, "timm.models.vision_transformer"),
    (Block, "timm.models.vision_transformer"), (PatchEmbed, "timm.layers.patch_embed"),
    (VisionTransformer, "timm.models.vision_transformer"), (LayerNorm, "timm.layers.norm"),
    (LayerNorm2d, "timm.layers.norm"), (ConvNeXtBlock, "timm.models.convnext"),
    (ConvNeXtStage, "timm.models.convnext"), (ConvNeXt, "timm.models.convnext"),
):  # fmt: skip
    _cls.__module__ = _module


def timm_available():
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def source():
    """Where vit() and convnext() take their models from: "timm" when it is installed, else "replica"."""
    return "timm" if timm_available() else "replica"


VIT_B16 = {"depth": 12, "dim": 768, "heads": 12, "img": 224, "patch": 16}
CONVNEXT_T = {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)}


def vit(depth=12, dim=768, heads=12, img=224, patch=16, num_classes=1000, use_timm=None):
    """A ViT (ViT-B/16 by default): timm's vit_base_patch16_224 (class token, no layer scale), its
    sizes overridden by the arguments that differ; the replica when timm is not installed (or
    use_timm=False)."""
    if use_timm is None:
        use_timm = timm_available()
    if not use_timm:
        return VisionTransformer(img, patch, 3, num_classes, dim, depth, heads, init_values=None)
    import timm

    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=heads, num_classes=num_classes,
    )  # fmt: skip


def convnext(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, use_timm=None):
    """A ConvNeXt (ConvNeXt-T by default): timm's convnext_tiny with these depths and dims; the
    replica when timm is not installed (or use_timm=False)."""
    if use_timm is None:
        use_timm = timm_available()
    if not use_timm:
        return ConvNeXt(depths, dims, num_classes=num_classes)
    import timm

    return timm.create_model(
        "convnext_tiny", pretrained=False, depths=tuple(depths), dims=tuple(dims), num_classes=num_classes
    )


def describe(op, use_timm, **sizes):
    """The model's name for tables and records: timm's model name (with the sizes that differ from
    it), or "replica ..." ."""
    default = VIT_B16 if op == "vit" else CONVNEXT_T
    name = "vit_base_patch16_224" if op == "vit" else "convnext_tiny"
    changed = {k: v for k, v in sizes.items() if k in default and _norm(v) != _norm(default[k])}
    text = ("timm " if use_timm else "replica of timm's ") + name
    if changed:
        text += " (" + ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                 for k, v in changed.items()) + ")"  # fmt: skip
    return text


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


# --- the comparison wrappers -----------------------------------------------------------------------


class _AnchorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, block, dim, residual, *params):
        with torch.no_grad():
            y = block(x)
        ctx.block, ctx.dim, ctx.residual, ctx.x_shape = block, dim, residual, x.shape
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x.index_select(dim, idx), idx)  # only the kept rows of the input
        return y

    @staticmethod
    def backward(ctx, dy):
        x_kept, idx = ctx.saved_tensors
        params = [p for p in ctx.block.parameters() if p.requires_grad]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            x_kept = x_kept.detach().requires_grad_()
            y_kept = ctx.block(x_kept)
        grads = torch.autograd.grad(y_kept, [x_kept] + params, dy.index_select(ctx.dim, idx), allow_unused=True)
        dx_kept = grads[0].to(x_kept.dtype)
        # Dropped rows: zero, or with residual=True the output gradient (the block's identity
        # shortcut, which needs nothing saved); kept rows: the re-run's input gradient.
        dx = dy.to(x_kept.dtype).clone() if ctx.residual else dx_kept.new_zeros(ctx.x_shape)
        dx.index_copy_(ctx.dim, idx, dx_kept)
        return (dx, None, None, None, None, *grads[1:])


class AnchorSBP(nn.Module):
    """SBP on a whole block the papers' way (their reference implementation, "the anchor").

    forward: the block runs densely under no_grad; only the kept rows of its input (a fresh keep
    set per call, `keepset.draw(n, keep_ratio, "grid", layout)` over the `dim` axis, e.g.
    ViT tokens with the class token always kept, or ConvNeXt pixel rows) are saved, gathered with
    index_select (the papers used masked_select). backward: the block re-runs on the kept rows with
    grad (so a ViT block attends among kept tokens only, a ConvNeXt block convolves the image of
    kept rows), the kept rows of the output gradient are backpropagated through it, and the input
    gradient is scattered into zeros (residual=False) or into the output gradient (residual=True:
    a residual block's shortcut passes the gradient of dropped rows; their branch gradient is 0).
    The block's parameter gradients are those of the block applied to the kept rows alone.
    """

    def __init__(self, block, keep_ratio=0.5, dim=1, layout=None, residual=True):
        super().__init__()
        self.block, self.keep_ratio, self.dim, self.layout, self.residual = block, keep_ratio, dim, layout, residual

    def forward(self, x):
        params = [p for p in self.block.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            return self.block(x)
        n = x.shape[self.dim]
        layout = self.layout if self.layout is not None and n >= _prod(self.layout) else None
        # Real tensors also under FakeTensorMode (a simulated step): the draw reads its values.
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            idx = keepset.draw(n, self.keep_ratio, "grid", layout)
        idx = idx.to(x.device)
        return _AnchorFunction.apply(x, idx, self.block, self.dim, self.residual, *params)


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


class Checkpointed(nn.Module):
    """torch.utils.checkpoint of a block: nothing inside it saved, its forward re-run in backward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def wrap(model, select, factory):
    """Replaces each outermost module m (name) of model with select(name, m) true by factory(m).
    Returns the wrapped names."""
    done = []
    for name, m in list(model.named_modules()):
        if not name or any(name.startswith(d + ".") for d in done) or not select(name, m):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, factory(m))
        done.append(name)
    return done
