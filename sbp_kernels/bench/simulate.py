"""Simulated training steps at full GPU shapes on any machine: peak memory, held and saved bytes,
and FLOPs of one step (DESIGN.md 9), per variant: dense, SBP, SBP in recompute mode (with or
without checkpointing of the blocks left dense), activation checkpointing and the papers' own
re-forward (AnchorSBP).

`sbp-bench --simulate` runs the cases below; `measure_step` measures any model and step.

How a step is measured:
- The model is built on the meta device (no memory, no initialisation cost), its parameters cast
  to the step's dtype, and converted / wrapped as the variant says. convert recognises a norm's
  form by running it on a probe (nn/tokenwise.py), so the 0-D and 1-D parameters and the buffers
  are made real (small) before it runs. Then every parameter and buffer is replaced by a fake
  tensor (torch._subclasses.FakeTensorMode: shape, dtype, strides and a storage of its own, no
  data) and the batch is made fake too: nothing is computed, any shape fits on any machine. The
  fake device is the CPU: PyTorch's CPU attention takes the flash-attention path (it saves q, k, v,
  the output and the row log-sum-exp, as CUDA's flash attention does), also for grouped-query
  attention.
- One training step: parameter gradients set to None, forward, loss, backward. The tracker
  (LiveBytes, a TorchDispatchMode) sees the outputs of every aten op and counts each storage once,
  its size rounded up to 512 bytes (the CUDA caching allocator's block granularity), from its
  first appearance until it is freed (a weakref finalizer on the storage). Storages alive before
  the step (parameters, the batch) are not counted, so `peak` is the step's peak above them, as
  `torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()` before the step is on a GPU;
  the parameter gradients count (they are allocated in the step).
- `held`: the live bytes at the end of forward + loss (what the step keeps for its backward,
  a checkpointed block's input included); `saved`: the unique storages autograd's saved-tensor
  hooks see during forward + loss, parameters excluded (a checkpointed region's inside is not
  seen: torch.utils.checkpoint installs hooks of its own there).
- FLOPs: torch.utils.flop_counter's formulas (FlopCounterMode), the sbp ops on their torch
  backend (matmuls, which the counter sees; the recomputation in backward counts). The counter's
  per-module tracker is left out (its backward hooks reject the torch.autograd.grad that a
  recompute-mode block runs inside backward): totals only. Attention counts as the counter counts
  it: the whole n x n product, also when causal.

What the tracker cannot see: memory that a kernel allocates internally (cuBLAS / flash-attention
workspaces), the caching allocator's fragmentation, the CUDA context. The sbp ops run their torch
backend here: its temporaries (a gathered copy of dy, an attention's score tiles) count, where a
fused kernel may need less. A real step on the CPU with the same tracker gives the same bytes as
the fake step (tests/test_simulate.py).
"""
import contextlib
import dataclasses
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GRANULARITY = 512  # bytes: the CUDA caching allocator rounds every block up to a multiple of it
BACKEND = "torch"  # the sbp ops' backend in the simulated variants (the reference: plain aten ops)


