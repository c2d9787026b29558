"""What the Hugging Face transformers adapters share.

- The "sbp" attention implementation: registered with transformers' AttentionInterface (the seam
  through which flash / flex / sdpa plug in) and AttentionMaskInterface (masks in the form flash
  attention takes: None, or the 2-D padding mask [B, n]), and selected on a converted model with
  `set_attn_implementation("sbp")`. For an attention module that convert swapped into
  SBPHFAttention, while training with grad, it runs sbp_kernels.attention on the step's keep set:
  causal masking (or not: BERT, ViT), left / right padding, grouped-query heads (no repeated k / v),
  the module's scaling, attention dropout (the dense math path's mask for the same seed), a
  sliding window as an additive mask once the sequence is longer than the window. Everything else
  (eval, no_grad, modules left dense, a KV cache with fewer queries than keys, soft-capping) runs
  PyTorch's scaled dot-product attention with the equivalent 4-D mask.
- SBPCausalLM: a *ForCausalLM whose training loss with labels runs sbp_kernels.linear_cross_entropy
  on the final hidden states (the logits never exist whole; the loss is exact over all tokens, as
  the model's own loss function computes it: labels shifted, ignore_index -100, mean or
  num_items_in_batch); `logits` is None in that case. Every other call is the model's own forward.
- convert_decoder_layer: a pre-norm decoder layer (input_layernorm, self_attn with q / k / v / o
  projections and optional q / k norms, post_attention_layernorm, a gated mlp).
"""
import inspect

import torch
import torch.nn.functional as F

from .. import replay
from ..nn.base import SBPModule
from ..nn.linear import SBPLinear, plain_linear
from ..nn.recompute import RecomputeSpec, rows
from ..ops import attention as attention_op
from ..ops import cross_entropy as cross_entropy_op
from ..ops._common import autocast_inputs, scale_grad
from .common import convert_gated_mlp, convert_linear, convert_norm, convert_positionwise

IMPLEMENTATION = "sbp"
_registered = []


def register():
    """Registers the "sbp" attention and mask implementations with transformers (once)."""
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, sbp_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask_of(flash_attention_mask))
    _registered.append(True)


def _mask_of(flash_attention_mask):
    def sbp_attention_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
        """Flash attention's mask form: None, or the 2-D padding mask [B, kv_length]. Under
        torch.compile the 2-D mask is passed on as it is: flash attention's test that drops an
        all-real mask reads the mask's values (a graph break); an all-True padding mask computes
        the same attention."""
        if torch.compiler.is_compiling():
            return None if attention_mask is None else attention_mask[:, -kv_length:]
        return flash_attention_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)

    return sbp_attention_mask


def use_sbp_attention(model):
    """Selects the "sbp" attention implementation on a Hugging Face model (its config and its
    submodels'); remembers the one it had (restore_attention)."""
    register()
    model.__dict__.setdefault("_sbp_attn_implementation", model.config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)


class SBPHFAttention(SBPModule):
    """A converted Hugging Face attention module: its own forward, whose attention call the "sbp"
    implementation runs on kept tokens (the module holds the settings); grad_scale multiplies the
    gradient of its output, once (its projections take none)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not self._sbp_active():
            return out
        return (scale_grad(out[0], self.grad_scale), *out[1:]) if isinstance(out, tuple) else scale_grad(
            out, self.grad_scale
        )


def sbp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: q [B, h, q_len, d], k / v [B, h_kv, kv_len, d],
    attention_mask the 2-D padding mask (True = a real token) or None. Returns ([B, q_len, h, d], None)."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = kwargs.get("sliding_window")
    n = query.shape[2]
    sbp = (
        isinstance(module, SBPModule) and module._sbp_active() and key.shape[2] == n and kwargs.get("softcap") is None
        and (attention_mask is None or attention_mask.dim() == 2)
    )
    if not sbp:
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, causal, window, kwargs)
    padding = None if attention_mask is None else attention_mask[:, -n:].bool()
    bias = _window_bias(n, window, query) if window is not None and n > window else None
    query, key, value = autocast_inputs(query, key, value)
    keep_idx = module._keep_idx(n, query.device)
    out = attention_op.apply(
        query, key, value, keep_idx, causal, scaling, "qkv", 1.0, padding, bias, float(dropout), module.backend
    )
    return out.transpose(1, 2), None


def _window_bias(n, window, like):
    """Additive mask of a sliding window: key j is masked for query i when i - j >= window (in the
    original positions, also when a recompute-mode layer replays its kept rows)."""
    pos = replay.positions(n, like.device)
    far = (pos[:, None] - pos[None, :]) >= window
    return torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill(far, float("-inf"))


def _dense_attention(module, query, key, value, attention_mask, dropout, scaling, causal, window, kwargs):
    """PyTorch's scaled dot-product attention with the 4-D mask equivalent to the 2-D one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None or window is not None or (causal and q_len != kv_len):
        qpos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        kpos = torch.arange(kv_len, device=query.device)[None, :]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        if causal:
            allowed = allowed & (kpos <= qpos)
        if window is not None:
            allowed = allowed & (qpos - kpos < window)
        mask = allowed[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -kv_len:].bool()
    rest = {k: v for k, v in kwargs.items() if k not in ("sliding_window", "is_causal")}
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and mask is None, **rest)


