"""A converted model under DistributedDataParallel: 2 CPU processes, gloo, on 127.0.0.1.

Each rank draws its own keep sets from its own RNG (seeded differently here, so the ranks
back-propagate through different positions); DDP averages the SBP gradients as usual, so after
backward every rank holds the same gradients and the model trains.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels import keepset
from sbp_kernels.nn import SBPTransformerEncoderLayer

WORLD = 2
STEPS = 30
TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def _worker(rank, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
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
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_same_gradients_and_loss_falls():
    ctx = mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises with the worker's traceback if a worker fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP workers did not finish in {TIMEOUT_S} s")
