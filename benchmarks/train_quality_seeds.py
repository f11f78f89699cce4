"""Aggregate the runs of benchmarks/train_quality_seeds.sh (issue 23): each variant's mean ± std over its
seeds, Welch's t-test for each claim, loss curves with bands and the needle heatmaps (mean over seeds).

    python benchmarks/train_quality_seeds.py [--results DIR] [--variants dense,hhst,homo] [--seeds 0,1,2]

Reads every ``<variant>-s<seed>/`` directory under ``--results`` and writes ``results.md`` there, with
``loss_curves.png`` and ``needle.png`` when matplotlib is installed. Works with whatever runs exist (one
seed of a variant, a variant missing) and says which of the ``--variants`` x ``--seeds`` are missing.

Retrieval is the passkey accuracy of ``s2attn needle`` over depths short of 100% (the needle right before
the question is a degenerate case the training data almost never shows; reported apart); "grid" is the
mean over those depths and the lengths up to the training length. Held-out loss is ``s2attn train
--eval-tokens``: the training objective on one fixed set of held-out sequences, the same for every run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN_NAME = re.compile(r"(?P<variant>[a-z]+)-s(?P<seed>\d+)")
ALPHA = 0.05  # significance level of the statements
# (key, column label, format, which way is better); {train} / {beyond}: the lengths, filled in per table
METRICS = [
    ("heldout_train", "held-out loss @ {train}", ".4f", "lower"),
    ("heldout_beyond", "held-out loss @ {beyond}", ".4f", "lower"),
    ("final_loss", "final train loss", ".4f", "lower"),
    ("passkey_grid", "passkey, grid ≤ {train}", ".3f", "higher"),
    ("passkey_train", "passkey @ {train}", ".3f", "higher"),
    ("passkey_beyond", "passkey @ {beyond}", ".3f", "higher"),
    ("passkey_depth100", "passkey, depth 100%", ".3f", "higher"),
    ("tps_train", "tokens/s @ {train} stage", ",.0f", "higher"),
    ("tps", "tokens/s, whole run", ",.0f", "higher"),
]
# the issue's claims: (statement, variant a, variant b, metrics compared)
CLAIMS = [
    ("Heterogeneous (hhst) vs homogeneous (homo) sharding", "hhst", "homo",
     ["passkey_grid", "passkey_train", "passkey_beyond", "heldout_train", "final_loss"]),
    ("HHST vs dense at the training length", "hhst", "dense",
     ["heldout_train", "passkey_train", "passkey_grid", "final_loss", "tps_train"]),
    ("HHST vs dense beyond the training length", "hhst", "dense", ["passkey_beyond", "heldout_beyond"]),
    ("Homogeneous vs dense beyond the training length", "homo", "dense", ["passkey_beyond", "heldout_beyond"]),
]


@dataclass
class Run:
    variant: str
    seed: int
    path: Path
    args: dict = field(default_factory=dict)  # train's arguments (summary.json)
    meta: dict = field(default_factory=dict)  # run.json: times, device, versions
    metrics: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)  # train_log.csv
    needle: dict = field(default_factory=dict)  # (length, depth) -> accuracy
    missing: list[str] = field(default_factory=list)  # files absent or unreadable


# ---------------------------------------------------------------------------------------------- reading
def read_run(path: Path) -> Run:
    m = RUN_NAME.fullmatch(path.name)
    run = Run(m["variant"], int(m["seed"]), path)
    try:
        summary = json.loads((path / "summary.json").read_text())
        run.args, row = summary["args"], summary["results"][0]
    except (OSError, ValueError, KeyError, IndexError):
        run.missing.append("summary.json")
        row = {}
    try:
        run.meta = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        run.missing.append("run.json")
    try:
        with open(path / "train_log.csv") as f:
            run.log = [{k: float(v) for k, v in r.items() if k != "variant"} for r in csv.DictReader(f)]
    except (OSError, ValueError):
        run.missing.append("train_log.csv")
    try:
        with open(path / "needle.csv") as f:
            run.needle = {(int(r["length"]), float(r["depth"])): float(r["accuracy"]) for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError):
        run.missing.append("needle.csv")
    run.metrics = run_metrics(row, run.log, run.needle, run.args.get("seq_len"))
    if run.meta.get("jobs", 1) > 1:  # trained beside other runs on one GPU: its speed is not the variant's
        for key in ("tps", "tps_train"):
            run.metrics.pop(key, None)
    return run


def run_metrics(row: dict, log: list[dict], needle: dict, train_len: int | None) -> dict:
    """The :data:`METRICS` of one run (absent ones left out), and the per-length values (``passkey@N``,
    ``heldout@N``)."""
    out = {k: row[k] for k in ("final_loss", "final_answer_acc") if k in row}
    if "tokens_per_s" in row:
        out["tps"] = row["tokens_per_s"]
    heldout = {h["length"]: h["loss"] for h in row.get("heldout", [])}
    out |= {f"heldout@{n}": v for n, v in heldout.items()}
    lengths = sorted({n for n, _ in needle})
    for n in lengths:
        cells = [a for (m, d), a in needle.items() if m == n and d < 1]
        if cells:
            out[f"passkey@{n}"] = sum(cells) / len(cells)
    if not train_len:
        return out
    beyond = max([n for n in [*lengths, *heldout] if n > train_len], default=None)
    grid = [a for (n, d), a in needle.items() if n <= train_len and d < 1]
    deepest = [a for (_, d), a in needle.items() if d == 1]
    for key, value in [("heldout_train", heldout.get(train_len)), ("heldout_beyond", heldout.get(beyond)),
                       ("passkey_train", out.get(f"passkey@{train_len}")),
                       ("passkey_beyond", out.get(f"passkey@{beyond}")),
                       ("passkey_grid", sum(grid) / len(grid) if grid else None),
                       ("passkey_depth100", sum(deepest) / len(deepest) if deepest else None),
                       ("tps_train", stage_throughput(log, train_len))]:
        if value is not None:
            out[key] = value
    return out


def stage_throughput(log: list[dict], seq_len: int) -> float | None:
    """Tokens/s over the steps at ``seq_len`` (after the curriculum), from the log's cumulative tokens and
    seconds; the first logged step is the origin when training starts at ``seq_len``."""
    first = next((i for i, r in enumerate(log) if r["seq_len"] == seq_len), None)
    if first is None or first == len(log) - 1:
        return None
    origin = log[max(0, first - 1)]
    last = log[-1]
    seconds = last["elapsed_s"] - origin["elapsed_s"]
    return (last["tokens"] - origin["tokens"]) / seconds if seconds > 0 else None


# ---------------------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_two_sided_p(t: float, df: float, steps: int = 2000) -> float:
    """Two-sided p-value of Student's t with ``df >= 1`` (non-integer allowed) degrees of freedom.

    With x = sqrt(df) tan(u) the density becomes proportional to cos(u)^(df - 1) on [0, pi/2), so
    P(|T| > |t|) is that function's integral from atan(|t| / sqrt(df)) to pi/2 (Simpson's rule: smooth on a
    bounded interval) over its whole integral, sqrt(pi) / 2 * Gamma(df / 2) / Gamma((df + 1) / 2)."""
    a, b = math.atan(abs(t) / math.sqrt(df)), math.pi / 2
    h = (b - a) / steps
    f = [math.cos(a + i * h) ** (df - 1) for i in range(steps + 1)]
    tail = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    whole = math.sqrt(math.pi) / 2 * math.exp(math.lgamma(df / 2) - math.lgamma((df + 1) / 2))
    return min(1.0, max(0.0, tail / whole))


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(a) - mean(b): ``diff``, ``t``, ``df``, ``p``; ``t`` / ``p`` are ``None`` when a
    side has one value or neither has any spread (then ``note`` says which)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    result = {"diff": ma - mb, "t": None, "df": None, "p": None, "note": None}
    if sa is None or sb is None:
        result["note"] = f"not testable with n = {len(a)} and {len(b)} (needs two runs of each)"
        return result
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        result["note"] = ("identical in every run" if ma == mb else
                          "no spread within either variant: the same difference in every run, t undefined")
        return result
    result["t"] = (ma - mb) / math.sqrt(va + vb)
    result["df"] = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0) + (vb * vb / (len(b) - 1) if vb else 0))
    result["p"] = t_two_sided_p(result["t"], result["df"])
    return result


def paired(a: list[float], b: list[float]) -> dict:
    """The paired t-test of a[i] - b[i] (runs of the same seed: same initial weights, same batches); the keys
    of :func:`welch`."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    result = {"diff": mean, "t": None, "df": None, "p": None, "note": None}
    if std is None:
        result["note"] = "not testable with one seed in common"
    elif std == 0:
        result["note"] = "identical in every run" if mean == 0 else "the same difference in every seed, t undefined"
    else:
        result["t"], result["df"] = mean / (std / math.sqrt(len(diffs))), len(diffs) - 1
        result["p"] = t_two_sided_p(result["t"], result["df"])
    return result


