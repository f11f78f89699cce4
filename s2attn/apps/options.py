"""Command-line plumbing every command shares: one-line errors, argument types, and the pattern options.

Every command takes its pattern in the same units (:func:`add_pattern_options`): ``--local`` in
tokens, ``--stride`` as "every N-th key block", ``--block-size`` in tokens. A bad value ends the
command with one line naming the option (exit code 2): argparse's own checks through
:class:`Parser`, the checks that need several options through :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..patterns import BLOCK_SIZES

# The paper's default S2 configuration (README, "Performance").
DEFAULT_HEADS, DEFAULT_BLOCK, DEFAULT_LOCAL_TOKENS, DEFAULT_STRIDE = 32, 64, 512, 16


# ---------------------------------------------------------------- parsing
class UsageError(Exception):
    """A bad command-line value found after parsing: :func:`.cli.main` prints ``s2attn COMMAND: error: MESSAGE``
    on one line and returns 2. The message names the option, its value and what was expected."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstring descriptions as written; every option's default appended to its help (options whose
    default is ``None`` say in words what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse`` with :class:`HelpFormatter` and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text) if text.strip().lstrip("+-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def int_list(text: str) -> list[int]:
    """``argparse`` type: comma-separated integers (empty allowed)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def existing_file(text: str) -> str:
    """``argparse`` type: a path to an existing file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return text


def existing_path(text: str) -> str:
    """``argparse`` type: a path to an existing file or directory."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or directory")
    return text


def torch_device(text: str) -> str:
    """``argparse`` type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a torch device such as cpu or cuda") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                             f"{torch.__version__}); expected cpu")
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu or cuda")
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def output_dir(path: str | os.PathLike, option: str) -> Path:
    """Create directory ``path`` (and its parents) for the output option ``option``, or raise :class:`UsageError`."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option}={str(path)!r}: cannot create this directory ({e.strerror or e})") from None
    return Path(path)


def add_pattern_options(p: argparse.ArgumentParser, *, local: int, stride: int, dense_kv_heads: bool = True) -> None:
    """The local-stride options every subcommand shares, in the same units everywhere."""
    g = p.add_argument_group("pattern (local-stride, README: Choosing a pattern)")
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK, choices=BLOCK_SIZES, metavar="TOKENS",
                   help=f"tokens per block, one of {', '.join(map(str, BLOCK_SIZES))}")
    g.add_argument("--local", type=positive_int, default=local, metavar="TOKENS",
                   help="local window in tokens, a multiple of --block-size")
    g.add_argument("--stride", type=positive_int, default=stride, metavar="N",
                   help="vertical stride: every N-th key block, the offset rotated across kv-head groups")
    if dense_kv_heads:
        g.add_argument("--dense-kv-heads", type=int, default=0, metavar="N",
                       help="the last N kv heads, with all their query heads, attend densely")


def pattern_options(args: argparse.Namespace, heads: int, kv_heads: int) -> dict:
    """The :func:`s2attn.local_stride` keyword arguments of :func:`add_pattern_options` (``block_size``,
    ``local_blocks``, ``vert_stride``, ``num_dense_heads``), checked against each other and the head counts."""
    if heads % kv_heads:
        raise UsageError(f"--kv-heads={kv_heads}: expected a divisor of --heads={heads}")
    if args.local % args.block_size:
        raise UsageError(f"--local={args.local}: expected a multiple of --block-size={args.block_size} (tokens)")
    settings = dict(block_size=args.block_size, local_blocks=args.local // args.block_size, vert_stride=args.stride)
    if hasattr(args, "dense_kv_heads"):
        if not 0 <= args.dense_kv_heads <= kv_heads:
            raise UsageError(f"--dense-kv-heads={args.dense_kv_heads}: expected 0 to --kv-heads={kv_heads}")
        settings["num_dense_heads"] = args.dense_kv_heads
    return settings
