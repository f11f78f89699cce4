"""The ``s2attn`` command: ``demo``, ``patterns``, ``bench``, and subcommands contributed by feature modules.

The options every command shares (pattern, device, output) and the one-line errors are in
:mod:`.options`; a command's module is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import __version__
from .options import (DEFAULT_BLOCK, DEFAULT_HEADS, DEFAULT_LOCAL_TOKENS, DEFAULT_STRIDE, Parser, UsageError,
                      add_pattern_options, output_dir, pattern_options, positive_int)

# Subcommands defined in other modules: name -> (module, one-line help). The module defines
# ``add_parser(subparsers) -> argparse.ArgumentParser``, which adds the subcommand under the same name
# and sets ``func`` (``args -> exit code``) as a default. It is imported only when its subcommand runs,
# so ``s2attn --help`` and ``s2attn patterns`` stay fast. Add one line here per feature.
FEATURE_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("s2attn.apps.train", "train dense / HHST / homogeneous models on synthetic data and compare them"),
    "needle": ("s2attn.apps.needle", "passkey retrieval accuracy over context lengths x needle depths"),
}

# ---------------------------------------------------------------- pattern figures
# local_stride arguments as the options that set them, for the settings `patterns` suggests
OPTION_OF = {"vert_stride": "--stride", "head_step": "--head-step", "num_dense_heads": "--dense-kv-heads"}


def describe(pattern, seq_len: int) -> list[str]:
    """The figures ``demo`` and ``patterns`` print for ``pattern`` at a context of ``seq_len`` tokens; when
    it is not union complete, why, and the nearest settings that are (with what they cost).

    Everything here is closed form for rule patterns: a million tokens take milliseconds.
    """
    from ..coverage import explain, nearest_union_complete

    B = pattern.block_size
    n = pattern.num_blocks(seq_len)
    last_row = pattern.blocks_per_row(seq_len)[:, -1].float()
    why = explain(pattern, seq_len)
    yes_no = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        repr(pattern).splitlines()[0],
        f"  context              {seq_len:,} tokens = {n:,} blocks of {B}",
        f"  density              {pattern.density(seq_len):.2%} of the {'causal ' if pattern.causal else ''}"
        f"blocks computed (dense attention: 100%)",
        f"  last query block     reads {_min_mean_max(last_row, '{:.0f}')} of {n:,} key blocks (min/mean/max over heads)",
        f"  union complete       {yes_no(why is None)}"
        f"  (the heads together cover every key block each query block may see)",
    ]
    if why is not None:
        lines += textwrap.wrap(f"why: {why}", 110, initial_indent=" " * 23, subsequent_indent=" " * 28)
        nearest = nearest_union_complete(pattern, seq_len)
        lines.append(" " * 23 + ("union complete instead:" if nearest else
                                 "no union-complete local-stride setting short of dense attention"))
        for change, alt in nearest:
            options = " ".join("without --homogeneous" if k == "homogeneous" else f"{OPTION_OF[k]} {v}"
                               for k, v in change.items())
            lines.append(f"{' ' * 25}{options}  ({_cost(alt, seq_len)})")
    lines.append(f"  KV-cache efficient   {yes_no(pattern.is_kv_cache_efficient(seq_len))}"
                 f"  (a key block a head skips once is never read by that head again)")
    if pattern.causal:
        kept = pattern.kv_tokens_kept(seq_len).double()
        lines.append(f"  KV tokens kept/head  {_min_mean_max(kept, '{:,.0f}')} tokens = "
                     f"{_min_mean_max(100 * kept / seq_len, '{:.1f}')} % of dense (min/mean/max)")
    else:
        lines.append("  KV tokens kept/head  n/a (bidirectional patterns have no KV cache)")
    return lines


def _cost(pattern, seq_len: int) -> str:
    """Density, and for causal patterns the KV tokens a head keeps, at ``seq_len`` tokens."""
    text = f"density {pattern.density(seq_len):.2%}"
    if pattern.causal:
        text += f", KV kept/head {float(pattern.kv_tokens_kept(seq_len).double().mean()) / seq_len:.1%} of dense"
    return text


def _min_mean_max(x: torch.Tensor, fmt: str) -> str:
    return " / ".join(fmt.format(float(v)) for v in (x.min(), x.mean(), x.max()))


def kv_capacity(pattern, seq_len: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                memory_gib: float) -> list[str]:
    """What one ``seq_len``-token sequence's KV cache takes with ``pattern`` in every layer (bf16), and
    how many such sequences fit in ``memory_gib`` GiB, against a dense cache."""
    from ..inference import sequences_that_fit

    fit = sequences_that_fit(int(memory_gib * 2**30), seq_len, pattern, num_layers=layers, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim)
    return [f"  KV cache/sequence    {fit['bytes_per_sequence_sparse'] / 2**30:.2f} GiB (dense "
            f"{fit['bytes_per_sequence_dense'] / 2**30:.2f} GiB): {layers} layers x {kv_heads} kv heads x "
            f"head_dim {head_dim}, bf16",
            f"  sequences in {memory_gib:g} GiB  {fit['sparse']:,} (dense {fit['dense']:,}), KV cache only"]


# ---------------------------------------------------------------- s2attn patterns
def _add_patterns(sub) -> None:
    p = sub.add_parser("patterns", help="print density, union completeness and KV-cache figures of a pattern",
                       description="Print the figures of a local-stride pattern at one context length "
                                   "(closed form: a million tokens answer in seconds). When the pattern is "
                                   "not union complete, say why and which settings nearby are.")
    p.add_argument("--heads", type=positive_int, default=DEFAULT_HEADS, help="query heads")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="kv heads for GQA/MQA (default: --heads)")
    p.add_argument("--seq-len", type=positive_int, default=131072, metavar="TOKENS", help="context length")
    add_pattern_options(p, local=DEFAULT_LOCAL_TOKENS, stride=DEFAULT_STRIDE)
    p.add_argument("--head-step", type=int, default=None, metavar="N",
                   help="stride offset step between kv-head groups (default: max(1, --stride / --kv-heads))")
    p.add_argument("--head-offset", type=int, default=0, metavar="N", help="stride offset of kv-head group 0")
    p.add_argument("--homogeneous", action="store_true", help="the same stride offset for every head")
    p.add_argument("--bidirectional", action="store_true", help="non-causal: symmetric window")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the pattern to this PNG, with matplotlib (default: no plot)")
    g = p.add_argument_group("KV memory (causal patterns)")
    g.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                   help="also print how many --seq-len sequences fit in this many GiB of bf16 KV cache "
                        "(default: not printed)")
    g.add_argument("--layers", type=positive_int, default=32, help="layers, all with this pattern (--kv-memory)")
    g.add_argument("--head-dim", type=positive_int, default=128, help="head dimension (--kv-memory)")
    p.set_defaults(func=_patterns)


def _patterns(args: argparse.Namespace) -> int:
    from ..patterns import local_stride

    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    settings = pattern_options(args, args.heads, kv_heads)
    if args.head_step is not None and args.head_step < 0:
        raise UsageError(f"--head-step={args.head_step}: expected 0 or more")
    if args.kv_memory is not None and (args.kv_memory <= 0 or args.bidirectional):
        raise UsageError(f"--kv-memory={args.kv_memory}: expected a positive size in GiB, for a causal pattern")
    if args.plot:
        _check_plot(args.plot, "--plot")
    pattern = local_stride(args.heads, args.seq_len, num_kv_heads=kv_heads, homogeneous=args.homogeneous,
                           head_step=args.head_step, head_offset=args.head_offset, causal=not args.bidirectional,
                           **settings)
    print("\n".join(describe(pattern, args.seq_len)))
    if args.kv_memory is not None:
        print("\n".join(kv_capacity(pattern, args.seq_len, args.layers, args.heads, kv_heads, args.head_dim,
                                    args.kv_memory)))
    if args.plot:
        print(f"  plot                 {pattern.plot(args.plot, seq_len=args.seq_len)}")
    return 0


def _check_plot(path: str, option: str) -> None:
    """Before any work: matplotlib is installed and the PNG's directory exists (or can be made)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{option}={path!r}: drawing needs matplotlib (pip install 's2attn[plot]')")
    output_dir(Path(path).parent, option)


