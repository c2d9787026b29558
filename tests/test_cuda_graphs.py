"""A converted timm ViT under torch.compile(mode="reduce-overhead") on a GPU: inductor with CUDA
graphs, a new keep set each step, the same loss and gradients as eager (issue 14: compile removes
the host cost). Needs a CUDA device; CPU runs skip it (scripts/gpu_check.sh runs it)."""
import copy
import warnings

import pytest
import torch
from conftest import require

import sbp_kernels
from sbp_kernels import keepset

timm = require("timm")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_reduce_overhead_compile_of_a_converted_vit_equals_eager():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, depth=2,
                              num_classes=10).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sbp_kernels.convert(model, keep_ratio=0.5)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    n, grid = 17, (4, 4)  # the class token and a 4 x 4 patch grid
    for seed in range(3):
        keep = keepset.draw(n, 0.5, "grid", grid, torch.Generator().manual_seed(seed)).cuda()
        results = []
        for m, fn in ((model, compiled), (eager, eager)):
            m.zero_grad(set_to_none=True)
            with sbp_kernels.step(keep_idx=keep):
                loss = fn(x).float().square().mean()
                loss.backward()
            results.append((loss.detach().clone(), {k: p.grad.clone() for k, p in m.named_parameters()}))
        (loss_c, grads_c), (loss_e, grads_e) = results
        torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], atol=1e-4, rtol=1e-3, msg=k)
