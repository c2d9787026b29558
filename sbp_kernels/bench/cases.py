"""The benchmark cases: one op at one shape, as a dense PyTorch baseline and as SBP.

The ops "vit" and "convnext" are whole models (ModelCase, model_cases): one training step of timm's
vit_base_patch16_224 / convnext_tiny (sizes reduced on CPU; the replicas of
sbp_kernels.bench.models without timm), dense, SBP via convert (with and without its recompute
mode), the papers' own way (models.AnchorSBP) and activation checkpointing of the same blocks.

Three shape sets (see BENCHMARKS.md):
- "full" on GPU: the issues' target shapes (ViT-B, ConvNeXt-T stage 1, long-sequence attention).
- "full" on CPU: the same layers with a smaller batch (and a shorter long sequence), so that a
  CPU run finishes in minutes. Channel widths, token counts and head sizes are unchanged.
- "quick": small shapes for a smoke run (the whole CLI in well under 2 minutes on 2 CPU cores).

A case builds a Workload: the tensors gradients are taken for (`inputs`: activations, `params`:
parameters), a dense forward, and an SBP forward for a keep set and a backend. The keep set is
drawn by the caller over `case.layout` (token axis for linear / attention / mlp / block, the
H x W grid for pointwise conv) and shared by every backend of the case.
"""
import dataclasses

import torch
import torch.nn.functional as F

from .. import backend as _backend

OPS = ("linear", "pointwise_conv", "attention", "mlp", "block", "vit", "convnext")
MODEL_OPS = ("vit", "convnext")  # whole-model training steps (ModelCase), the others are Case

_attention = None


def attention_op():
    """(sbp attention function, None) once sbp_kernels.ops.attention imports, else (None, why).

    The import is tried once per process: a module that failed half-way may have registered part
    of its kernels, and a second import would fail differently.
    """
    global _attention
    if _attention is None:
        try:
            from ..ops.attention import attention

            _attention = (attention, None)
        except Exception as exc:  # noqa: BLE001  (any failure: the module is being written)
            _attention = (None, f"sbp_kernels.ops.attention does not import ({type(exc).__name__}: {exc})")
    return _attention


@dataclasses.dataclass
class Workload:
    inputs: list  # activations that get gradients (the layer's input)
    params: list  # parameters that get gradients (excluded from saved-bytes counts)
    dense: callable  # () -> output, plain PyTorch
    sbp: callable  # (keep_idx, backend) -> output, the sbp_kernels ops

    @property
    def targets(self):
        return self.inputs + self.params


@dataclasses.dataclass
class Case:
    op: str  # one of OPS
    label: str  # short shape description for tables
    shape: dict  # the shapes, for JSON records
    layout: tuple  # the keep set's layout: (n,) tokens or (H, W) pixels
    kernels: tuple  # the sbp ops it runs: a backend must serve all of them
    build: callable  # (device, dtype, generator) -> Workload

    @property
    def name(self):
        return f"{self.op} {self.label}"


def _randn(shape, device, dtype, generator, scale=1.0):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=generator) * scale
    return t.to(dtype)


def _param(shape, device, dtype, generator, fan_in):
    return _randn(shape, device, dtype, generator, fan_in**-0.5).requires_grad_()


def _input(shape, device, dtype, generator):
    return _randn(shape, device, dtype, generator).requires_grad_()


def _linear_case(rows, n, c_in, c_out):
    def build(device, dtype, gen):
        from ..ops.linear import linear

        x = _input((rows, n, c_in), device, dtype, gen)
        w = _param((c_out, c_in), device, dtype, gen, c_in)
        b = _param((c_out,), device, dtype, gen, c_in)
        return Workload(
            [x], [w, b], lambda: F.linear(x, w, b), lambda keep, be: linear(x, w, b, keep, backend=be)
        )

    shape = {"x": [rows, n, c_in], "weight": [c_out, c_in]}
    return Case("linear", f"{rows}x{n} {c_in}->{c_out}", shape, (n,), ("linear",), build)


