"""Timing and memory helpers of the benchmark CLI and the pytest-benchmark files.

- GPU time: CUDA events around each call, the L2 cache flushed before each (as
  triton.testing.do_bench does), median over the repeats after warm-up calls.
- CPU time: time.perf_counter around each call, median over the repeats after warm-up calls.
- Saved bytes: sbp_kernels.memory.saved_bytes around the forward (device independent). Storages
  of the parameters are reported apart: they live whether or not autograd saves them, so the
  activation bytes are what SBP shrinks.
- Peak GPU memory: torch.cuda.max_memory_allocated over one forward + backward, above what was
  allocated before it started (inputs, parameters and the incoming gradient).
"""
import statistics
import time

import torch

from ..memory import saved_bytes

_l2_flush = {}


def median_ms(fn, device, repeats, warmup):
    """Median wall time of fn() in milliseconds."""
    if device.type == "cuda":
        return _median_ms_cuda(fn, device, repeats, warmup)
    return statistics.median(cpu_times(fn, repeats, warmup)) * 1e3


def cpu_times(fn, repeats, warmup=0):
    """Wall times in seconds of `repeats` calls of fn(), each timed alone, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_ms_cuda(fn, device, repeats, warmup):
    key = str(device)
    if key not in _l2_flush:  # larger than the L2 of any current GPU (H100: 50 MB)
        _l2_flush[key] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    cache = _l2_flush[key]
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        cache.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def saved(forward, params):
    """(activation bytes, bytes including parameters) that autograd saves for forward()'s backward."""
    with saved_bytes() as counter:
        forward()
    return counter.bytes_excluding(params), counter.bytes


def peak_bytes(forward, targets, grad_out, device):
    """Peak GPU bytes allocated by forward + backward beyond what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = forward()
    grads = torch.autograd.grad(out, targets, grad_out)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, grads
    return peak


def step_peak_bytes(step, device):
    """Peak GPU bytes of one training step (step() runs forward and backward, parameter gradients
    set to None first) beyond what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def forward_backward(forward, targets, grad_out):
    """Gradients of forward() for targets, without accumulating into .grad."""
    return torch.autograd.grad(forward(), targets, grad_out)