def convert_attention_module(attn, name, converter, norm_positions=1):
    """A Hugging Face attention module: the marker swap (the "sbp" implementation does the
    attention), its projections (plain Linear, Conv1D or LoRA layers, with no grad_scale of their
    own: the module's output takes it) and q / k norms."""
    converter.swap(attn, SBPHFAttention)
    inner = converter.inner()
    for child_name, child in attn.named_children():
        if child_name in ("q_norm", "k_norm"):
            convert_norm(child, f"{name}.{child_name}", inner, norm_positions)
        elif child_name in ("attn_dropout",):  # dropout on the probabilities: the op's own
            continue
        elif plain_linear(child) and not isinstance(child, torch.nn.Linear):
            # Hugging Face's Conv1D (GPT-2's c_attn / c_proj): no adapter claims it on its own
            convert_linear(child, f"{name}.{child_name}", inner)
        else:
            inner.visit(child, f"{name}.{child_name}", True)


def _no_cache(value, keep_idx, n):
    """The replay of a layer must not append its keys and values to the KV cache again."""
    return None


# A Hugging Face layer's arguments that carry positions: cut to the kept rows when it recomputes.
TOKEN_ARGS = {
    "attention_mask": rows(-2, -1), "position_ids": rows(-1), "position_embeddings": rows(-2),
    "cache_position": rows(-1), "cache": _no_cache, "past_key_values": _no_cache, "past_key_value": _no_cache,
}
SPEC = RecomputeSpec(token_args=TOKEN_ARGS)
POST_NORM_SPEC = RecomputeSpec(token_args=TOKEN_ARGS, residual=False)


def convert_decoder_layer(m, name, converter):
    """A pre-norm decoder layer of the Llama family (Llama, Qwen2, Qwen3, Mistral, Gemma)."""
    for slot in ("input_layernorm", "post_attention_layernorm"):
        convert_norm(getattr(m, slot), f"{name}.{slot}", converter)
    convert_attention_module(m.self_attn, f"{name}.self_attn", converter)
    if not convert_gated_mlp(m.mlp, f"{name}.mlp", converter, ("gate_proj", "up_proj", "down_proj", "act_fn")):
        convert_positionwise(m.mlp, f"{name}.mlp", converter)
    converter.recompute_block(m, SPEC)


def convert_model(m, name, converter, final_norm="norm"):
    """A Hugging Face model root of a family (its *Model, *ForCausalLM, *ForSequenceClassification,
    ...): the fused head and loss of a causal LM, the final norm (it feeds the head, which reads the
    kept rows or an always-kept token), then the layers (their own adapter)."""
    if _causal_lm(m):
        converter.swap(m, SBPCausalLM)
    base = getattr(m, m.base_model_prefix, m)
    norm = getattr(base, final_norm, None) if final_norm else None
    if norm is not None:
        convert_norm(norm, f"{name}.{final_norm}" if base is m else f"{name}.{m.base_model_prefix}.{final_norm}",
                     converter)
    converter.visit_children(m, name)


def finish(root):
    """After convert: a model with converted Hugging Face attention modules selects "sbp"."""
    if hasattr(root, "set_attn_implementation") and any(isinstance(m, SBPHFAttention) for m in root.modules()):
        use_sbp_attention(root)


