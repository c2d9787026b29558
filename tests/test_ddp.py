"""A converted model under DistributedDataParallel: 2 CPU processes, gloo, on loopback.

Each rank draws its own keep sets from its own RNG (seeded differently here, so the ranks
back-propagate through different positions); DDP averages the SBP gradients as usual, so after
backward every rank holds the same gradients and the model trains.

Teardown, and why it is done this way. A gloo worker thread drops its reference to a finished
collective, and with it the collective's tensors, a moment *after* the rank's main thread has
seen the collective complete; releasing a tensor that has a Python object takes the GIL. Once
the main thread has returned from the worker function and finalizes the interpreter, CPython
ends any thread that asks for the GIL (pthread_exit); that unwind crosses the noexcept
destructor of the gloo work object, so the process aborts with "terminate called without an
active exception" (SIGABRT, torch.multiprocessing.spawn's ProcessExitedException). That was
this test's flakiness: the last all_gather's release racing the exit, lost now and then.

Destroying the group joins its threads first, which ends the race, but only if nothing else
still holds the group. Two things did: the DDP wrapper (so each rank drops it, the model and
the tensors with _train_and_check's frame, collects cycles, meets the other rank at a barrier,
then destroys the group), and torch.distributed.nn.functional, whose functions take
`group=group.WORLD` as a default argument, bound when the module is imported. DDP's first
construction imports it (through torch._dynamo), so it is imported here before the group
exists. After destroy_process_group each rank checks that the group's threads are gone.
"""
import gc
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels import keepset
from sbp_kernels.nn import SBPTransformerEncoderLayer
from distributed import GLOO_TIMEOUT_S, destroy_and_check, init_gloo, spawn

WORLD = 2
STEPS = 30
# The parent outlasts the gloo timeout (plus start-up and teardown), so a stuck collective is
# reported by the worker's own exception rather than by the parent killing it.
DEADLINE_S = GLOO_TIMEOUT_S + 60

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def _train_and_check(rank):
    torch.manual_seed(0)  # the same initial weights (DDP broadcasts rank 0's anyway)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, norm_first=True, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 8))
    sbp_kernels.convert(model, keep_ratio=0.5, strategy="random")
    assert isinstance(model[0].layers[1], SBPTransformerEncoderLayer)
    ddp = nn.parallel.DistributedDataParallel(model)

    torch.manual_seed(100 + rank)  # per-rank data and keep sets
    x, target = torch.randn(4, 16, 32), torch.randn(4, 16, 8)
    seen = []
    model[0].layers[0].register_forward_pre_hook(lambda m, args: seen.append(keepset.current()))
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    losses = []
    for step in range(STEPS):
        loss = F.mse_loss(ddp(x), target)
        opt.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        first, second = _gather(grads)
        assert torch.equal(first, second), f"step {step}: gradients differ across ranks"
        opt.step()
        losses.append(loss.detach())
    # The root's step was open in every forward; the ranks kept different positions.
    keeps = [s.get(16, "cpu", 0.5, "random") for s in seen[:3]]
    gathered = [_gather(k) for k in keeps]
    assert any(not torch.equal(a, b) for a, b in gathered), "both ranks drew the same keep sets"
    first = torch.stack(_gather(losses[0])).mean()
    last = torch.stack(_gather(torch.stack(losses[-5:]).mean())).mean()
    assert last < 0.7 * first, (first.item(), last.item())


def _worker(rank, init_file):
    init_gloo(rank, WORLD, init_file)
    try:
        _train_and_check(rank)
    except BaseException as exc:
        # The traceback holds _train_and_check's frame and so the DDP wrapper, which holds the
        # group: clear it so that destroy_process_group really ends the group. No barrier here,
        # the other rank may be anywhere; closing the group fails its pending collective at once.
        traceback.clear_frames(exc.__traceback__)
        gc.collect()
        dist.destroy_process_group()
        raise
    gc.collect()  # DDP and autograd state can sit in reference cycles
    destroy_and_check()


def test_ddp_two_ranks_same_gradients_and_loss_falls(tmp_path):
    spawn(_worker, tmp_path, WORLD, DEADLINE_S, "DDP")
