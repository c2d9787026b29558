"""A converted model under FSDP2 (torch.distributed.fsdp.fully_shard): 2 CPU processes, gloo.

A tiny Hugging Face LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 1000) with
PEFT LoRA on q_proj / v_proj (rank 8), converted by sbp_kernels.convert (in the plain SBP mode, then
again in the recompute mode), then sharded: each decoder layer is an FSDP unit of its own, the root
holds the embeddings, the final norm and the head. Between steps every parameter, frozen or not, is
a DTensor shard; the LoRA weights are the only trainable ones. Each rank trains on its half of a
batch of 4 sequences; a single-process copy of the same converted model (no FSDP) trains on the
whole batch alongside, in the same process.

The keep sets are fixed (sbp_kernels.step(keep_idx=...)): one per step, the same on both ranks and
in the reference, so both compute the same SBP gradient estimate. Why the gradients are then
comparable as they are: the causal-LM loss is the mean over the counted tokens (labels shifted
left; no padding here, so each half counts 2 x (N - 1) tokens and the whole batch twice that).
The whole batch's mean is thus the mean of the two halves' means, and its gradient the mean of the
two halves' gradients. SBP does not change that: the keep set is per position and shared by all
sequences, and the gradient scale (grad_scale) is a constant, so each sequence contributes the same
gradient whichever batch it is in. FSDP2's reduce-scatter averages the ranks' gradients (it
divides the sum by the world size): the mean of the halves' gradients, which is the reference's
gradient. (With padding the halves would count different numbers of tokens; each rank would then sum
its tokens' losses, divide by the whole batch's count and multiply by the world size, which the
averaging divides out again. Making the reduce-scatter sum instead, with
set_reduce_scatter_divide_factor(1.0), needs ReduceOp.PREMUL_SUM, which gloo does not have.)

Checked at every step: the mean of the ranks' losses is the reference's loss; the LoRA gradients,
gathered whole (DTensor.full_tensor()), equal the reference's; no frozen weight gets a gradient.
Then one SGD step on the shards and one on the reference (plain SGD: the fp rounding differences
between the two sides stay as small as they are, where Adam's first steps would amplify them).
After the steps every parameter is still equal to the reference's, and the loss has fallen. At
the first step the reference's gradient also differs from the one that keeps every position, so
the keep set was in effect.

Teardown. A gloo worker thread drops its reference to a finished collective, and with it the
collective's tensors, a moment after the rank's main thread has seen the collective complete;
that release takes the GIL, and once the main thread has returned and the interpreter finalizes,
CPython ends a thread that asks for the GIL: an unwind through a noexcept destructor, so the
process aborts (SIGABRT, "terminate called without an active exception"). Destroying the group
joins its threads first, but only if nothing else still holds the group. So each rank trains in a
function of its own (the FSDP modules, the DTensors and the optimizers, which hold the group, die
with its frame), imports torch.distributed.nn before the group exists (its functions bind
`group=group.WORLD` as default arguments when imported), collects, meets the other rank at a
barrier, destroys the group and checks that no gloo thread is left. FSDP2 adds one holder: the
DeviceMesh keeps its ProcessGroup objects in `_pg_registry` (read under torch.compile only; the
eager path resolves groups by name), and the mesh outlives the model in DTensor's global caches
(sharding propagation, redistribute plans); `_release` empties that registry. The rendezvous is a
file store in the test's tmp_path (no TCP port picked free in advance and bound later), and the
parent's deadline outlasts the gloo timeout, so a stuck collective is reported by the worker's
own exception.
"""
import gc
import traceback

import pytest
import torch
import torch.distributed as dist

import sbp_kernels
from conftest import require
from distributed import GLOO_TIMEOUT_S, destroy_and_check, init_gloo, spawn

transformers = require("transformers")
peft = require("peft")

WORLD = 2
ROWS = 2  # sequences per rank
N = 32  # tokens per sequence
VOCAB = 1000
STEPS = 4
LR = 1.0
LORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"  # [8, 64]
# The parent outlasts the gloo timeout (plus start-up, the imports and teardown), so a stuck
# collective is reported by the worker's own exception rather than by the parent killing it.
DEADLINE_S = GLOO_TIMEOUT_S + 90


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public since torch 2.6)
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(dist.is_available() and not _has_fully_shard(),
                       reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6"),
]


