"""A small timm ViT trained dense and with SBP (sbp_kernels.convert on its last 2/3 of blocks, r = 0.5).

The task is generated on the fly: 32x32 images of a faint sinusoidal grating under strong noise;
the class (4 of them) is its orientation. The model is timm's VisionTransformer (the
vit_tiny_patch16_224 architecture at 32 px with 4 px patches, pretrained=False): `convert` turns
its blocks' branches into SBP in place and grid-samples the 8x8 patches while always keeping the
class token.

Both models start from the same weights and see the same batches. The script prints and plots
the training-loss curves, the test accuracy and the bytes saved for backward by one training
forward (sbp_kernels.memory.saved_bytes). CPU, well under two minutes with the defaults:

    python examples/vit_sbp.py [--steps 200] [--threads 1] [--out examples/vit_sbp.png]
"""
import argparse
import copy
import math
import time

import timm
import torch
import torch.nn.functional as F

import sbp_kernels
from sbp_kernels.memory import saved_bytes

# --- data --------------------------------------------------------------------------------------


def gratings(n, size=32, contrast=0.5, generator=None):
    """n images [n, 1, size, size] and labels in 0..3: the orientation of a sinusoidal grating
    (0, 45, 90, 135 degrees, jittered by +-11 degrees; random period 4..8 px and phase) under
    unit Gaussian noise."""
    labels = torch.randint(4, (n,), generator=generator)
    theta = labels * math.pi / 4 + (torch.rand(n, generator=generator) - 0.5) * math.pi / 8
    freq = 2 * math.pi / (4 + 4 * torch.rand(n, generator=generator))
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    along = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
    img = contrast * torch.sin(freq[:, None, None] * along + phase[:, None, None])
    return (img + torch.randn(n, size, size, generator=generator))[:, None], labels


# --- training ---------------------------------------------------------------------------------------


def train(model, batches, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    losses = []
    for x, y in batches():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, x, y, batch=500):
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return hits / len(x)


def forward_saved_bytes(model, x, y):
    """Bytes saved for backward by one training forward (and the loss): all of them, and those
    apart from the parameters (which live anyway)."""
    with saved_bytes() as saved:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes, saved.bytes_excluding(model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (small matrices: more gain little, and lose much on a busy machine)")
    ap.add_argument("--out", default="examples/vit_sbp.png", help="PNG of the loss curves and saved bytes")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_test, y_test = gratings(args.test_size, generator=gen)
    data_seed = int(torch.randint(2**31, (1,), generator=gen))

    def batches():  # the same batches for both models
        g = torch.Generator().manual_seed(data_seed)
        for _ in range(args.steps):
            yield gratings(args.batch_size, generator=g)

    torch.manual_seed(args.seed)
    dense = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, in_chans=1, num_classes=4,
        embed_dim=args.dim, depth=args.depth, num_heads=3,
    )
    sbp = copy.deepcopy(dense)  # same initial weights
    first = args.depth // 3  # SBP on the last 2/3 of the blocks, as in Fang et al. (2022)
    sbp_kernels.convert(
        sbp, args.keep_ratio, layers=lambda name, m: name.startswith("blocks.") and int(name.split(".")[1]) >= first
    )
    print(f"ViT: {args.depth} blocks of dim {args.dim}, 8x8 patches + class token; "
          f"SBP (r={args.keep_ratio}, grid) on blocks {first}..{args.depth - 1}")

    x0, y0 = gratings(args.batch_size, generator=torch.Generator().manual_seed(data_seed + 1))
    results = {}
    for name, model in (("dense", dense), ("sbp", sbp)):
        saved, activations = forward_saved_bytes(model, x0, y0)
        torch.manual_seed(args.seed + 1)  # the same keep-set draws whatever ran before
        start = time.perf_counter()
        losses = train(model, batches, args.lr)
        seconds = time.perf_counter() - start
        acc = accuracy(model, x_test, y_test)
        results[name] = {"losses": losses, "acc": acc, "saved": saved, "activations": activations, "seconds": seconds}
        tail = losses[-20:]
        print(
            f"{name:>5}: saved for backward {saved / 2**20:6.2f} MiB per forward (batch {args.batch_size}), "
            f"final train loss {sum(tail) / len(tail):.3f}, test acc {acc:.3f}, "
            f"{1000 * seconds / args.steps:.0f} ms/step"
        )
    ratio = results["sbp"]["saved"] / results["dense"]["saved"]
    act = results["sbp"]["activations"] / results["dense"]["activations"]
    print(f"SBP / dense saved bytes: {ratio:.3f} (activations only, parameters excluded: {act:.3f})")
    plot(args, results)


def plot(args, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    for name, r in results.items():
        losses = torch.tensor(r["losses"])
        k = 10
        smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
        ax.plot(smooth, label=f"{name} (test acc {r['acc']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("ViT on grating orientations: dense vs SBP")
    ax.legend()
    names = list(results)
    mib = [results[n]["saved"] / 2**20 for n in names]
    bars = bx.bar(names, mib, color=["tab:blue", "tab:orange"])
    bx.bar_label(bars, [f"{m:.1f}" for m in mib])
    bx.set_ylabel(f"saved for backward, MiB (batch {args.batch_size})")
    bx.set_title(f"one training forward (r={args.keep_ratio})")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