# ---------------------------------------------------------------- s2attn demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="show the default S2 pattern and check the library against the reference",
                       description="Build the default S2 pattern, print its figures, draw it, run a small "
                                   "forward + backward through s2attn.sparse_attention and compare it with the "
                                   "float64 reference; on a GPU, also run the quick benchmark.")
    p.add_argument("--out", default="s2attn-demo", help="directory for the plot")
    p.add_argument("--seq-len", type=positive_int, default=32768, metavar="TOKENS",
                   help="context length of the figures")
    p.add_argument("--no-bench", action="store_true", help="skip the GPU benchmark")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..patterns import local_stride

    png = output_dir(args.out, "--out") / "pattern.png"
    pattern = local_stride(DEFAULT_HEADS, args.seq_len, DEFAULT_BLOCK, DEFAULT_LOCAL_TOKENS // DEFAULT_BLOCK,
                           DEFAULT_STRIDE)
    print(f"Default S2 pattern: {DEFAULT_HEADS} heads, local {DEFAULT_LOCAL_TOKENS} tokens, every "
          f"{DEFAULT_STRIDE}th block, heterogeneous offsets")
    print("\n".join(describe(pattern, args.seq_len)))
    if importlib.util.find_spec("matplotlib") is None:
        print(f"  plot                 not drawn: matplotlib is not installed (pip install 's2attn[plot]' draws {png})")
    else:
        print(f"  plot                 {pattern.plot(png, seq_len=args.seq_len)}")
    print()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # fp32 on a GPU may use tf32 matmuls (DESIGN.md tolerances); bf16 is what training runs in
    checks = [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)] if cuda else [(torch.float32, 1e-4)]
    ok = all(check_against_reference(device, dtype, tol) for dtype, tol in checks)
    if cuda and not args.no_bench:
        print()
        _run_bench(["--quick"])
    return 0 if ok else 1


