"""The ``s2attn`` command: ``demo``, ``patterns``, ``bench``, and subcommands contributed by feature modules."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

import torch

# Subcommands defined in other modules: name -> (module, one-line help). The module defines
# ``add_parser(subparsers) -> argparse.ArgumentParser``, which adds the subcommand under the same name
# and sets ``func`` (``args -> exit code``) as a default. It is imported only when its subcommand runs,
# so ``s2attn --help`` and ``s2attn patterns`` stay fast. Add one line here per feature.
FEATURE_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("s2attn.train", "train dense / HHST / homogeneous models on synthetic data and compare them"),
    "needle": ("s2attn.needle", "passkey retrieval accuracy over context lengths x needle depths"),
}

# The paper's default S2 configuration (DESIGN.md, benchmark protocol).
DEFAULT_HEADS, DEFAULT_BLOCK, DEFAULT_LOCAL_TOKENS, DEFAULT_STRIDE = 32, 64, 512, 16


# ---------------------------------------------------------------- pattern figures
def describe(pattern, seq_len: int) -> list[str]:
    """The figures ``demo`` and ``patterns`` print for ``pattern`` at a context of ``seq_len`` tokens.

    Everything here is closed form for rule patterns: a million tokens take milliseconds.
    """
    B = pattern.block_size
    n = pattern.num_blocks(seq_len)
    last_row = pattern.blocks_per_row(seq_len)[:, -1].float()
    yes_no = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        repr(pattern).splitlines()[0],
        f"  context              {seq_len:,} tokens = {n:,} blocks of {B}",
        f"  density              {pattern.density(seq_len):.2%} of the {'causal ' if pattern.causal else ''}"
        f"blocks computed (dense attention: 100%)",
        f"  last query block     reads {_min_mean_max(last_row, '{:.0f}')} of {n:,} key blocks (min/mean/max over heads)",
        f"  union complete       {yes_no(pattern.is_union_complete(seq_len))}"
        f"  (the heads together cover every key block each query block may see)",
        f"  KV-cache efficient   {yes_no(pattern.is_kv_cache_efficient(seq_len))}"
        f"  (a key block a head skips once is never read by that head again)",
    ]
    if pattern.causal:
        kept = pattern.kv_tokens_kept(seq_len).double()
        lines.append(f"  KV tokens kept/head  {_min_mean_max(kept, '{:,.0f}')} tokens = "
                     f"{_min_mean_max(100 * kept / seq_len, '{:.1f}')} % of dense (min/mean/max)")
    else:
        lines.append("  KV tokens kept/head  n/a (bidirectional patterns have no KV cache)")
    return lines


def _min_mean_max(x: torch.Tensor, fmt: str) -> str:
    return " / ".join(fmt.format(float(v)) for v in (x.min(), x.mean(), x.max()))


# ---------------------------------------------------------------- s2attn patterns
def _add_patterns(sub) -> None:
    p = sub.add_parser("patterns", help="print density, union completeness and KV-cache figures of a pattern",
                       description="Print the figures of a local-stride pattern at one context length "
                                   "(closed form: a million tokens answer in seconds).")
    p.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="query heads (default %(default)s)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads for GQA/MQA (default: --heads)")
    p.add_argument("--seq-len", type=int, default=131072, help="context length in tokens (default %(default)s)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK, help="tokens per block (default %(default)s)")
    p.add_argument("--local", type=int, default=DEFAULT_LOCAL_TOKENS,
                   help="local window in tokens, a multiple of --block-size (default %(default)s)")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help="vertical stride in blocks: every stride-th key block (default %(default)s)")
    p.add_argument("--dense-heads", type=int, default=0, help="kv-head groups that attend densely (default 0)")
    p.add_argument("--head-step", type=int, default=None, help="stride offset step between kv-head groups")
    p.add_argument("--head-offset", type=int, default=0, help="stride offset of group 0 (default 0)")
    p.add_argument("--homogeneous", action="store_true", help="the same stride offset for every head")
    p.add_argument("--bidirectional", action="store_true", help="non-causal: symmetric window")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the pattern to this PNG")
    p.set_defaults(func=_patterns)


def pattern_from_args(args: argparse.Namespace):
    from .patterns import local_stride

    if args.local % args.block_size:
        raise ValueError(f"--local={args.local}: expected a multiple of --block-size={args.block_size}")
    return local_stride(args.heads, args.seq_len, args.block_size, args.local // args.block_size, args.stride,
                        num_kv_heads=args.kv_heads, homogeneous=args.homogeneous, num_dense_heads=args.dense_heads,
                        head_step=args.head_step, head_offset=args.head_offset, causal=not args.bidirectional)


def _patterns(args: argparse.Namespace) -> int:
    try:
        pattern = pattern_from_args(args)
    except ValueError as e:
        print(f"s2attn patterns: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(describe(pattern, args.seq_len)))
    if args.plot:
        print(f"  plot                 {pattern.plot(args.plot, seq_len=args.seq_len)}")
    return 0


# ---------------------------------------------------------------- s2attn demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="show the default S2 pattern and check the library against the reference",
                       description="Build the default S2 pattern, print its figures, draw it, run a small "
                                   "forward + backward through s2attn.sparse_attention and compare it with the "
                                   "float64 reference; on a GPU, also run the quick benchmark.")
    p.add_argument("--out", default="s2attn-demo", help="directory for the plot (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=32768, help="context length of the figures (default %(default)s)")
    p.add_argument("--no-bench", action="store_true", help="skip the GPU benchmark")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .patterns import local_stride

    pattern = local_stride(DEFAULT_HEADS, args.seq_len, DEFAULT_BLOCK, DEFAULT_LOCAL_TOKENS // DEFAULT_BLOCK,
                           DEFAULT_STRIDE)
    print(f"Default S2 pattern: {DEFAULT_HEADS} heads, local {DEFAULT_LOCAL_TOKENS} tokens, every "
          f"{DEFAULT_STRIDE}th block, heterogeneous offsets")
    print("\n".join(describe(pattern, args.seq_len)))
    os.makedirs(args.out, exist_ok=True)
    print(f"  plot                 {pattern.plot(os.path.join(args.out, 'pattern.png'), seq_len=args.seq_len)}")
    print()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # fp32 on a GPU may use tf32 matmuls (DESIGN.md tolerances); bf16 is what training runs in
    checks = [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)] if cuda else [(torch.float32, 1e-4)]
    ok = all(check_against_reference(device, dtype, tol) for dtype, tol in checks)
    if cuda and not args.no_bench:
        print()
        _run_bench(["--quick"], required=False)
    return 0 if ok else 1


def check_against_reference(device: torch.device, dtype: torch.dtype, tol: float) -> bool:
    """Forward + backward of a small GQA problem through ``sparse_attention``, against float64 ``reference_attention``.

    Prints the relative errors ``|x - ref| / |ref|`` of out, dq, dk, dv and PASS/FAIL against ``tol``.
    """
    from .api import sparse_attention
    from .ops import use_kernel
    from .patterns import local_stride
    from .reference import reference_attention

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
    sub.add_parser("bench", add_help=False, help="GPU benchmarks (s2attn.bench; its own options follow)",
                   ).set_defaults(func=lambda args: _run_bench(args.rest, required=True))


def _run_bench(argv: list[str], required: bool) -> int:
    """Hand ``argv`` to ``s2attn.bench.main``; without that module, say so (and fail only if ``required``)."""
    try:
        bench = importlib.import_module("s2attn.bench")
    except ModuleNotFoundError as e:
        if e.name != "s2attn.bench":
            raise
        print("s2attn: the benchmark module s2attn.bench is not available in this installation "
              "(the Triton kernels and their benchmarks are in progress).", file=sys.stderr)
        return 2 if required else 0
    return int(bench.main(argv) or 0)


# ---------------------------------------------------------------- entry point
BUILTIN_COMMANDS: tuple[Callable, ...] = (_add_demo, _add_patterns, _add_bench)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the feature module of ``command`` (if it is one) is imported to add its real options."""
    parser = argparse.ArgumentParser(prog="s2attn", description="Sparsely-sharded (S2) block-sparse attention.")
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
        print(f"s2attn {command}: needs the package {e.name!r}, which is not installed "
              f"(pip install 's2attn[all]' installs every optional dependency)", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if command == "bench":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)