def _build(recompute):
    """The converted tiny Llama with LoRA, the same on every call (seeded)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=128,
    )
    # init_lora_weights=False: lora_B random too, so every adapter weight gets a gradient at once.
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    sbp_kernels.convert(model, keep_ratio=0.5, recompute=recompute)
    return model.train()


def _loss(model, ids, keep_idx):
    with sbp_kernels.step(keep_idx=keep_idx):
        return model(input_ids=ids, labels=ids).loss


def _trainable(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _close(actual, expected, what):
    # fp32; the two sides sum over the batch and over the ranks in different orders.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _train_and_check(rank, mesh, recompute):
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from sbp_kernels.nn.recompute import SBPRecompute

    mode = "recompute mode" if recompute else "SBP mode"
    reference, model = _build(recompute), _build(recompute)
    layers = model.base_model.model.model.layers
    assert all(isinstance(layer, SBPRecompute) == recompute for layer in layers), mode
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in layers)
    params = dict(model.named_parameters())
    assert params.keys() == dict(reference.named_parameters()).keys()  # fully_shard keeps the names
    assert all(isinstance(p, DTensor) for p in params.values())
    assert params[LORA].shape == (8, 64) and params[LORA].to_local().shape == (8 // WORLD, 64)  # dim 0 sharded
    trainable = _trainable(model)
    assert trainable.keys() == _trainable(reference).keys() and all("lora_" in k for k in trainable)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (WORLD * ROWS, N), generator=g)  # the same batch on every rank
    mine = ids[rank * ROWS:(rank + 1) * ROWS]
    opt = torch.optim.SGD(trainable.values(), lr=LR)
    ref_opt = torch.optim.SGD(_trainable(reference).values(), lr=LR)
    losses = []
    for step in range(STEPS):
        at = f"{mode}, step {step}"
        keep_idx = torch.randperm(N, generator=g)[: N // 2].sort().values  # the same on every rank
        loss = _loss(model, mine, keep_idx)
        loss.backward()
        ref_loss = _loss(reference, ids, keep_idx)
        ref_loss.backward()

        both = loss.detach().clone()
        dist.all_reduce(both)
        _close(both / WORLD, ref_loss.detach(), f"{at}: loss")
        losses.append(both.item() / WORLD)
        for name, p in model.named_parameters():  # the same order on every rank (full_tensor gathers)
            if not p.requires_grad:
                assert p.grad is None, f"{at}: the frozen {name} got a gradient"
                continue
            assert isinstance(p.grad, DTensor), (at, name, type(p.grad))
            _close(p.grad.full_tensor(), reference.get_parameter(name).grad, f"{at}: gradient of {name}")
        if step == 0:
            sbp = {k: p.grad.clone() for k, p in _trainable(reference).items()}
            reference.zero_grad()
            _loss(reference, ids, torch.arange(N)).backward()  # every position kept
            changed = [k for k, p in _trainable(reference).items() if not torch.allclose(p.grad, sbp[k], rtol=1e-2)]
            assert changed, f"{at}: the gradient at r = 0.5 equals the one at r = 1"
            for k, p in _trainable(reference).items():
                p.grad = sbp[k]
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p in model.named_parameters():
        _close(p.full_tensor(), reference.get_parameter(name).detach(), f"{mode}: {name} after {STEPS} steps")
    # The forward is exact and the data fixed, so the loss moves only by the updates: about
    # 6.908 -> 6.873 here (LoRA of rank 8 on q and v of a random model learns slowly).
    assert losses[-1] < losses[0] - 0.01, (mode, losses)


def _release(mesh):
    """Drops this process's references to the group but the process group registry's own (see
    the module docstring): the mesh's registry of groups, and whatever sits in reference cycles."""
    registry = getattr(mesh, "_pg_registry", None)  # newer torch; older meshes hold group names only
    if registry is not None:
        registry.clear()
    gc.collect()  # FSDP and autograd state can sit in reference cycles


def _worker(rank, init_file):
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(rank, WORLD, init_file)
    mesh = None
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for recompute in (False, True):
            _train_and_check(rank, mesh, recompute)
    except BaseException as exc:
        # The traceback holds _train_and_check's frame and so the FSDP model, which holds the
        # group: clear it so that destroy_process_group really ends the group. No barrier here,
        # the other rank may be anywhere; closing the group fails its pending collective at once.
        traceback.clear_frames(exc.__traceback__)
        _release(mesh)
        dist.destroy_process_group()
        raise
    _release(mesh)
    destroy_and_check()


def test_fsdp2_lora_llama_gradients_equal_single_process_and_loss_falls(tmp_path):
    spawn(_worker, tmp_path, WORLD, DEADLINE_S, "FSDP")
