"""``s2attn train``: train small dense / HHST / homogeneous-HHST models on the same data and compare.

Every variant starts from the same initial weights (same seed, same shapes) and sees the
same batches, so the loss curves differ only by the attention. Outputs under ``--out``:
``<variant>/checkpoint/`` (a ``save_pretrained`` directory: safetensors weights, nothing
unpickled on loading), ``train_log.csv`` (one row per step), ``loss_curves.png`` (when
matplotlib is installed) and ``summary.json`` / ``summary.md``. With ``--eval-tokens``, each
variant's summary row also holds its loss on held-out data of the same task (:func:`heldout_loss`).

Variants: ``dense`` (PyTorch SDPA everywhere), ``hhst`` (``attn_implementation="s2attn"``,
heterogeneous local-stride layers plus ``--dense-layers``), ``homo`` (the same with every head
on the same stride offset: the ablation).

With ``--min-len``, training starts at short sequences and doubles their length in stages up to
``--seq-len`` (:func:`seq_len_at`), at the same number of tokens per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import hhst_config, tiny_llama
from . import data
from .options import (UsageError, add_pattern_options, default_device, existing_file, int_list, output_dir,
                      pattern_options, positive_int, torch_device)

VARIANTS = ("dense", "hhst", "homo")
LOSSES = ("answer", "all")
CSV_FIELDS = ("variant", "step", "seq_len", "tokens", "loss", "answer_acc", "lr", "elapsed_s")
CURRICULUM_FRACTION = 0.5  # of the steps, spent growing the sequence length from --min-len
RUN_FILE = "s2attn_run.json"  # beside a checkpoint's config.json: variant, step, attention, arguments
HELDOUT_SEED = "heldout"  # prefix of the held-out streams' seeds; training's are "<--seed>/<length>"


# ---------------------------------------------------------------------------------------------- models
def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model-shape and pattern options shared by ``train`` and ``needle``."""
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=positive_int, default=256, help="model width, a multiple of --heads")
    g.add_argument("--layers", type=positive_int, default=4, help="transformer layers")
    g.add_argument("--heads", type=positive_int, default=8, help="query heads")
    g.add_argument("--kv-heads", type=positive_int, default=8, help="kv heads, a divisor of --heads")
    g.add_argument("--dense-layers", type=int_list, default="0", metavar="I,J,...",
                   help="layers that stay dense in hhst / homo models (comma-separated indices from 0)")
    add_pattern_options(p, local=512, stride=8)


def pattern_settings(args: argparse.Namespace, sparse: bool = True) -> dict:
    """The model options checked together, and the pattern settings of the sparse layers (keyword
    arguments of :func:`s2attn.local_stride`). ``sparse``: a variant with sparse layers will be built."""
    if args.d_model % args.heads:
        raise UsageError(f"--d-model={args.d_model}: expected a multiple of --heads={args.heads}")
    settings = pattern_options(args, args.heads, args.kv_heads)
    given = ",".join(map(str, args.dense_layers))
    if not all(0 <= i < args.layers for i in args.dense_layers):
        raise UsageError(f"--dense-layers={given}: expected layer indices 0 to {args.layers - 1} "
                         f"(--layers={args.layers})")
    if sparse and set(range(args.layers)) <= set(args.dense_layers):
        raise UsageError(f"--dense-layers={given}: every one of the --layers={args.layers} layers would be dense, so "
                         f"the hhst / homo variants would have no sparse layer; add layers or drop dense ones")
    return settings