def _causal_lm(m):
    return type(m).__name__.endswith("ForCausalLM") or type(m).__name__.endswith("LMHeadModel")


class SBPCausalLM(SBPModule):
    """A *ForCausalLM whose training loss runs sbp_kernels.linear_cross_entropy (module docstring)."""

    def forward(self, *args, **kwargs):
        forward = super().forward
        arguments = _by_name(forward, args, kwargs)
        labels = arguments.pop("labels", None)
        if (labels is None or not self._sbp_active() or getattr(self.config, "final_logit_softcapping", None)
                or not _plain_head(self.get_output_embeddings())):
            return forward(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        arguments.pop("return_dict", None)
        outputs = getattr(self, self.base_model_prefix)(**arguments, return_dict=True)
        loss = causal_lm_loss(self, outputs.last_hidden_state, labels, arguments)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        rest = {k: outputs.get(k) for k in CausalLMOutputWithPast.__dataclass_fields__ if k not in ("loss", "logits")}
        return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def _by_name(forward, args, kwargs):
    """A call's arguments by name, the **kwargs of forward flattened in. Keyword calls (the usual
    ones) need no inspect.signature, which torch.compile cannot trace."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(forward)
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            arguments.update(arguments.pop(p.name, {}))
    return arguments


def _plain_head(head):
    """Whether the output embeddings compute hidden @ weight.T + bias and nothing else (the fused
    op reads only the weight and bias): not a LoRA or other wrapper with a forward of its own."""
    return isinstance(head, torch.nn.Linear) and type(head).forward in (torch.nn.Linear.forward, SBPLinear.forward)


def causal_lm_loss(model, hidden, labels, kwargs):
    """The model's causal-LM loss (labels shifted left, -100 ignored, mean over the counted tokens
    or sum / num_items_in_batch), through the fused head + loss op on the step's keep set."""
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    head = model.get_output_embeddings()
    num_items = kwargs.get("num_items_in_batch")
    keep_idx = model._keep_idx(hidden.shape[-2], hidden.device)
    h, weight, bias = autocast_inputs(hidden, head.weight, head.bias)
    loss = cross_entropy_op.apply(
        h, weight, shift_labels.to(h.device), keep_idx, bias, -100, "mean" if num_items is None else "sum",
        model.grad_scale, model.backend,
    )
    return loss if num_items is None else loss / num_items


def last_token_positions(model, args, kwargs):
    """Positions read by a sequence classifier: each sample's last token that is not padding (as
    the Hugging Face heads pool), or the last position without input_ids."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    pad = getattr(model.config, "pad_token_id", None)
    if input_ids is None or pad is None:
        return (-1,)
    non_pad = (input_ids != pad).int()
    last = (torch.arange(input_ids.shape[-1], device=input_ids.device) * non_pad).argmax(-1)
    return tuple(sorted(set(last.tolist())))


class ModelFamily:
    """What every Hugging Face family's adapter shares: it matches its layer classes (qualified
    names) and the model roots of its modeling module (*Model, *ForCausalLM, ... : the classes with
    a base_model_prefix), and finishes a converted root the same way."""

    def __init__(self, name, module, layers):
        self.name = name
        self.module = module  # e.g. "transformers.models.llama.modeling_llama"
        self.layers = layers

    def _root(self, m):
        cls = m.__dict__.get("_sbp_restore_class", type(m))  # its own class, also once swapped
        return cls.__module__ == self.module and hasattr(cls, "base_model_prefix")

    def matches(self, m):
        from .common import is_class

        return is_class(m, *self.layers) or self._root(m)

    def finish(self, root):
        finish(root)


class DecoderFamily(ModelFamily):
    """The adapter of a Llama-like decoder family: its decoder layer class, its model roots."""

    def __init__(self, name, module, layer):
        super().__init__(name, module, (f"{module}.{layer}",))

    def convert(self, m, name, converter):
        from .common import is_class

        if is_class(m, *self.layers):
            convert_decoder_layer(m, name, converter)
        else:
            convert_model(m, name, converter)

    def root_options(self, root, args, kwargs):
        if not self._root(root):
            return None
        if args is None or not type(root).__name__.endswith("ForSequenceClassification"):
            return {}
        return {"always_keep": last_token_positions(root, args, kwargs)}