# ---------------------------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def cell(values: list[float], spec: str) -> str:
    """``mean ± std`` (``mean`` alone for one value, ``–`` for none)."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def statement(name_a: str, name_b: str, label: str, spec: str, better: str, a: dict[int, float],
              b: dict[int, float]) -> str:
    """One comparison of a metric, ``a`` and ``b`` by seed: means ± std, Welch's test over the runs and, on the
    seeds both have (the same initial weights and batches), the paired test."""
    if not a or not b:
        return f"{label}: not compared, no runs of {name_b if a else name_a} with it"
    w = welch(list(a.values()), list(b.values()))
    text = (f"{label}: {name_a} {cell(list(a.values()), spec)} vs {name_b} {cell(list(b.values()), spec)} "
            f"(n = {len(a)}, {len(b)}); difference {format(w['diff'], '+' + spec)}; ")
    text += "Welch: " + verdict(w, name_a, name_b, better)
    common = sorted(a.keys() & b.keys())
    if len(common) >= 2:
        test = paired([a[s] for s in common], [b[s] for s in common])
        text += f"; paired by seed (n = {len(common)}): " + verdict(test, name_a, name_b, better)
    return text


def verdict(test: dict, name_a: str, name_b: str, better: str) -> str:
    if test["p"] is None:
        return test["note"]
    ahead = name_a if (test["diff"] > 0) == (better == "higher") else name_b
    return (f"t = {test['t']:.2f}, df = {test['df']:.1f}, p = {test['p']:.3f}: " +
            (f"**significant** at {ALPHA:.0%}, {ahead} better" if test["p"] < ALPHA else
             f"not significant at {ALPHA:.0%}"))


def report(runs: list[Run], variants: list[str], seeds: list[int], results: Path, figures: list[str]) -> str:
    complete = [r for r in runs if not r.missing]
    names = dict.fromkeys([*variants, *(r.variant for r in runs)])  # the expected ones first, in their order
    by_variant = {v: [r for r in runs if r.variant == v] for v in names}
    train_len = max((r.args.get("seq_len", 0) for r in runs), default=0) or None
    beyond = max((int(k.split("@")[1]) for r in runs for k in r.metrics if "@" in k), default=0)
    lengths = {"train": train_len or "?", "beyond": beyond if train_len and beyond > train_len else "?"}

    def values(v: str, key: str) -> list[float]:
        return list(by_seed(v, key).values())

    def by_seed(v: str, key: str) -> dict[int, float]:
        return {r.seed: r.metrics[key] for r in by_variant.get(v, []) if key in r.metrics}

    shown = results.resolve().relative_to(ROOT) if results.resolve().is_relative_to(ROOT) else results
    lines = ["# Dense vs HHST vs homogeneous HHST, over seeds (issue 23)", "",
             f"Aggregated {datetime.date.today()} from {len(runs)} run(s) in `{shown}` ({len(complete)} complete) by "
             f"`python benchmarks/train_quality_seeds.py`; runs made by `bash benchmarks/train_quality_seeds.sh`.", ""]
    expected = [f"{v}-s{s}" for s in seeds for v in variants]
    present = {r.path.name for r in runs}
    missing = [name for name in expected if name not in present]
    partial = sorted(p.name for p in results.glob("*.partial"))
    if missing or partial or len(complete) < len(runs):
        lines += ["**Missing**: " + (", ".join(missing) if missing else "none of the expected runs") +
                  (f"; killed or in progress: {', '.join(partial)}" if partial else "") +
                  "".join(f"; {r.path.name} lacks {', '.join(r.missing)}" for r in runs if r.missing) + ".", ""]
    lines += setup_lines(runs)
    lines += ["## Mean ± std over seeds", "",
              "| variant | n | " + " | ".join(label.format(**lengths) for _, label, _, _ in METRICS) + " |",
              "|---|---:|" + "---:|" * len(METRICS)]
    for v, rs in by_variant.items():
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cell(values(v, key), spec) for key, _, spec, _ in METRICS)
                     + " |")
    for title, prefix, spec in [("Passkey accuracy by length (depths < 100%)", "passkey", ".3f"),
                                ("Held-out loss by length", "heldout", ".4f")]:
        ns = sorted({int(k.split("@")[1]) for r in runs for k in r.metrics if k.startswith(prefix + "@")})
        if ns:
            marks = [f"{n}" + (" (beyond training)" if train_len and n > train_len else "") for n in ns]
            lines += ["", f"## {title}", "", "| variant | " + " | ".join(marks) + " |", "|---|" + "---:|" * len(ns)]
            lines += [f"| {v} | " + " | ".join(cell(values(v, f"{prefix}@{n}"), spec) for n in ns) + " |"
                      for v in by_variant]
    lines += ["", "## The claims", "",
              f"Two-sided t-tests at {ALPHA:.0%}: Welch's over the runs of each variant, and paired by seed (a seed "
              "gives every variant the same initial weights and batches, so the per-seed difference removes that "
              "share of the noise). With 3 seeds a difference must be about three standard deviations (of the runs, "
              "or of the per-seed differences) to reach it: *not significant* means these runs cannot tell, not that "
              "the variants are equal.", ""]
    labels = {key: (label.format(**lengths), spec, better) for key, label, spec, better in METRICS}
    for title, a, b, keys in CLAIMS:
        lines += [f"**{title}**", ""]
        lines += [f"* {statement(a, b, *labels[k], by_seed(a, k), by_seed(b, k))}" for k in keys]
        lines.append("")
    lines += ["## Every run", "", "| run | " + " | ".join(label.format(**lengths) for _, label, _, _ in METRICS) +
              " | wall s | device | commit |", "|---|" + "---:|" * len(METRICS) + "---:|---|---|"]
    for r in sorted(runs, key=lambda r: (r.variant, r.seed)):
        lines.append(f"| {r.path.name} | " + " | ".join(fmt(r.metrics.get(key), spec) for key, _, spec, _ in METRICS) +
                     f" | {fmt(r.meta.get('wall_s'), '.0f')} | {r.meta.get('device', '–')} | "
                     f"{r.meta.get('commit', '–')} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def setup_lines(runs: list[Run]) -> list[str]:
    """The shared settings, and any that differ between runs (a warning: such runs are not comparable)."""
    ignore = {"out", "seed", "variants", "device", "func", "command"}
    keys = sorted({k for r in runs for k in r.args} - ignore)
    shared = {k: r.args.get(k) for r in runs[:1] for k in keys}
    differ = [k for k in keys if len({json.dumps(r.args.get(k)) for r in runs if r.args}) > 1]
    lines = []
    if shared:
        lines += ["Settings: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in shared.items() if k not in differ) + "."]
        metas = [r.meta for r in runs if r.meta]
        if metas:
            seen = sorted({f"{m.get('device')}, torch {m.get('torch')}, triton {m.get('triton')}, transformers "
                           f"{m.get('transformers')}" for m in metas})
            lines += ["", "Machines: " + "; ".join(seen) + "."]
            shared_gpu = sorted(r.path.name for r in runs if r.meta.get("jobs", 1) > 1)
            if shared_gpu:
                lines += ["", f"Tokens/s only from runs that had the GPU alone: {', '.join(shared_gpu)} trained "
                          "beside other runs on one GPU (`JOBS` > 1), so their speed is left out."]
    if differ:
        lines += ["", "**Warning**: the runs differ in " + ", ".join(
            f"{k} ({', '.join(sorted({json.dumps(r.args.get(k)) for r in runs if r.args}))})" for k in differ) +
            "; their numbers are not comparable."]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- figures
def plot_losses(runs: list[Run], path: Path) -> Path | None:
    """Training loss and answer-token accuracy (EMA) against tokens: each variant's mean over seeds, with a
    band of ± one standard deviation; ``None`` without matplotlib or logs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from s2attn.apps.train import _ema as ema
    curves: dict[str, list[list[dict]]] = {}
    for r in runs:
        if r.log:
            curves.setdefault(r.variant, []).append(r.log)
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, logs in curves.items():
        steps = min(len(log) for log in logs)
        tokens = [row["tokens"] for row in logs[0][:steps]]
        for ax, key in zip(axes, ("loss", "answer_acc")):
            smooth = [ema([row[key] for row in log[:steps]]) for log in logs]
            stats = [mean_std(list(col)) for col in zip(*smooth)]
            mean = [m for m, _ in stats]
            line, = ax.plot(tokens, mean, label=f"{variant} (n={len(logs)})")
            if len(logs) > 1:
                ax.fill_between(tokens, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(),
                                alpha=0.25, linewidth=0)
    axes[0].set(yscale="log", title="training loss (EMA), mean ± std over seeds")
    axes[1].set(title="answer-token accuracy (EMA)")
    for ax in axes:
        ax.set(xlabel="tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_needle(runs: list[Run], path: Path) -> Path | None:
    """One heatmap per variant, the mean over its seeds (runs with another grid than the first are left out)."""
    import torch

    from s2attn.apps import needle

    cells = next((r.needle for r in runs if r.needle), None)
    if cells is None:
        return None
    lengths, depths = sorted({n for n, _ in cells}), sorted({d for _, d in cells})
    grids = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        same = [r.needle for r in runs if r.variant == variant and set(r.needle) == set(cells)]
        if same:
            grid = torch.tensor([[sum(g[n, d] for g in same) / len(same) for d in depths] for n in lengths])
            grids[f"{variant} (mean of {len(same)})"] = grid
    return needle.plot_heatmaps(grids, lengths, depths, path)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/train_quality_seeds",
                   help="directory of the <variant>-s<seed>/ runs; results.md and the figures go there")
    p.add_argument("--variants", default="dense,hhst,homo", help="the variants expected (missing ones are named)")
    p.add_argument("--seeds", default="0,1,2", help="the seeds expected")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"--results={str(args.results)!r}: no such directory")
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [read_run(d) for d in sorted(args.results.iterdir()) if d.is_dir() and RUN_NAME.fullmatch(d.name)]
    figures = [f.name for f in (plot_losses(runs, args.results / "loss_curves.png"),
                                plot_needle(runs, args.results / "needle.png")) if f]
    text = report(runs, variants, seeds, args.results, figures)
    (args.results / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
