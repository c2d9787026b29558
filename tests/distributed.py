"""What the multi-process tests (test_ddp.py, test_fsdp.py) share: gloo workers spawned with a
file-store rendezvous under a deadline, the group's set-up, and its teardown with the check that
no gloo thread outlived it (the test modules' docstrings say why each step is there)."""
import datetime
import importlib
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 30  # a collective (or the rendezvous) that waits longer fails with gloo's error


def spawn(worker, tmp_path, world, deadline_s, what):
    """Runs worker(rank, init_file) on `world` spawned processes; fails the test, naming `what`,
    if they are not done within deadline_s (longer than the gloo timeout, so that a stuck
    collective is reported by the worker's own exception). The rendezvous is a file in the test's
    own fresh directory rather than a TCP port that the parent finds free and rank 0 binds later
    (another process may take it in between): gloo's sockets listen on ports the kernel assigns."""
    init_file = tmp_path / "rendezvous"
    ctx = mp.start_processes(worker, args=(str(init_file),), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):  # raises with the worker's traceback if a worker fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            for p in ctx.processes:
                p.join()
            pytest.fail(f"the {what} workers did not finish in {deadline_s} s")


def init_gloo(rank, world, init_file):
    """One thread, loopback, and torch.distributed.nn imported before the group exists: imported
    under a live group, its `group=group.WORLD` defaults would keep the group, and its gloo
    threads, alive past destroy_process_group into the interpreter's exit."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    importlib.import_module("torch.distributed.nn")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )


def destroy_and_check():
    """After a successful run (its holders of the group released): meet the other ranks, destroy
    the group and check that its threads were joined (they are only if nothing else held it)."""
    dist.barrier()
    dist.destroy_process_group()
    left = gloo_threads()
    assert not left, f"the gloo group outlived destroy_process_group (threads {left} still run)"


def gloo_threads():
    """Names of this process's gloo threads (from /proc on Linux; elsewhere, none are seen)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]