def build_config(variant: str, args: argparse.Namespace, max_seq_len: int):
    """The ``transformers`` config of one variant, for the shape given in ``args``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    settings = pattern_settings(args, sparse=variant != "dense")
    base = tiny_llama(vocab_size=data.VOCAB_SIZE, d_model=args.d_model, layers=args.layers, heads=args.heads,
                      kv_heads=args.kv_heads, max_seq_len=max_seq_len)
    if variant == "dense":
        return base
    return hhst_config(base, dense_layers=args.dense_layers, local=settings["local_blocks"],
                       stride=settings["vert_stride"], block_size=settings["block_size"],
                       num_dense_heads=settings["num_dense_heads"], homogeneous=variant == "homo")


def build_model(config, device: str | torch.device):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config).to(device)


def save_checkpoint(path: Path, model, variant: str, step: int, args: argparse.Namespace) -> None:
    """``model.save_pretrained(path)`` (config.json and safetensors weights) and :data:`RUN_FILE`."""
    model.save_pretrained(path)
    run = {"variant": variant, "step": step, "attn_implementation": model.config._attn_implementation,
           "args": plain_args(args)}
    (path / RUN_FILE).write_text(json.dumps(run, indent=1))


def plain_args(args: argparse.Namespace) -> dict:
    """The command-line values of ``args`` (without the subcommand's function), for JSON and checkpoints."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, variant)`` in eval mode, from a :func:`save_checkpoint` directory (safetensors weights
    only) or a ``checkpoint.pt`` of earlier versions (read with ``weights_only=True``). Nothing in a
    checkpoint runs: a file that holds more than tensors and plain values is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..integrations import transformers as hf

    path = Path(path)
    if path.is_dir():
        if not (path / RUN_FILE).is_file() or not any(path.glob("model*.safetensors")):
            raise ValueError(f"checkpoint={str(path)!r}: expected a directory written by `s2attn train` ({RUN_FILE} "
                             f"and model.safetensors beside config.json)")
        run = json.loads((path / RUN_FILE).read_text())
        if run["attn_implementation"] == hf.NAME:
            hf.register()
        model = LlamaForCausalLM.from_pretrained(path, attn_implementation=run["attn_implementation"],
                                                 use_safetensors=True)
        return model.to(device).eval(), run["variant"]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"checkpoint={str(path)!r}: refused, it holds more than tensors and plain values (a pickle "
                         f"whose loading could run code, or no torch.save file at all); checkpoints are `s2attn "
                         f"train`'s save_pretrained directories") from None
    config = LlamaConfig.from_dict(ckpt["config"])
    if ckpt["attn_implementation"] == hf.NAME:
        hf.register()
    config._attn_implementation = ckpt["attn_implementation"]
    model = build_model(config, "cpu")
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt["variant"]