def check_against_reference(device: torch.device, dtype: torch.dtype, tol: float) -> bool:
    """Forward + backward of a small GQA problem through ``sparse_attention``, against float64 ``reference_attention``.

    Prints the relative errors ``|x - ref| / |ref|`` of out, dq, dk, dv and PASS/FAIL against ``tol``.
    """
    from ..api import sparse_attention
    from ..ops import use_kernel
    from ..patterns import local_stride
    from ..reference import reference_attention

    batch, seqlen, heads, kv_heads, head_dim, block = 1, 300, 4, 2, 64, 16
    pattern = local_stride(heads, seqlen, block, 2, 4, num_kv_heads=kv_heads)
    gen = torch.Generator().manual_seed(0)
    rand = lambda h: torch.randn(batch, seqlen, h, head_dim, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, grad_out = rand(heads), rand(kv_heads), rand(kv_heads), rand(heads)

    def run(fn: Callable, dev: torch.device, dt: torch.dtype) -> list[torch.Tensor]:
        leaves = [x.to(dev, dt).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, pattern)
        out.backward(grad_out.to(dev, dt))
        return [t.detach().double().cpu() for t in (out, *(x.grad for x in leaves))]

    got = run(sparse_attention, device, dtype)
    ref = run(reference_attention, torch.device("cpu"), torch.float64)
    errors = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]
    passed = all(e <= tol for e in errors)
    path = "Triton kernels" if use_kernel(q.to(device, dtype)) else "PyTorch reference (no GPU, no TRITON_INTERPRET=1)"
    print(f"forward + backward through s2attn.sparse_attention on {device.type}, {str(dtype).removeprefix('torch.')} "
          f"[{path}]: batch {batch}, seq {seqlen}, {heads} heads / {kv_heads} kv heads, head_dim {head_dim}, "
          f"block {block}")
    print("  rel. error vs float64 reference: " + ", ".join(f"{n} {e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), errors))
          + f"  (tolerance {tol:.0e})  {'PASS' if passed else 'FAIL'}")
    return passed


# ---------------------------------------------------------------- s2attn bench
def _add_bench(sub) -> None:
    sub.add_parser("bench", add_help=False, help="GPU benchmarks (s2attn.apps.bench; its own options follow)",
                   ).set_defaults(func=lambda args: _run_bench(args.rest))


def _run_bench(argv: list[str]) -> int:
    return int(importlib.import_module("s2attn.apps.bench").main(argv) or 0)


# ---------------------------------------------------------------- entry point
BUILTIN_COMMANDS: tuple[Callable, ...] = (_add_demo, _add_patterns, _add_bench)


def version() -> str:
    """``s2attn X (torch Y, triton Z, python W)``: what a bug report needs, without importing Triton."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return f"s2attn {__version__} (torch {torch.__version__}, triton {triton}, python {sys.version.split()[0]})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the feature module of ``command`` (if it is one) is imported to add its real options."""
    parser = Parser(prog="s2attn", description="Sparsely-sharded (S2) block-sparse attention.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in BUILTIN_COMMANDS:
        add(sub)
    for name, (module, help_text) in FEATURE_COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as e:  # a feature command whose optional dependency is missing
        if command not in FEATURE_COMMANDS or (e.name or "s2attn").startswith("s2attn"):
            raise
        print(f"s2attn {command}: error: needs the package {e.name!r}, which is not installed "
              f"(pip install 's2attn[all]' installs every optional dependency)", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if command == "bench":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"s2attn {command}: error: {e}", file=sys.stderr)
        return 2
