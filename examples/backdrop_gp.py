"""Backdrop on two-scale Gaussian-process textures (after Golkar & Cranmer 2018, section 4).

Each texture is the sum of a large-scale and a small-scale Gaussian-process component, made by
filtering white noise with a squared-exponential spectrum in Fourier space. The class (4 of them)
is the combination of the large component's length scale (short / long) and the small
component's amplitude (weak / strong): telling them apart needs features at both scales.

Two small CNNs, identical but for two Backdrop layers in one of them (patch masks at a fine and a
coarse scale of the feature maps), are trained on the same batches from a small fixed training
set (the regime where backdrop's gradient masking acts as a regulariser; --train-size 0 draws
fresh textures every step instead) and tested on fresh textures. Runs on CPU in well under two minutes:

    python examples/backdrop_gp.py [--steps 300] [--out examples/backdrop_gp.png]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from sbp_kernels.nn import Backdrop

LARGE_LENGTHS = (4.0, 8.0)  # class bit 0: length scale of the large-scale component (pixels)
SMALL_AMPLITUDES = (0.35, 0.7)  # class bit 1: amplitude of the small-scale component
SMALL_LENGTH = 1.0


def _filter(size, length):
    """Fourier filter turning unit white noise into a unit-variance GP sample with a
    squared-exponential kernel of the given length scale (periodic boundary)."""
    k = torch.fft.fftfreq(size)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    power = torch.exp(-2 * math.pi**2 * length**2 * k2)
    return torch.sqrt(power / power.mean())  # variance of the output = mean(|H|^2) = 1


def textures(n, size, generator=None):
    """n textures [n, 1, size, size] and their labels in 0..3."""
    labels = torch.randint(4, (n,), generator=generator)
    amp = torch.tensor(SMALL_AMPLITUDES)[labels // 2]
    filters_large = torch.stack([_filter(size, length) for length in LARGE_LENGTHS])[labels % 2]
    small_filter = _filter(size, SMALL_LENGTH)
    noise = torch.randn(2, n, size, size, generator=generator)
    big = torch.fft.ifft2(torch.fft.fft2(noise[0]) * filters_large).real
    small = torch.fft.ifft2(torch.fft.fft2(noise[1]) * small_filter).real
    x = big + amp[:, None, None] * small
    return x[:, None], labels


class Classifier(nn.Module):
    """A small CNN; with backdrop_p > 0 it masks gradients over 8x8 patches of its half-resolution
    maps (fine scale: 16x16 input pixels) and 2x2 patches of its 1/8-resolution maps (coarse
    scale: 32x32 input pixels); with the default 48x48 textures each is a 3x3 grid of patches."""

    def __init__(self, backdrop_p=0.0, width=16):
        super().__init__()
        bd = backdrop_p > 0
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),  # H/2
            Backdrop(backdrop_p, patch_size=8) if bd else nn.Identity(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),  # H/4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),  # H/8
            Backdrop(backdrop_p, patch_size=2) if bd else nn.Identity(),
        )
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train(model, batches, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
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
    correct = sum(
        (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch)
    )
    return correct / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=48, help="texture side in pixels")
    ap.add_argument("--train-size", type=int, default=128,
                    help="fixed training set; 0: fresh textures each step")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--p", type=float, default=0.5, help="backdrop drop probability of both layers")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=12, help="channels of the first conv layers")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (a small CNN gains little from more)")
    ap.add_argument("--out", default="examples/backdrop_gp.png",
                    help="PNG of loss curves and sample textures")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_test, y_test = textures(args.test_size, args.size, gen)
    x_train, y_train = textures(args.train_size, args.size, gen) if args.train_size else (None, None)
    data_seed = int(torch.randint(2**31, (1,), generator=gen))

    def batches():  # the same sequence of batches for both models
        g = torch.Generator().manual_seed(data_seed)
        for _ in range(args.steps):
            if x_train is None:
                yield textures(args.batch_size, args.size, g)
            else:
                idx = torch.randint(len(x_train), (args.batch_size,), generator=g)
                yield x_train[idx], y_train[idx]

    results = {}
    for name, p in (("dense", 0.0), ("backdrop", args.p)):
        torch.manual_seed(args.seed)  # same initial weights (Backdrop has no parameters)
        model = Classifier(backdrop_p=p, width=args.width)
        start = time.perf_counter()
        losses = train(model, batches, args.lr)
        train_acc = f"{accuracy(model, x_train, y_train):.3f}" if x_train is not None else "-"
        results[name] = (losses, accuracy(model, x_test, y_test))
        print(
            f"{name:>8}: final train loss {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
            f"train acc {train_acc}, test acc {results[name][1]:.3f} "
            f"({args.steps} steps, {time.perf_counter() - start:.1f} s)"
        )
    plot(args, results, x_test, y_test)


def plot(args, results, x, y):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig = plt.figure(figsize=(11, 4.5))
    ax = fig.add_subplot(2, 4, (1, 6))
    for name, (losses, acc) in results.items():
        k = 10
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1) if len(losses) >= k else torch.tensor(losses)
        ax.plot(smooth, label=f"{name} (test acc {acc:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.legend()
    for c in range(4):
        ax = fig.add_subplot(2, 4, (3, 4, 7, 8)[c])
        i = int((y == c).nonzero()[0])
        ax.imshow(x[i, 0], cmap="viridis")
        ax.set_title(f"class {c}: l={LARGE_LENGTHS[c % 2]:g}, a={SMALL_AMPLITUDES[c // 2]:g}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