def rounded(nbytes, granularity=GRANULARITY):
    return -(-int(nbytes) // granularity) * granularity


# --- the trackers -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Storage:
    nbytes: int
    label: tuple  # (phase, module or autograd node)
    born: int  # op counter when it appeared
    freed: int = None  # op counter when it was freed (None: alive at the end)
    saved: bool = False  # seen by the saved-tensor hooks in forward
    grad: bool = False  # a parameter's .grad at the end
    op: str = ""  # the aten op that made it


class LiveBytes(TorchDispatchMode):
    """Live storage bytes of the ops run inside it (see the module docstring).

    current / peak: live bytes now / at most, of storages that appeared inside it (rounded up to
    `granularity`); breakdown(): who holds the bytes at the peak. `where` (a callable () -> label)
    names the allocating code for the breakdown.
    """

    def __init__(self, granularity=GRANULARITY, where=None):
        super().__init__()
        self.granularity, self.where = granularity, where or (lambda: ("", ""))
        self.current = self.peak = 0
        self.clock = self.peak_clock = 0
        self._live = {}  # id(storage) -> (weakref, _Storage)
        self.storages = []  # every _Storage seen, in order

    def _free(self, key, rec):
        rec.freed = self.clock
        self.current -= rec.nbytes
        if self._live.get(key, (None, None))[1] is rec:
            del self._live[key]

    def _see(self, t, op=""):
        storage = t.untyped_storage()
        key = id(storage)
        nbytes = rounded(storage.nbytes(), self.granularity)
        hit = self._live.get(key)
        if hit is not None and hit[0]() is storage:
            rec = hit[1]
            if nbytes != rec.nbytes:  # resized in place
                self.current += nbytes - rec.nbytes
                rec.nbytes = nbytes
            return rec
        rec = _Storage(nbytes, self.where(), self.clock, op=op)
        self._live[key] = (weakref.ref(storage), rec)  # (a dead storage's entry: its finalizer counts it out)
        weakref.finalize(storage, self._free, key, rec)
        self.storages.append(rec)
        self.current += nbytes
        return rec

    def record(self, t):
        """The _Storage of t's storage, or None for a storage older than the tracker."""
        hit = self._live.get(id(t.untyped_storage()))
        return hit[1] if hit is not None and hit[0]() is t.untyped_storage() else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.clock += 1
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (a view, an in-place op) allocates nothing: counted
        # already, or older than the tracker (a parameter's transpose).
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = id(t.untyped_storage())
                if key not in inputs or key in self._live:
                    self._see(t, func.__name__)
        if self.current > self.peak:
            self.peak, self.peak_clock = self.current, self.clock
        return out

    def at_peak(self):
        """The storages alive at the peak."""
        t = self.peak_clock
        return [r for r in self.storages if r.born <= t and (r.freed is None or r.freed >= t)]

    def breakdown(self, top=None, ops=False):
        """[(what, bytes)] of the storages alive at the peak, largest first: grouped by phase,
        block (module path up to its last numbered part; with ops=True the whole path and the aten
        op) and kind (saved for backward / parameter gradient / other)."""
        groups = {}
        for r in self.at_peak():
            phase, where = r.label
            kind = "param grads" if r.grad else "saved" if r.saved else "other"
            where = f"{where} {r.op}" if ops else _block_of(where) if where else ""
            key = f"{phase} {where} [{kind}]" if where else f"{phase} [{kind}]"
            groups[key] = groups.get(key, 0) + r.nbytes
        out = sorted(groups.items(), key=lambda kv: -kv[1])
        return out[:top] if top else out


def _block_of(name):
    """A module path up to its last numbered part ("blocks.5.mlp.fc1" -> "blocks.5"), or its
    first part."""
    parts = name.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: numbered[-1] + 1]) if numbered else parts[0]