# ---------------------------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def seq_len_at(step: int, steps: int, seq_len: int, min_len: int) -> int:
    """The length curriculum: ``min_len`` doubled once per equal stage over the first
    :data:`CURRICULUM_FRACTION` of the steps, never above ``seq_len``; ``seq_len`` after that.

    Retrieval is learned at short lengths, where the cue competes with few tokens for attention, and
    then carried to long ones (CPU pilot: a dense model trained at 256 tokens alone stayed at chance).
    """
    if min_len < 1:
        raise ValueError(f"min_len={min_len}: expected a positive sequence length")
    stages = []
    while min_len < seq_len:
        stages.append(min_len)
        min_len *= 2
    stage = int(step / (CURRICULUM_FRACTION * steps) * len(stages))
    return stages[stage] if stage < len(stages) else seq_len


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of supervised tokens predicted exactly (argmax, teacher forcing)."""
    target = labels[:, 1:]
    keep = target != data.IGNORE
    hits = (logits[:, :-1].argmax(-1) == target) & keep
    return float(hits.sum()) / max(1, int(keep.sum()))


@torch.no_grad()
def heldout_loss(model, args: argparse.Namespace, length: int, tokens: int, text: data.TextFiles | None = None) -> dict:
    """Loss and answer-token accuracy of ``model`` on held-out sequences of ``length`` tokens of ``args.task``,
    as many as hold ``tokens`` (at least one), with the training loss (``args.loss``) and precision.

    The sequences come from a stream seeded ``"heldout/<length>"``, never a training seed: the same
    set for every variant and every ``--seed``, none of it seen in training. Loss and accuracy are
    means over the supervised tokens of the whole set (not of per-batch means)."""
    device = next(model.parameters()).device
    count = max(1, math.ceil(tokens / length))
    batch_size = min(count, max(1, args.batch_size * args.seq_len // length))  # training's tokens per forward
    stream = data.batches(args.task, batch_size, length, seed=f"{HELDOUT_SEED}/{length}", text=text)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = model.training
    model.eval()
    loss_sum, supervised, hits, answers, done = 0.0, 0, 0, 0, 0
    while done < count:
        ids, labels = (x[: count - done].to(device) for x in next(stream))
        target = (ids if args.loss == "all" else labels)[:, 1:]
        with autocast:
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                            ignore_index=data.IGNORE, reduction="sum"))
        supervised += int((target != data.IGNORE).sum())
        answer = labels[:, 1:] != data.IGNORE
        hits += int(((logits.argmax(-1) == labels[:, 1:]) & answer).sum())
        answers += int(answer.sum())
        done += len(ids)
    model.train(was_training)
    return {"length": length, "sequences": count, "tokens": count * length, "loss": loss_sum / max(1, supervised),
            "answer_acc": hits / max(1, answers)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(variant: str, args: argparse.Namespace, out: Path, writer, text: data.TextFiles | None) -> dict:
    """Train one variant; log each step to ``writer``; return its summary row."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = build_config(variant, args, args.seq_len)
    model = build_model(config, device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    # one seeded stream per curriculum length, the same for every variant
    streams: dict[int, Iterator[tuple[torch.Tensor, torch.Tensor]]] = {}
    tokens_per_step = args.batch_size * args.seq_len

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = seq_len_at(step, args.steps, args.seq_len, args.min_len or args.seq_len)
        if n not in streams:
            streams[n] = data.batches(args.task, max(1, tokens_per_step // n), n, seed=f"{args.seed}/{n}", text=text)
        return next(streams[n])

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    warmup = min(3, args.steps // 5)  # steps excluded from the throughput (allocator, autotuning)
    losses, accs = [], []
    tokens = timed_tokens = 0
    progress = tqdm(total=args.steps, desc=variant, unit="step", mininterval=1.0)
    batch = batch_at(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step == warmup:
            _sync(device)
            t_timed = time.perf_counter()
        ids, labels = (x.to(device, non_blocking=True) for x in batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        with autocast:
            result = model(input_ids=ids, labels=ids if args.loss == "all" else labels)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 < args.steps:
            batch = batch_at(step + 1)  # built on the CPU while the GPU runs this step
        loss = float(result.loss.detach())
        acc = answer_accuracy(result.logits.detach(), labels)
        losses.append(loss)
        accs.append(acc)
        tokens += ids.numel()
        timed_tokens += ids.numel() if step >= warmup else 0
        writer.writerow({"variant": variant, "step": step + 1, "seq_len": ids.shape[1], "tokens": tokens,
                         "loss": f"{loss:.5f}", "answer_acc": f"{acc:.4f}", "lr": f"{opt.param_groups[0]['lr']:.3g}",
                         "elapsed_s": f"{time.perf_counter() - t0:.2f}"})
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
    _sync(device)
    progress.close()
    tokens_per_s = timed_tokens / (time.perf_counter() - t_timed) if timed_tokens else float("nan")
    save_checkpoint(out / variant / "checkpoint", model, variant, args.steps, args)
    tail = max(1, args.steps // 10)
    row = {"variant": variant, "params": params, "steps": args.steps, "tokens": tokens,
           "final_loss": sum(losses[-tail:]) / tail, "final_answer_acc": sum(accs[-tail:]) / tail,
           "tokens_per_s": tokens_per_s, "checkpoint": str(out / variant / "checkpoint")}
    if args.eval_tokens:
        lengths = args.eval_lengths or [args.seq_len]
        row["heldout"] = [heldout_loss(model, args, n, args.eval_tokens, text) for n in lengths]
        print(f"{variant}: held-out loss " + ", ".join(f"{r['length']}: {r['loss']:.4f}" for r in row["heldout"]),
              flush=True)
    print(f"{variant}: final loss {row['final_loss']:.4f}, answer acc {row['final_answer_acc']:.3f}, "
          f"{tokens_per_s:,.0f} tokens/s ({params:,} params)", flush=True)
    return row


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Loss (and answer accuracy) against training tokens, one line per variant; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves: dict[str, dict[str, list[float]]] = {}
    with open(log_path) as f:
        for r in csv.DictReader(f):
            c = curves.setdefault(r["variant"], {"tokens": [], "loss": [], "answer_acc": []})
            for key in c:
                c[key].append(float(r[key]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        for ax, key in zip(axes, ("loss", "answer_acc")):
            ax.plot(c["tokens"], _ema(c[key]), label=name)
    for ax, title in zip(axes, ("training loss (EMA)", "answer-token accuracy (EMA)")):
        ax.set_xlabel("tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0] if values else 0.0
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| variant | params | tokens | final loss | answer acc | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['params']:,} | {r['tokens']:,} | {r['final_loss']:.4f} | "
              f"{r['final_answer_acc']:.3f} | {r['tokens_per_s']:,.0f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def variant_list(text: str) -> list[str]:
    """``argparse`` type: a comma-separated, non-empty subset of :data:`VARIANTS`."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(VARIANTS)}")
    return variants


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("train", help="train dense / HHST / homogeneous models and compare them",
                              description=__doc__)
    p.add_argument("--variants", type=variant_list, default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--task", default="mix", choices=data.TASKS, help="synthetic task (ignored with --data)")
    p.add_argument("--data", nargs="+", type=existing_file, metavar="PATH",
                   help="local text files to train on, task 'text' (default: the synthetic --task)")
    p.add_argument("--loss", default="answer", choices=LOSSES,
                   help="train on the answer tokens only, or next-token loss on all tokens (answer accuracy is "
                        "measured on the answer tokens either way)")
    p.add_argument("--seq-len", type=positive_int, default=1024, metavar="TOKENS", help="training sequence length")
    p.add_argument("--min-len", type=int, default=0, metavar="TOKENS",
                   help="length curriculum: start at this sequence length and double it in equal stages over the "
                        f"first {CURRICULUM_FRACTION:.0%}% of the steps up to --seq-len; every step keeps "
                        "--batch-size x --seq-len tokens (0: --seq-len throughout)")
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps per variant")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (at --seq-len)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument("--device", type=torch_device, default=default_device(), help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights and data)")
    p.add_argument("--eval-tokens", type=int, default=0, metavar="TOKENS",
                   help="after training, the loss on this many held-out tokens of the task at each --eval-lengths, "
                        "in summary.json (the same sequences for every variant and --seed; 0: none)")
    p.add_argument("--eval-lengths", type=int_list, metavar="TOKENS,...",
                   help="sequence lengths of the held-out loss (default: --seq-len)")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    pattern_settings(args, sparse=any(v != "dense" for v in args.variants))
    if not 0 <= args.min_len <= args.seq_len:
        raise UsageError(f"--min-len={args.min_len}: expected 0 (no curriculum) up to --seq-len={args.seq_len}")
    text = None
    if args.data:
        text, args.task = data.TextFiles(args.data), "text"
        if len(text.tokens) < args.seq_len:
            raise UsageError(f"--data={' '.join(args.data)}: {len(text.tokens):,} bytes, expected at least "
                             f"--seq-len={args.seq_len}")
    shortest = data.min_seq_len(args.task)
    if min(args.min_len or args.seq_len, args.seq_len) < shortest:
        raise UsageError(f"--seq-len={args.seq_len}, --min-len={args.min_len}: task {args.task!r} needs sequences of "
                         f"at least {shortest} tokens")
    if args.eval_tokens < 0:
        raise UsageError(f"--eval-tokens={args.eval_tokens}: expected a number of tokens >= 0")
    longest = len(text.tokens) if text else math.inf
    if args.eval_lengths is not None and not all(shortest <= n <= longest for n in args.eval_lengths or [0]):
        raise UsageError(f"--eval-lengths={','.join(map(str, args.eval_lengths))}: expected sequence lengths of at "
                         f"least {shortest} tokens (task {args.task!r})" + (f", at most the {longest:,} bytes of "
                                                                            f"--data" if text else ""))
    out = output_dir(args.out, "--out")
    log_path = out / "train_log.csv"
    rows = []
    with open(log_path, "w", newline="", buffering=1) as f:  # line-buffered: a live log
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for variant in args.variants:
            rows.append(train_variant(variant, args, out, writer, text))
            f.flush()
    png = plot_losses(log_path, out / "loss_curves.png")
    (out / "summary.json").write_text(json.dumps({"args": plain_args(args), "results": rows}, indent=2))
    table = summary_markdown(rows)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"log: {log_path}" + (f", plot: {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m s2attn.apps.train [options]``: the same as ``s2attn train [options]``."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
