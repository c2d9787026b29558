"""Fine-tuning a small Llama-config language model with SBP, on real text that ships with Python.

The corpus is the standard library's own source files, read as bytes (a 256-symbol vocabulary):
files whose names start with a-m train the base model, the others are the fine-tuning data, and a
held-out slice of each is the validation set. The model is a transformers LlamaForCausalLM built
from a config (no download). Steps:

1. pre-training the base model (dense) on the first half of the corpus;
2. fine-tuning copies of it on the second half: fully, dense and with SBP at r = 0.5 and 0.25
   (sbp_kernels.convert: every decoder layer and the fused LM head + loss), and with LoRA on
   q_proj / v_proj (peft), dense and with SBP at r = 0.5.
Every variant sees the same batches. The script prints the validation loss as it goes, the bytes
saved for backward by one training step (sbp_kernels.memory.saved_bytes, parameters excluded) and
the time, and plots the validation curves. CPU, a few minutes with the defaults:

    python examples/llm_finetune.py [--steps 300] [--threads 2] [--out examples/llm_finetune.png]
"""
import argparse
import copy
import pathlib
import sysconfig
import time

import torch
import transformers

import sbp_kernels
from sbp_kernels.memory import saved_bytes


def corpus(first_letters):
    """The standard library's .py files whose names start with one of first_letters, as bytes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name[0].lower() in first_letters)
    return torch.tensor(list(b"".join(p.read_bytes() for p in files)), dtype=torch.long)


def batches(data, steps, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(len(data) - length - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + length] for s in start.tolist()])


@torch.no_grad()
def validation_loss(model, data, length, batches_=8):
    model.eval()
    starts = torch.linspace(0, len(data) - length - 1, batches_ * 4).long()
    ids = torch.stack([data[s:s + length] for s in starts.tolist()])
    loss = sum(model(input_ids=chunk, labels=chunk).loss.item() for chunk in ids.split(4)) / len(ids.split(4))
    model.train()
    return loss


def train(model, data, val, args, seed, log_every=25):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    curve = []
    start = time.perf_counter()
    for step, ids in enumerate(batches(data, args.steps, args.batch, args.length, seed)):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == args.steps - 1:
            curve.append((step, validation_loss(model, val, args.length)))
    return curve, time.perf_counter() - start


def saved_per_step(model, data, args):
    ids = next(batches(data, 1, args.batch, args.length, 0))
    with saved_bytes() as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes_excluding(list(model.parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="examples/llm_finetune.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base_text, tune_text = corpus("abcdefghijklm"), corpus("nopqrstuvwxyz")
    split = int(0.95 * len(tune_text))
    tune, val = tune_text[:split], tune_text[split:]
    print(f"corpus: {len(base_text) / 1e6:.1f} MB base, {len(tune) / 1e6:.1f} MB fine-tuning, {len(val) / 1e3:.0f} kB val")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.length, use_cache=False,
    )
    base = transformers.LlamaForCausalLM(config)
    print("pre-training the base model ...", flush=True)
    curve, seconds = train(base, base_text, val, args, seed=1)
    print(f"  base: val loss {curve[-1][1]:.3f} on the fine-tuning text ({seconds:.0f} s)")

    def lora(model):
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    variants = {
        "dense": lambda: copy.deepcopy(base),
        "SBP r=0.5": lambda: sbp_kernels.convert(copy.deepcopy(base), keep_ratio=0.5),
        "SBP r=0.25": lambda: sbp_kernels.convert(copy.deepcopy(base), keep_ratio=0.25),
        "LoRA dense": lambda: lora(copy.deepcopy(base)),
        "LoRA + SBP r=0.5": lambda: sbp_kernels.convert(lora(copy.deepcopy(base)), keep_ratio=0.5),
    }
    results = {}
    for name, make in variants.items():
        model = make()
        saved = saved_per_step(model, tune, args)
        curve, seconds = train(model, tune, val, args, seed=2)
        results[name] = (curve, saved, seconds)
        print(f"{name:18s} val loss {curve[-1][1]:.3f}   saved for backward {saved / 2**20:6.2f} MiB   "
              f"{seconds:5.0f} s", flush=True)
    dense_saved = results["dense"][1]
    for name, (_, saved, _) in results.items():
        reference = results["LoRA dense"][1] if name.startswith("LoRA") else dense_saved
        print(f"  {name:18s} saved {saved / reference:.2f}x of its dense counterpart")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (curve, saved, _) in results.items():
        steps, losses = zip(*curve)
        ax.plot(steps, losses, label=f"{name} ({saved / 2**20:.1f} MiB saved)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