class _Where:
    """The label of the code allocating now: ("forward" | "backward", innermost module of the
    model running, else in backward the autograd node), from global module hooks."""

    def __init__(self, model):
        self.names = {id(m): name for name, m in model.named_modules()}
        self.stack = []
        self.handles = []
        self.phase = "forward"  # measure_step sets "backward" when it calls backward

    def __enter__(self):
        from torch.nn.modules import module as module_mod

        self.handles = [
            module_mod.register_module_forward_pre_hook(self._push),
            module_mod.register_module_forward_hook(self._pop, always_call=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def _push(self, module, args):
        self.stack.append(self.names.get(id(module)))

    def _pop(self, module, args, output):
        if self.stack:
            self.stack.pop()

    def __call__(self):
        backward = self.phase == "backward"
        for name in reversed(self.stack):
            if name is not None:
                return ("backward (recompute)" if backward else "forward", name or "<root>")
        node = torch._C._current_autograd_node() if backward else None
        return (self.phase, "" if node is None else node.name())


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts under "Global"."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    """A FlopCounterMode for totals (no per-module tracker, see the module docstring), which also
    counts the CPU flash-attention ops as the counter counts CUDA's, and a grouped convolution's
    weight gradient with its groups."""
    from torch.utils import flop_counter

    def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                            output_padding, groups, output_mask, out_shape=None, **kwargs):
        # Each gradient (input, weight) costs what the forward convolution costs. (The counter's
        # own formula leaves the groups out of the weight gradient: a depthwise convolution's would
        # count C times over.)
        forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
        return forward * (bool(output_mask[0]) + bool(output_mask[1]))

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward_flops,
        aten.convolution_backward: conv_backward_flops,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = _GlobalOnly()
    return counter


@dataclasses.dataclass
class Measurement:
    peak_bytes: int  # peak live bytes of the step above what was alive before it
    held_bytes: int  # live bytes at the end of forward + loss
    saved_bytes: int  # unique storages saved for backward in forward + loss, parameters excluded
    flops: int  # forward + loss + backward
    breakdown: list  # [(what, bytes)] at the peak
    seconds: float  # wall time of the measured step


def measure_step(model, forward, count_flops=True):
    """Runs one training step (parameter gradients to None, loss = forward(), loss.backward())
    under the trackers and returns its Measurement. The caller makes the model and the batch (fake
    or real) and enters FakeTensorMode around this call for a simulated step."""
    for p in model.parameters():
        p.grad = None
    params = list(model.parameters())
    skip = {id(p.untyped_storage()) for p in params}
    where = _Where(model)
    live = LiveBytes(where=where)
    saved = {}  # id(storage) -> (weakref, nbytes)

    def pack(t):
        storage = t.untyped_storage()
        if id(storage) not in skip:
            saved[id(storage)] = (weakref.ref(storage), storage.nbytes())
            rec = live.record(t)
            if rec is not None:
                rec.saved = True
        return t

    flops = flop_counter() if count_flops else contextlib.nullcontext()
    start = time.perf_counter()
    with where, flops, live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        held = live.current
        where.phase = "backward"
        loss.backward()
        del loss
    seconds = time.perf_counter() - start
    grads = {id(p.grad.untyped_storage()) for p in params if p.grad is not None}
    for ref, rec in live._live.values():
        if id(ref()) in grads:
            rec.grad = True
    return Measurement(
        peak_bytes=live.peak,
        held_bytes=held,
        saved_bytes=sum(nbytes for ref, nbytes in saved.values()),
        flops=flops.get_total_flops() if count_flops else None,
        breakdown=live.breakdown(12),
        seconds=seconds,
    )


# --- fake models ------------------------------------------------------------------------------


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Real tensors meet fake ones: keep sets are drawn for real (their values are read).
    return FakeTensorMode(allow_non_fake_inputs=True)


def materialize_small(model, generator=None):
    """Makes the meta 0-D / 1-D parameters and the meta buffers of model real (random values near
    a norm's 1 for weights, near 0 otherwise), for convert's probes; the rest stays on meta."""
    generator = generator or torch.Generator().manual_seed(0)
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta and p.dim() <= 1:
                value = torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "weight" in name else 0.0)
                m._parameters[name] = torch.nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def fakeify(model, mode):
    """Replaces every parameter and buffer of model by a fake CPU tensor of its shape and dtype
    (made under `mode`); shared parameters stay shared."""
    memo = {}
    with mode:
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = torch.nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad
                        )
                    m._parameters[name] = memo[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
                    m._buffers[name] = memo[id(b)]
    return model


# --- cases and variants -----------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str  # dense, sbp, sbp+recompute, sbp+recompute+checkpoint, checkpoint, checkpoint (all), anchor
    keep_ratio: float = None
    recompute: bool = False
    checkpoint_dense: bool = False  # checkpoint the blocks SBP leaves dense
    checkpoint_sbp: bool = False  # checkpoint the blocks SBP would convert
    checkpoint_all: bool = False
    anchor: bool = False


@dataclasses.dataclass
class SimCase:
    op: str  # vit, convnext, llama
    label: str
    shape: dict
    source: str  # what the model is: "timm vit_base_patch16_224", "transformers LlamaForCausalLM ..."
    make: callable  # () -> the dense model (on the current default device), parameters in fp32
    batch: callable  # (generator or None) -> the step's inputs (under the current mode)
    loss: callable  # (model, inputs) -> the loss
    prepare: callable  # (model, variant) -> the variant of the model (in place)
    variants: list
    dtype: torch.dtype = torch.bfloat16
    notes: list = dataclasses.field(default_factory=list)

    @property
    def name(self):
        return f"{self.op} {self.label}"


def build(case, variant, fake=True, seed=0):
    """(model, inputs, mode) for one variant: fake (mode: the FakeTensorMode to run it under) or
    real on the CPU (mode: a null context), the model's parameters in case.dtype."""
    torch.manual_seed(seed)
    if fake:
        with torch.device("meta"):
            model = case.make()
        if case.dtype is not None:
            model = model.to(case.dtype)
        materialize_small(model)
    else:
        model = case.make()
        if case.dtype is not None:
            model = model.to(case.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert's notes on what stays dense
        model = case.prepare(model, variant)
    model.train()
    if fake:
        mode = fake_mode()
        fakeify(model, mode)
        with mode:
            inputs = case.batch(None)
    else:
        mode = contextlib.nullcontext()
        inputs = case.batch(torch.Generator().manual_seed(seed))
    return model, inputs, mode


def run_variant(case, variant, fake=True, seed=0, count_flops=True):
    """The Measurement of one variant's training step."""
    model, inputs, mode = build(case, variant, fake, seed)
    with mode:
        return measure_step(model, lambda: case.loss(model, inputs), count_flops)


def _select(names):
    return lambda name, m: name in names


def _image_case(op, label, shape, source, make, batch, img, classes, sbp_blocks, dense_blocks, anchor, variants):
    """A timm-style image classifier: loss = cross-entropy of the fp32 logits."""

    def make_batch(gen):
        x = torch.randn((batch, 3, img, img), generator=gen).to(torch.bfloat16)
        y = torch.randint(0, classes, (batch,), generator=gen)
        return x, y

    def loss(model, inputs):
        x, y = inputs
        return F.cross_entropy(model(x).float(), y)

    def prepare(model, v):
        from ..nn.convert import convert
        from .models import AnchorSBP, Checkpointed, wrap

        blocks = [n for n, _ in model.named_modules()]
        sbp = [n for n in blocks if sbp_blocks(n)]
        dense = [n for n in blocks if dense_blocks(n)]
        if v.keep_ratio is not None and not v.anchor:
            layers = lambda name, m: any(name == b or name.startswith(b + ".") for b in sbp)  # noqa: E731
            convert(model, v.keep_ratio, "grid", layers=layers, backend=BACKEND, recompute=v.recompute)
        if v.anchor:
            wrap(model, _select(sbp), lambda m: AnchorSBP(m, v.keep_ratio, **anchor(model)))
        if v.checkpoint_sbp or v.checkpoint_all:
            wrap(model, _select(sbp), Checkpointed)
        if v.checkpoint_dense or v.checkpoint_all:
            wrap(model, _select(dense), Checkpointed)
        return model

    return SimCase(op, label, shape, source, make, make_batch, loss, prepare, variants)


IMAGE_VARIANTS = [
    Variant("dense"),
    Variant("sbp", 0.5),
    Variant("sbp+recompute", 0.5, recompute=True),
    Variant("sbp+recompute+checkpoint", 0.5, recompute=True, checkpoint_dense=True),
    Variant("checkpoint", checkpoint_sbp=True),
    Variant("checkpoint (all)", checkpoint_all=True),
    Variant("anchor", 0.5, anchor=True),
]


def vit_case(batch=64, depth=12, dim=768, heads=12, img=224, patch=16, classes=1000, use_timm=None):
    """ViT-B/16 by default: timm's vit_base_patch16_224 (the replica without timm); SBP on the last
    two thirds of the blocks (ViT-B: 4-11), the first third left dense."""
    from . import models

    use_timm = models.timm_available() if use_timm is None else use_timm
    first = depth // 3

    def number(name):
        parts = name.split(".")
        return int(parts[1]) if len(parts) == 2 and parts[0] == "blocks" and parts[1].isdigit() else None

    def make():
        return models.vit(depth, dim, heads, img, patch, classes, use_timm=use_timm)

    sizes = {"depth": depth, "dim": dim, "heads": heads, "img": img, "patch": patch}
    label = "ViT-B/16" if sizes == models.VIT_B16 else f"ViT d{dim} x{depth} {img}px/{patch}"
    shape = {"x": [batch, 3, img, img], **sizes, "sbp_blocks": f"{first}-{depth - 1}", "classes": classes}
    grid = (img // patch, img // patch)
    return _image_case(
        "vit", f"{label} B{batch}", shape, models.describe("vit", use_timm, **sizes), make, batch, img, classes,
        lambda n: number(n) is not None and number(n) >= first, lambda n: number(n) is not None and number(n) < first,
        lambda model: {"dim": 1, "layout": grid}, IMAGE_VARIANTS,
    )  # fmt: skip


def convnext_case(batch=64, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), img=224, classes=1000, use_timm=None):
    """ConvNeXt-T by default: timm's convnext_tiny (the replica without timm); SBP on the blocks of
    every stage but the last (ConvNeXt-T: stages 0-2), the last stage's blocks left dense."""
    from . import models

    use_timm = models.timm_available() if use_timm is None else use_timm
    last = len(depths) - 1

    def stage(name):
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "stages" and parts[2] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    def make():
        return models.convnext(depths, dims, classes, use_timm=use_timm)

    sizes = {"depths": tuple(depths), "dims": tuple(dims)}
    label = "ConvNeXt-T" if sizes == models.CONVNEXT_T else f"ConvNeXt {'-'.join(map(str, depths))} {dims[0]}-{dims[-1]}"
    shape = {"x": [batch, 3, img, img], "depths": list(depths), "dims": list(dims), "sbp_blocks": f"stages 0-{last - 1}",
             "classes": classes}  # fmt: skip
    return _image_case(
        "convnext", f"{label} B{batch} {img}px", shape, models.describe("convnext", use_timm, **sizes), make, batch,
        img, classes, lambda n: stage(n) is not None and stage(n) < last,
        lambda n: stage(n) is not None and stage(n) == last, lambda model: {"dim": 2, "layout": None}, IMAGE_VARIANTS,
    )  # fmt: skip


LLAMA_3_2_1B = {
    "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 8192, "vocab_size": 128256, "head_dim": 64, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
}  # fmt: skip

LLAMA_VARIANTS = [
    Variant("dense"),
    Variant("sbp", 0.5),
    Variant("sbp+recompute", 0.5, recompute=True),
    Variant("sbp", 0.125),
    Variant("sbp+recompute", 0.125, recompute=True),
    Variant("checkpoint (all)", checkpoint_all=True),
]


def llm_libraries():
    """None when transformers and peft import, else why not."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers and peft are needed for the llama case ({exc})"
    return None


def llama_case(batch=4, seq=2048, lora_rank=8, **config):
    """A Llama-3.2-1B-shaped transformers LlamaForCausalLM (LLAMA_3_2_1B, overridden by config),
    bf16, LoRA (peft) of rank lora_rank on q_proj and v_proj, causal-LM loss on batch x seq
    tokens (labels = the inputs), use_cache=False as in training. Dense: the same LoRA model
    unconverted (sdpa attention; HF's loss on fp32 logits); SBP: convert of the whole model (its
    loss through linear_cross_entropy); checkpoint: HF's gradient checkpointing of every layer."""
    settings = {**LLAMA_3_2_1B, **config}

    def make():
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**settings)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "v_proj"])
            return get_peft_model(model, lora)

    def make_batch(gen):
        return torch.randint(0, settings["vocab_size"], (batch, seq), generator=gen)

    def loss(model, ids):
        with _eager_masks():
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    def prepare(model, v):
        from ..nn.convert import convert

        if v.keep_ratio is not None:
            convert(model, v.keep_ratio, "grid", backend=BACKEND, recompute=v.recompute)
        if v.checkpoint_all:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    big = settings == LLAMA_3_2_1B
    label = ("Llama-3.2-1B-shaped" if big else f"Llama h{settings['hidden_size']} x{settings['num_hidden_layers']}") + (
        f" B{batch}x{seq} LoRA q,v r{lora_rank}")
    source = (f"transformers LlamaForCausalLM (hidden {settings['hidden_size']}, {settings['num_hidden_layers']} layers, "
              f"{settings['num_attention_heads']} heads, {settings['num_key_value_heads']} kv heads, intermediate "
              f"{settings['intermediate_size']}, vocab {settings['vocab_size']}) + peft LoRA")  # fmt: skip
    shape = {"input_ids": [batch, seq], "lora_rank": lora_rank, "lora_targets": ["q_proj", "v_proj"],
             **{k: settings[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")}}  # fmt: skip
    # peft keeps the adapters' parameters in fp32 beside a bf16 base (its autocast_adapter_dtype).
    case = SimCase("llama", label, shape, source, make, make_batch, loss, prepare, LLAMA_VARIANTS)
    case.dtype = None  # make() sets the dtypes itself
    return case


@contextlib.contextmanager
def _eager_masks():
    """transformers' mask code takes fake tensors for a sign of graph tracing, and then builds a
    4-D causal mask (with packed-sequence terms) that an eager step does not: in an eager training
    step without padding or cache, on positions 0..n-1 in every row, it finds no packed sequences
    and leaves the causal mask to SDPA's is_causal. Inside this context a fake step decides the
    same for those inputs (anything else goes to transformers' own code)."""
    from transformers import masking_utils

    is_fake = torch._subclasses.fake_tensor.is_fake
    find_packed, ignore_mask = masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa

    def find_packed_sequence_indices(position_ids):
        if is_fake(position_ids):  # the step's positions: one sequence per row (see llama_case)
            return None
        return find_packed(position_ids)

    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if (padding_mask is None and is_fake(q_offset) and (q_length == 1 or kv_length == q_length)
                and (local_attention_size is None or kv_length < local_attention_size)):  # fmt: skip
            return True
        return ignore_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    masking_utils._ignore_causal_mask_sdpa = _ignore_causal_mask_sdpa
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa = find_packed, ignore_mask


def sim_cases(quick=False, ops=("vit", "convnext", "llama")):
    """The simulated cases: full GPU shapes, or (quick) small ones for a smoke run."""
    out = []
    if "vit" in ops:
        out.append(vit_case(2, 3, 64, 2, 32, 8, classes=10) if quick else vit_case())
    if "convnext" in ops:
        out.append(convnext_case(2, (1, 1, 1, 1), (16, 32, 64, 128), 32, classes=10) if quick else convnext_case())
    if "llama" in ops:
        if quick:
            out.append(llama_case(2, 64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=1000, head_dim=16))  # fmt: skip
        else:
            out.append(llama_case())
    return out


# --- the targets of the issues (asserted by tests/test_simulate.py) -------------------------------

# (op, variant, keep_ratio, key, limit, what): full shapes only.
TARGETS = (
    ("vit", "sbp", 0.5, "peak_ratio", 0.64, "ViT-B/16 blocks 4-11: sbp peak"),
    ("vit", "sbp+recompute", 0.5, "peak_ratio", 0.45, "ViT-B/16 blocks 4-11: sbp+recompute peak"),
    ("vit", "sbp+recompute+checkpoint", 0.5, "peak_ratio", 0.25, "ViT-B/16: sbp+recompute+checkpoint of blocks 0-3 peak"),
    ("vit", "sbp+recompute+checkpoint", 0.5, "flops_ratio", 1.00, "ViT-B/16: sbp+recompute+checkpoint FLOPs"),
    ("vit", "sbp", 0.5, "flops_ratio", 0.80, "ViT-B/16: sbp FLOPs"),
    ("vit", "sbp+recompute", 0.5, "flops_ratio", 0.90, "ViT-B/16: sbp+recompute FLOPs"),
    ("convnext", "sbp+recompute", 0.5, "peak_ratio", 0.33, "ConvNeXt-T stages 0-2: sbp+recompute peak"),
    ("convnext", "sbp+recompute", 0.5, "flops_ratio", 0.90, "ConvNeXt-T stages 0-2: sbp+recompute FLOPs"),
    ("llama", "sbp", 0.5, "peak_ratio", 0.55, "Llama-3.2-1B-shaped, LoRA q,v: sbp peak activation memory at r=0.5"),
    ("llama", "sbp", 0.125, "peak_ratio", 0.22, "Llama-3.2-1B-shaped, LoRA q,v: sbp peak activation memory at r=0.125"),
)


def verdicts(records):
    """[(what, value, limit, met)] for the targets whose records are there (full shapes)."""
    out = []
    for op, variant, ratio, key, limit, what in TARGETS:
        for r in records:
            if (r["op"], r["variant"], r["keep_ratio"]) == (op, variant, ratio) and not r["quick"]:
                value = r.get(key)
                out.append((what, value, limit, value is not None and value <= limit))
    return out


# --- records for the CLI ----------------------------------------------------------------------


def run_cases(cases, base, say=lambda *a, **k: None, top=12):
    """Runs every variant of every case (fake, full bf16 shapes as the case says): (records,
    failures). A record: base's fields, op, case, variant, keep_ratio, model, shape, dtype, the
    Measurement's fields and their ratios to the case's dense variant, error."""
    records, failures = [], []
    total = sum(len(c.variants) for c in cases)
    done = 0
    for case in cases:
        dense = None
        for v in case.variants:
            done += 1
            what = f"{case.name} {v.name}" + ("" if v.keep_ratio is None else f" r={v.keep_ratio:g}")
            say(f"[{done}/{total}] {what} ...", end="")
            rec = dict(
                base, op=case.op, case=case.label, variant=v.name, kind="simulated",
                backend=BACKEND if v.name.startswith("sbp") else None, keep_ratio=v.keep_ratio, model=case.source,
                shape=case.shape, dtype="bfloat16", peak_bytes=None, held_bytes=None, saved_bytes=None, flops=None,
                seconds=None, breakdown=None, error=None,
            )  # fmt: skip
            try:
                m = run_variant(case, v)
                rec.update(peak_bytes=m.peak_bytes, held_bytes=m.held_bytes, saved_bytes=m.saved_bytes, flops=m.flops,
                           seconds=round(m.seconds, 2), breakdown=[[w, b] for w, b in m.breakdown[:top]])  # fmt: skip
                if v.name == "dense":
                    dense = rec
                say(f" peak {m.peak_bytes / 2**30:.3f} GiB, {m.flops / 1e12:.3f} TFLOP ({m.seconds:.1f} s)")
            except Exception as exc:  # noqa: BLE001  (report, go on with the other variants)
                rec["error"] = f"{type(exc).__name__}: {exc}"
                failures.append(f"{what}: {rec['error']}")
                say(f" ERROR {rec['error']}")
            for key in ("peak", "held", "saved", "flops"):
                value_key = "flops" if key == "flops" else f"{key}_bytes"
                a, b = rec[value_key], (dense or {}).get(value_key)
                rec[f"{key}_ratio"] = a / b if a is not None and b else None
            records.append(rec)
    return records, failures
