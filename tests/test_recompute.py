"""The recompute mode (DESIGN.md 4): on every converted block type, the gradients equal the plain
SBP mode's for the same keep set (fp32 within 1e-5 relative), the forward is unchanged, a block
saves only its kept input rows and attention outputs, and it composes with torch.utils.checkpoint
and torch.compile."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import require

import sbp_kernels
from sbp_kernels import replay
from sbp_kernels.bench.simulate import LiveBytes, rounded
from sbp_kernels.memory import saved_bytes
from sbp_kernels.nn.recompute import SBPRecompute
from sbp_kernels.ops import attention

timm = require("timm")
transformers = require("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm(arch, img, **kwargs):
    model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs)
    x = torch.randn(2, 3, img, img)
    return model, lambda m: m(x).square().sum()


def _encoder(norm_first, batch_first, dropout=0.1):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout, norm_first=norm_first, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 9, 32) if batch_first else torch.randn(9, 2, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -2:] = True
    return model, lambda m: m(x, src_key_padding_mask=padding).square().sum()


def _causal_lm(config_cls, model_cls, **kwargs):
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=1000, **kwargs)
    ids = torch.randint(0, 1000, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, :5] = 0
    return model_cls(config), lambda m: m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def _gpt2():
    ids = torch.randint(0, 1000, (2, 16))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def _bert():
    ids = torch.randint(0, 1000, (2, 16))
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=1000)
    return transformers.BertForSequenceClassification(config), lambda m: m(input_ids=ids, labels=torch.tensor([0, 1])).loss


def _hf_vit():
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    return transformers.ViTForImageClassification(config), lambda m: m(pixel_values=x, labels=torch.tensor([0, 1])).loss


CASES = {
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, drop_path_rate=0.1,
                              drop_rate=0.1, attn_drop_rate=0.1),
    "timm_eva02": lambda: _timm("eva02_tiny_patch14_224", 28, img_size=28, depth=2, drop_path_rate=0.1),
    "timm_beit": lambda: _timm("beit_base_patch16_224", 32, img_size=32, patch_size=8, depth=2, embed_dim=64,
                               num_heads=2, drop_path_rate=0.1),
    "timm_convnext": lambda: _timm("convnext_tiny", 64, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                                   drop_path_rate=0.1),
    "encoder_pre_norm": lambda: _encoder(True, False),
    "encoder_post_norm": lambda: _encoder(False, True),
    "encoder_without_dropout": lambda: _encoder(True, True, dropout=0.0),  # key padding on the fused backward
    "llama": lambda: _causal_lm(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral_window": lambda: _causal_lm(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=8),
    "gpt2": _gpt2,
    "bert": _bert,
    "hf_vit": _hf_vit,
}


def _step(model, loss_fn, seed):
    """Loss, gradients and saved bytes (parameters excluded) of one step with fixed seeds."""
    sbp_kernels.manual_seed(seed)
    torch.manual_seed(seed + 1)
    model.zero_grad(set_to_none=True)
    with saved_bytes() as saved:
        loss = loss_fn(model)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved.bytes_excluding(list(model.parameters()))


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_equals_sbp_gradients_and_saves_less(case):
    torch.manual_seed(0)
    model, loss_fn = CASES[case]()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays dense says so (tested elsewhere)
        plain = sbp_kernels.convert(copy.deepcopy(model), keep_ratio=0.5)
        recompute = sbp_kernels.convert(copy.deepcopy(model), keep_ratio=0.5, recompute=True)
    blocks = [m for m in recompute.modules() if isinstance(m, SBPRecompute) and m.recompute_spec is not None]
    assert len(blocks) >= 2
    calls = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, out: calls.append(m))
    loss_a, grads_a, saved_a = _step(plain, loss_fn, 3)
    loss_b, grads_b, saved_b = _step(recompute, loss_fn, 3)
    assert set(calls) == set(blocks)  # every recompute-mode block ran as one
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp_min(1e-30)
        assert (grads_b[name] - grads_a[name]).abs().max() <= 1e-5 * scale, name
    assert saved_b < 0.75 * saved_a, (saved_b, saved_a)


def test_a_vit_block_saves_its_kept_input_rows_and_attention_output_only():
    """Exact bytes: x_K and o_K (fp32, [B, n_keep, C] each), lse_K ([B, h, n_keep] fp32), keep_idx
    (and the attention's empty dropout-mask placeholder)."""
    block = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).blocks[0]
    sbp_kernels.convert(block, keep_ratio=0.5, recompute=True)
    x = torch.randn(2, 197, 192, requires_grad=True)
    keep = sbp_kernels.sample_keep_indices((197,), 0.5)
    with sbp_kernels.step(keep_idx=keep):
        with saved_bytes() as saved:
            out = block(x)
    k = keep.numel()
    expected = 2 * (2 * k * 192 * 4) + 2 * 3 * k * 4 + k * 8  # x_K, o_K; lse_K; keep_idx
    assert saved.bytes_excluding([x] + list(block.parameters())) == expected
    out.sum().backward()