def _pointwise_conv_case(batch, c_in, c_out, hw, channels_last=False):
    def build(device, dtype, gen):
        from ..ops.pointwise_conv import pointwise_conv

        x = _randn((batch, c_in, hw, hw), device, dtype, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = _param((c_out, c_in, 1, 1), device, dtype, gen, c_in)
        b = _param((c_out,), device, dtype, gen, c_in)
        return Workload(
            [x],
            [w, b],
            lambda: F.conv2d(x, w, b),
            lambda keep, be: pointwise_conv(x, w, b, keep, backend=be),
        )

    fmt = " channels_last" if channels_last else ""
    shape = {"x": [batch, c_in, hw, hw], "weight": [c_out, c_in, 1, 1], "channels_last": channels_last}
    label = f"{batch}x{c_in}x{hw}x{hw} {c_in}->{c_out}{fmt}"
    return Case("pointwise_conv", label, shape, (hw, hw), ("pointwise_conv",), build)


def _attention_case(batch, heads, n, d, causal=False):
    def build(device, dtype, gen):
        attention, why = attention_op()
        if attention is None:
            raise RuntimeError(why)
        q, k, v = (_input((batch, heads, n, d), device, dtype, gen) for _ in range(3))
        return Workload(
            [q, k, v],
            [],
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            lambda keep, be: attention(q, k, v, keep, causal=causal, backend=be),
        )

    shape = {"q": [batch, heads, n, d], "causal": causal}
    label = f"B{batch} h{heads} n{n} d{d}" + (" causal" if causal else "")
    return Case("attention", label, shape, (n,), ("attention",), build)


def _mlp_case(rows, n, c, hidden):
    def build(device, dtype, gen):
        from ..ops.mlp import mlp

        x = _input((rows, n, c), device, dtype, gen)
        w1 = _param((hidden, c), device, dtype, gen, c)
        b1 = _param((hidden,), device, dtype, gen, c)
        w2 = _param((c, hidden), device, dtype, gen, hidden)
        b2 = _param((c,), device, dtype, gen, hidden)
        return Workload(
            [x],
            [w1, b1, w2, b2],
            lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
            lambda keep, be: mlp(x, w1, b1, w2, b2, keep, backend=be),
        )

    shape = {"x": [rows, n, c], "hidden": hidden}
    return Case("mlp", f"{rows}x{n} {c}->{hidden}->{c}", shape, (n,), ("mlp",), build)


def _block_case(batch, n, dim, heads):
    """Pre-norm ViT block: x + proj(attn(qkv(LN(x)))), then + fc2(gelu(fc1(LN(.))))."""
    hidden = 4 * dim
    d = dim // heads

    def build(device, dtype, gen):
        from ..ops.linear import linear
        from ..ops.mlp import mlp
        from ..ops.tokenwise import tokenwise

        attention, why = attention_op()
        if attention is None:
            raise RuntimeError(why)
        x = _input((batch, n, dim), device, dtype, gen)
        ln1_w = (1 + 0.1 * _randn((dim,), device, dtype, gen)).requires_grad_()
        ln1_b = _param((dim,), device, dtype, gen, 100.0)
        ln2_w = (1 + 0.1 * _randn((dim,), device, dtype, gen)).requires_grad_()
        ln2_b = _param((dim,), device, dtype, gen, 100.0)
        w_qkv, b_qkv = _param((3 * dim, dim), device, dtype, gen, dim), _param((3 * dim,), device, dtype, gen, dim)
        w_proj, b_proj = _param((dim, dim), device, dtype, gen, dim), _param((dim,), device, dtype, gen, dim)
        w1, b1 = _param((hidden, dim), device, dtype, gen, dim), _param((hidden,), device, dtype, gen, dim)
        w2, b2 = _param((dim, hidden), device, dtype, gen, hidden), _param((dim,), device, dtype, gen, hidden)
        params = [ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w1, b1, w2, b2]

        def ln1(t):
            return F.layer_norm(t, (dim,), ln1_w, ln1_b)

        def ln2(t):
            return F.layer_norm(t, (dim,), ln2_w, ln2_b)

        def heads_of(qkv):  # [B, n, 3*dim] -> q, k, v [B, h, n, d] (views, as timm does)
            return qkv.reshape(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)

        def merge(o):  # [B, h, n, d] -> [B, n, dim]
            return o.transpose(1, 2).reshape(batch, n, dim)

        def dense():
            q, k, v = heads_of(F.linear(ln1(x), w_qkv, b_qkv))
            h = x + F.linear(merge(F.scaled_dot_product_attention(q, k, v)), w_proj, b_proj)
            return h + F.linear(F.gelu(F.linear(ln2(h), w1, b1)), w2, b2)

        def sbp(keep, be):
            q, k, v = heads_of(linear(tokenwise(ln1, x, keep), w_qkv, b_qkv, keep, backend=be))
            h = x + linear(merge(attention(q, k, v, keep, backend=be)), w_proj, b_proj, keep, backend=be)
            return h + mlp(tokenwise(ln2, h, keep), w1, b1, w2, b2, keep, backend=be)

        return Workload([x], params, dense, sbp)

    shape = {"x": [batch, n, dim], "heads": heads, "hidden": hidden}
    return Case("block", f"ViT B{batch} n{n} d{dim} h{heads}", shape, (n,), ("linear", "attention", "mlp"), build)


def backend_reason(name, case, device):
    """Why backend `name` is not benchmarked for case on device, or None when it is.

    Triton is never timed on CPU: there its kernels run only under the TRITON_INTERPRET=1
    interpreter, which is for tests (and may be set in the environment by the test suite).
    """
    if name == "triton" and device.type == "cpu":
        return "triton kernels run on CPU only under the TRITON_INTERPRET=1 interpreter (tests, not timing)"
    for op in case.kernels:
        try:
            reason = _backend.unavailable_reason(name, op, device)
        except KeyError:
            reason = f"sbp.{op} is not in sbp_kernels.backend's table"
        if reason:
            return reason
    return None


def cases(device_type, quick=False):
    """The cases of every op for a device type ("cpu" / "cuda") and shape set."""
    if quick:
        return [
            _linear_case(4, 197, 256, 1024),
            _linear_case(4, 197, 1024, 256),
            _pointwise_conv_case(4, 64, 256, 28),
            _pointwise_conv_case(4, 256, 64, 28),
            _attention_case(4, 4, 197, 64),
            _attention_case(1, 4, 512, 64),
            _attention_case(1, 4, 512, 64, causal=True),
            _mlp_case(4, 197, 256, 1024),
            _block_case(4, 197, 256, 4),
        ]
    if device_type == "cuda":  # the issues' target shapes
        return [
            _linear_case(64, 197, 768, 3072),
            _linear_case(64, 197, 3072, 768),
            _pointwise_conv_case(64, 96, 384, 56),
            _pointwise_conv_case(64, 384, 96, 56),
            _attention_case(64, 12, 197, 64),
            _attention_case(8, 16, 4096, 64),
            _attention_case(8, 16, 4096, 64, causal=True),
            _mlp_case(64, 197, 768, 3072),
            _block_case(64, 197, 768, 12),
        ]
    # CPU: the target layers with batch 64 -> 8 and the long sequence 4096 -> 1024 (batch 1).
    return [
        _linear_case(8, 197, 768, 3072),
        _linear_case(8, 197, 3072, 768),
        _pointwise_conv_case(8, 96, 384, 56),
        _pointwise_conv_case(8, 384, 96, 56),
        _attention_case(8, 12, 197, 64),
        _attention_case(1, 16, 1024, 64),
        _attention_case(1, 16, 1024, 64, causal=True),
        _mlp_case(8, 197, 768, 3072),
        _block_case(8, 197, 768, 12),
    ]


# --- whole models ---------------------------------------------------------------------------------

MODEL_KEEP_RATIO = 0.5


@dataclasses.dataclass
class ModelWork:
    model: object  # the dense model (fp32 parameters); each variant runs on a deep copy
    x: object  # input images
    y: object  # class labels of the cross-entropy loss
    sbp_layers: callable  # convert(..., layers=sbp_layers): the SBP blocks
    blocks: callable  # (name, module) -> bool: the same blocks, for the anchor and checkpoint wrappers
    dense_blocks: callable  # (name, module) -> bool: the blocks SBP leaves dense (checkpointed beside recompute)
    anchor: dict  # AnchorSBP settings: dim (rows axis of a block's input), layout


@dataclasses.dataclass
class ModelCase:
    op: str  # one of MODEL_OPS
    label: str
    shape: dict
    n_positions: int  # positions (tokens / pixels) per sample seen by the first SBP block
    build: callable  # (device, generator) -> ModelWork
    source: str = ""  # what the model is: "timm vit_base_patch16_224", "replica of timm's ..."

    @property
    def name(self):
        return f"{self.op} {self.label}"


def _vit_case(batch, depth, dim, heads, img, patch, num_classes=1000, label=None):
    from . import models

    first = depth // 3  # ViT-B: the last 8 of 12 blocks
    use_timm = models.timm_available()

    def build(device, gen):
        torch.manual_seed(0)
        model = models.vit(depth, dim, heads, img, patch, num_classes, use_timm=use_timm).to(device)
        x = torch.randn((batch, 3, img, img), generator=gen, device=device)
        y = torch.randint(0, num_classes, (batch,), generator=gen, device=device)

        def sbp_layers(name, m):
            return name.startswith("blocks.") and int(name.split(".")[1]) >= first

        def block_number(name):
            parts = name.split(".")
            return int(parts[1]) if len(parts) == 2 and parts[0] == "blocks" else None

        def blocks(name, m):
            return block_number(name) is not None and block_number(name) >= first

        def dense_blocks(name, m):
            return block_number(name) is not None and block_number(name) < first

        grid = model.patch_embed.grid_size
        return ModelWork(model, x, y, sbp_layers, blocks, dense_blocks, {"dim": 1, "layout": tuple(grid)})

    grid = img // patch
    sizes = {"depth": depth, "dim": dim, "heads": heads, "img": img, "patch": patch}
    shape = {"x": [batch, 3, img, img], **sizes, "sbp_blocks": f"{first}-{depth - 1}"}
    label = label or f"B{batch} {img}px/{patch} d{dim} x{depth}"
    return ModelCase("vit", label, shape, grid * grid + 1, build, models.describe("vit", use_timm, **sizes))


def _convnext_case(batch, depths, dims, img, num_classes=1000, label=None):
    from . import models

    sbp_stages = len(depths) - 1  # ConvNeXt-T: the blocks of stages 0, 1, 2
    use_timm = models.timm_available()

    def build(device, gen):
        torch.manual_seed(0)
        model = models.convnext(depths, dims, num_classes, use_timm=use_timm).to(device)
        x = torch.randn((batch, 3, img, img), generator=gen, device=device)
        y = torch.randint(0, num_classes, (batch,), generator=gen, device=device)

        def stage(name):
            parts = name.split(".")
            ok = len(parts) >= 3 and parts[0] == "stages" and parts[1].isdigit() and parts[2] == "blocks"
            return int(parts[1]) if ok else None

        def sbp_layers(name, m):
            return stage(name) is not None and stage(name) < sbp_stages

        def blocks(name, m):
            return len(name.split(".")) == 4 and sbp_layers(name, m)

        def dense_blocks(name, m):
            return len(name.split(".")) == 4 and stage(name) == sbp_stages

        return ModelWork(model, x, y, sbp_layers, blocks, dense_blocks, {"dim": 2, "layout": None})

    sizes = {"depths": tuple(depths), "dims": tuple(dims)}
    shape = {"x": [batch, 3, img, img], "depths": list(depths), "dims": list(dims),
             "sbp_blocks": f"stages 0-{sbp_stages - 1}"}  # fmt: skip
    label = label or f"B{batch} {img}px {'-'.join(map(str, depths))} {dims[0]}-{dims[-1]}"
    return ModelCase("convnext", label, shape, (img // 4) ** 2, build, models.describe("convnext", use_timm, **sizes))


def model_cases(device_type, quick=False):
    """The whole-model cases for a device type and shape set."""
    if quick:
        return [
            _vit_case(2, 3, 64, 2, 32, 8, num_classes=10),
            _convnext_case(2, (1, 1, 1, 1), (16, 32, 64, 128), 32, num_classes=10),
        ]
    if device_type == "cuda":  # ViT-B/16 and ConvNeXt-T at 224 px, batch 64
        return [
            _vit_case(64, 12, 768, 12, 224, 16, label="ViT-B/16 B64 224px"),
            _convnext_case(64, (3, 3, 9, 3), (96, 192, 384, 768), 224, label="ConvNeXt-T B64 224px"),
        ]
    return [
        _vit_case(8, 6, 192, 3, 64, 8),
        _convnext_case(4, (1, 1, 2, 1), (32, 64, 128, 256), 64),
    ]
