"""``s2attn needle``: passkey retrieval over a grid of context lengths x needle depths.

A cell's accuracy is the fraction of its samples whose whole key is predicted exactly. The
check is one teacher-forced forward pass per sample: the key is at the very end of the
sequence, and every digit being the argmax of the model given the true prefix is exactly
what greedy generation would produce. Writes ``needle.csv`` (one row per model x cell) and
``needle.png`` (one heatmap per model, side by side, when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .options import UsageError, default_device, existing_path, int_list, output_dir, positive_int, torch_device
from .train import VARIANTS, add_model_args, build_config, build_model, load_checkpoint, pattern_settings


@torch.no_grad()
def passkey_accuracy(model, seq_len: int, depth: float, samples: int, *, batch_size: int = 4, seed: int = 0) -> float:
    """Fraction of ``samples`` passkey sequences of ``seq_len`` tokens whose key the model gets exactly right."""
    rng = random.Random(f"{seed}/{seq_len}/{depth}")
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    correct = 0
    for start in range(0, samples, batch_size):
        rows = [data.passkey_sample(seq_len, depth, rng) for _ in range(min(batch_size, samples - start))]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.int64, device=device)
        n = rows[0][1]
        with autocast:
            logits = model(input_ids=ids, logits_to_keep=n + 1).logits  # predictions for the last n tokens
        pred = logits[:, :-1].argmax(-1)
        correct += int((pred == ids[:, -n:]).all(-1).sum())
    return correct / samples


def needle_grid(model, lengths: Sequence[int], depths: Sequence[float], samples: int, *, batch_size: int = 4,
                seed: int = 0, progress: tqdm | None = None) -> torch.Tensor:
    """Accuracy ``(len(lengths), len(depths))`` over the grid; ``progress`` (a tqdm bar) advances once per cell."""
    model.eval()
    grid = torch.zeros(len(lengths), len(depths))
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            grid[i, j] = passkey_accuracy(model, n, d, samples, batch_size=batch_size, seed=seed)
            if progress is not None:
                progress.update(1)
    return grid


def plot_heatmaps(grids: dict[str, torch.Tensor], lengths: Sequence[int], depths: Sequence[float],
                  path: Path) -> Path | None:
    """One heatmap per model, side by side (lengths on x, depths on y); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    width = max(3.0, 1.0 + 0.9 * len(lengths))
    fig, axes = plt.subplots(1, len(grids), figsize=(width * len(grids) + 1.2, 1.6 + 0.45 * len(depths)), squeeze=False,
                             sharey=True, layout="constrained")  # depth labels once, on the left; nothing overlaps
    cmap = plt.get_cmap("RdYlGn")
    for ax, (name, acc) in zip(axes[0], grids.items()):
        im = ax.imshow(acc.T.numpy(), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                r, g, b, _ = cmap(float(acc[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark red and dark green
                ax.text(i, j, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_title(f"{name}\npasskey accuracy {acc.mean():.2f}", fontsize=10)
    axes[0, 0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="passkey accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def depth_list(text: str) -> list[float]:
    """``argparse`` type of ``--depths``: a count ``N`` (``N`` depths evenly spaced in [0, 1], both ends
    included) or comma-separated fractions in [0, 1] (``0,0.25,0.5``; one fraction: ``0.5``)."""
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of depths or fractions in [0, 1]")
        return [i / max(1, count - 1) for i in range(count)]
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        depths = []
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of depths or fractions in [0, 1], "
                                         f"comma-separated")
    return depths


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``needle`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("needle", help="passkey retrieval heatmap over context lengths x needle depths",
                              description=__doc__)
    p.add_argument("--checkpoint", nargs="+", type=existing_path, metavar="PATH",
                   help="checkpoint directories written by `s2attn train`; nothing in them is unpickled "
                        "(default: a freshly built --variant model)")
    p.add_argument("--variant", default="hhst", choices=VARIANTS, help="model to build when no --checkpoint")
    p.add_argument("--lengths", type=int_list, default="1024,2048,4096,8192", metavar="TOKENS,...",
                   help="comma-separated context lengths")
    p.add_argument("--depths", type=depth_list, default="5", metavar="N|F,F,...",
                   help="needle depths: a number of them evenly spaced in [0, 1] (1 is the needle right before the "
                        "question), or comma-separated fractions of the filler before the needle")
    p.add_argument("--samples", type=positive_int, default=10, help="samples per cell")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per forward pass")
    p.add_argument("--out", default="runs/needle", help="output directory")
    p.add_argument("--device", type=torch_device, default=default_device(), help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed (fresh model and samples)")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def _models(args: argparse.Namespace, max_len: int):
    """``(name, model)`` pairs: the checkpoints, or one freshly built model."""
    if args.checkpoint:
        for path in args.checkpoint:
            model, variant = load_checkpoint(path, args.device)
            yield variant, model
        return
    torch.manual_seed(args.seed)
    yield args.variant, build_model(build_config(args.variant, args, max_len), args.device)


def run(args: argparse.Namespace) -> int:
    shortest = data.passkey_min_len()
    if not args.lengths or min(args.lengths) < shortest:
        raise UsageError(f"--lengths={','.join(map(str, args.lengths))}: expected context lengths of at least "
                         f"{shortest} tokens (a passkey sequence without filler)")
    if not args.checkpoint:
        pattern_settings(args, sparse=args.variant != "dense")  # the model options, checked before any output
    lengths = args.lengths
    depths = args.depths
    out = output_dir(args.out, "--out")
    rows, grids = [], {}
    for name, model in _models(args, max(lengths)):
        with tqdm(total=len(lengths) * len(depths), desc=name, unit="cell") as progress:
            acc = grids[name] = needle_grid(model, lengths, depths, args.samples, batch_size=args.batch_size,
                                            seed=args.seed, progress=progress)
        rows += [{"model": name, "length": n, "depth": f"{d:.3f}", "accuracy": f"{acc[i, j]:.4f}",
                  "samples": args.samples} for i, n in enumerate(lengths) for j, d in enumerate(depths)]
        per_len = ", ".join(f"{n}: {a:.2f}" for n, a in zip(lengths, acc.mean(1).tolist()))
        print(f"{name}: mean passkey accuracy {acc.mean():.3f} (by length {per_len})", flush=True)
        del model
    png = plot_heatmaps(grids, lengths, depths, out / "needle.png")
    with open(out / "needle.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "length", "depth", "accuracy", "samples"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"csv: {out / 'needle.csv'}" + (f", heatmaps: {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m s2attn.apps.needle [options]``: the same as ``s2attn needle [options]``."""
    from .cli import main as cli_main

    return cli_main(["needle", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