def test_the_replayed_attention_backward_allocates_only_its_bf16_gradients():
    """The replay's kept-token backward is the op's fused one (PyTorch's CPU flash backward on the
    torch backend): for bf16 q, k, v it allocates dq, dk, dv in bf16 and the index of the compact
    rows, nothing else (no float32 copy, no score block); its gradients are the plain op's at the
    kept tokens (causal, grouped-query)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 12, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 12, 16, dtype=torch.bfloat16) for _ in range(2))
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention.apply(*plain, keep, causal=True, backend="torch")
    dout = torch.randn_like(out)
    out.backward(dout)
    record = replay.Record(keep, 12)
    with torch.no_grad(), replay.recording(record):
        attention.apply(q, k, v, keep, causal=True, backend="torch")
    kept = [t.index_select(2, keep).requires_grad_() for t in (q, k, v)]
    with replay.replaying(record):
        out_kept = attention.apply(*kept, torch.arange(6), causal=True, backend="torch")
    dout_kept = dout.index_select(2, keep)
    with LiveBytes() as live:
        grads = torch.autograd.grad(out_kept, kept, dout_kept)
    assert live.peak == sum(rounded(g.nbytes) for g in grads) + rounded(keep.nbytes)
    for grad, t in zip(grads, plain):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, t.grad.index_select(2, keep))


def test_recompute_composes_with_checkpointing_the_dense_blocks():
    torch.manual_seed(0)
    model, loss_fn = CASES["timm_vit"]()
    model.set_grad_checkpointing(True)
    first = lambda name, m: name == "blocks.1"  # noqa: E731
    plain = sbp_kernels.convert(copy.deepcopy(model), keep_ratio=0.5, layers=first)
    recompute = sbp_kernels.convert(copy.deepcopy(model), keep_ratio=0.5, layers=first, recompute=True)
    _, grads_a, _ = _step(plain, loss_fn, 5)
    _, grads_b, _ = _step(recompute, loss_fn, 5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_recompute_under_compile_with_fixed_keep_sets_equals_eager():
    """torch.compile runs around the recompute node (its records live in Python: a graph break)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    sbp_kernels.convert(model, keep_ratio=0.5, recompute=True)
    x = torch.randn(2, 3, 32, 32)
    keep = sbp_kernels.sample_keep_indices((16,), 0.5)
    fixed = {17: torch.cat([torch.tensor([0]), keep + 1])}
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        with sbp_kernels.step(keep_idx=fixed):
            F.cross_entropy(fn(x), torch.tensor([0, 1])).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_converting_again_without_recompute_turns_it_off():
    model, loss_fn = CASES["timm_vit"]()
    sbp_kernels.convert(model, recompute=True)
    sbp_kernels.convert(model)
    assert all(m.recompute_spec is None for m in model.modules() if isinstance(m, SBPRecompute))
    with pytest.raises(TypeError, match="recompute"):
        sbp_kernels.convert(model, recompute="yes")
