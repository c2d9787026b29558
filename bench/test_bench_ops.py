"""One benchmark per op, variant and mode: dense PyTorch beside SBP at r = 0.5 with each backend.

CPU: the first `sbp-bench --quick` case of each op (small shapes, the file runs in seconds).
GPU: every case at the issues' target shapes, bf16. Benchmarks of one case and mode share a
group, so pytest-benchmark prints dense and SBP side by side:

    pytest bench --benchmark-only -q
    pytest bench --benchmark-only -q -k linear --benchmark-columns=median,iqr
"""
import pytest
import torch

from sbp_kernels.bench.cases import attention_op, backend_reason, cases
from sbp_kernels.sampling import sample_keep_indices

# No TRITON_INTERPRET here (unlike tests/conftest.py): Triton is timed on GPU only.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
KEEP_RATIO = 0.5
ROUNDS = 20 if GPU else 5


def _cases():
    if GPU:
        return cases("cuda")
    first = {}
    for case in cases("cpu", quick=True):
        first.setdefault(case.op, case)
    return list(first.values())


def _params():
    params = []
    for case in _cases():
        for backend in ("dense", "torch", "cuda", "triton"):
            reason = None
            if "attention" in case.kernels:
                reason = attention_op()[1]
            if reason is None and backend != "dense":
                reason = backend_reason(backend, case, DEVICE)
            for mode in ("fwd", "bwd"):
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                name = f"{case.op}-{case.label.replace(' ', '_')}-{backend}-{mode}"
                params.append(pytest.param(case, backend, mode, id=name, marks=marks))
    return params


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,backend,mode", _params())
def test_op(benchmark, case, backend, mode):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    work = case.build(DEVICE, DTYPE, gen)
    if backend == "dense":
        forward = work.dense
    else:
        keep = sample_keep_indices(case.layout, KEEP_RATIO, "grid", torch.Generator().manual_seed(0), device=DEVICE)

        def forward():
            return work.sbp(keep, backend)

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(op=case.op, case=case.label, backend=backend, mode=mode, dtype=str(DTYPE))
    if backend != "dense":
        benchmark.extra_info["keep_ratio"] = KEEP_RATIO
    if mode == "fwd":

        def fn():
            forward()
            _sync()

    else:
        out = forward()
        grad_out = torch.randn(out.shape, device=DEVICE, generator=gen).to(DTYPE)

        def fn():
            torch.autograd.grad(out, work.targets, grad_out, retain_graph=True)
            _sync()

    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=3 if GPU else 1, iterations=1)
