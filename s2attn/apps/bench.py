"""``s2attn bench``: s2attn's kernels beside the ones users would use instead (README, "Performance").

bf16, causal, batch 1, ``triton.testing.do_bench`` median (warm-up 25 ms, rep 100 ms) after a
warm-up call; forward and backward timed separately (backward: the backward call alone, on a
retained graph). Providers, all in the same run:

* ``s2attn``: our kernels on the local-stride pattern;
* ``sdpa-flash`` / ``sdpa-cudnn``: dense causal attention through PyTorch SDPA backends;
* ``flex-same``: FlexAttention on the identical pattern (it tiles by 128: partial tiles masked);
* ``flex-128``: FlexAttention on the same rule built with 128-token blocks (its best case);
* ``flex-fa4-128`` / ``flex-fa4-same``: the same two on FlexAttention's FlashAttention-4 backend
  (``kernel_options={"BACKEND": "FLASH"}``; needs ``flash-attn-4``: ``scripts/fa4_wheels.sh``);
* ``fa4``: dense causal FlashAttention-4 (``flash_attn.cute.flash_attn_func``).

A provider that cannot run here (a package missing) is a row with the one-line reason, not an error.

Effective TFLOP/s counts the FLOPs of the blocks each provider must compute for *its* pattern
(dense causal for SDPA): 4·d per allowed (query, key) pair forward, 2.5× that backward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..kernels.plan import plan_overrides
from ..patterns import BlockPattern, local_stride
from .options import Parser, add_pattern_options, int_list, output_dir, pattern_options, positive_int

FWD_FLOPS_PER_PAIR = 4  # QK^T and PV, 2 FLOPs per multiply-add, times head_dim
BWD_FACTOR = 2.5  # five matmuls backward vs two forward


@dataclass
class Row:
    seqlen: int
    provider: str
    fwd_ms: float
    bwd_ms: float
    fwd_tflops: float
    bwd_tflops: float
    density: float
    note: str = ""


def _pairs(pattern: BlockPattern | None, seqlen: int, heads: int) -> float:
    """Allowed (query, key) pairs over all heads, at block granularity (causal diagonal halved)."""
    if pattern is None:
        return heads * seqlen * (seqlen + 1) / 2
    blocks = pattern.blocks_per_row(seqlen).sum().item() * (heads // pattern.pattern_heads)
    n = pattern.num_blocks(seqlen)
    diag = heads * n * pattern.block_size**2 / 2  # diagonal blocks are half-computed
    return blocks * pattern.block_size**2 - diag


def _time(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _spin_up(seconds: float = 2.0) -> None:
    """Bf16 matrix products for a couple of seconds, so the first measurement does not catch the
    GPU at idle clocks (an 8k forward measured first read 0.72 ms once, 0.50 ms after others)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def _measure(run_fwd, q, k, v) -> tuple[float, float]:
    """Median ms of the forward, and of the backward alone."""
    out = run_fwd(q, k, v)
    grad = torch.randn_like(out)
    out.backward(grad, retain_graph=True)  # warm-up (compiles)
    torch.cuda.synchronize()
    fwd = _time(lambda: run_fwd(q, k, v))
    bwd = _time(lambda: out.backward(grad, retain_graph=True))
    return fwd, bwd


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _flex(block_mask, backend: str | None):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    options = {"BACKEND": backend} if backend else None
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, kernel_options=options)


def _fa4(q, k, v):
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out


PROVIDERS = ("s2attn", "sdpa-flash", "sdpa-cudnn", "flex-128", "flex-same", "flex-fa4-128", "flex-fa4-same", "fa4")
DEFAULT_PROVIDERS = "s2attn,sdpa-flash,sdpa-cudnn,flex-128,flex-same"


class Unavailable(Exception):
    """A provider that cannot run on this machine (its row says why)."""


def _available(name: str) -> None:
    import importlib.util

    if name == "fa4" or name.startswith("flex-fa4"):
        if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
            raise Unavailable("flash_attn.cute (flash-attn-4) is not installed: scripts/fa4_wheels.sh")


def _provider(name: str, seqlen: int, pat, pat128):
    """Provider ``name``'s forward ``(q, k, v) -> out``, the layout it takes (``"bshd"`` or ``"bhsd"``) and the
    pattern it computes (``None``: dense); ``pat`` is the s2attn pattern, ``pat128`` the same rule in 128-token
    blocks (FlexAttention's best case)."""
    from torch.nn.attention import SDPBackend

    from ..api import sparse_attention

    if name == "s2attn":
        return (lambda a, b, c: sparse_attention(a, b, c, pat)), "bshd", pat
    if name.startswith("sdpa"):
        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION
        return _sdpa(backend), "bhsd", None
    if name == "fa4":
        return _fa4, "bshd", None
    used = pat128 if name.endswith("-128") else pat  # flex-128, flex-same, flex-fa4-128, flex-fa4-same
    backend = "FLASH" if name.startswith("flex-fa4") else None
    return _flex(used.to_flex_block_mask(seqlen, "cuda"), backend), "bhsd", used


def run(seqlens, heads=32, head_dim=128, local=512, stride=16, block=64, providers=None, out=None,
        progress=print) -> list[Row]:
    providers = providers or DEFAULT_PROVIDERS.split(",")
    rows: list[Row] = []
    dev = "cuda"
    _spin_up()
    for seqlen in seqlens:
        pat = local_stride(heads, seqlen, block, local // block, stride)
        pat128 = local_stride(heads, seqlen, 128, max(1, local // 128), stride)
        shape = (1, seqlen, heads, head_dim)
        q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        for name in providers:
            t0 = time.time()
            try:
                _available(name)
                forward, layout, used = _provider(name, seqlen, pat, pat128)
                fwd, bwd = _measure(forward, *((q, k, v) if layout == "bshd" else (qh, kh, vh)))
                pairs = _pairs(used, seqlen, heads)
                dens = pairs / (heads * seqlen * (seqlen + 1) / 2)
                flops = pairs * FWD_FLOPS_PER_PAIR * head_dim
                row = Row(seqlen, name, fwd, bwd, flops / fwd / 1e9, BWD_FACTOR * flops / bwd / 1e9, dens)
            except Unavailable as e:
                row = Row(seqlen, name, math.nan, math.nan, math.nan, math.nan, math.nan, f"skipped: {e}")
            except Exception as e:  # a peer failing (OOM, compile) is a result too
                row = Row(seqlen, name, math.nan, math.nan, math.nan, math.nan, math.nan, f"failed: {e!r}"[:200])
            torch.cuda.empty_cache()
            rows.append(row)
            progress(f"{seqlen:>7} {name:<11} fwd {row.fwd_ms:9.3f} ms  bwd {row.bwd_ms:9.3f} ms  "
                     f"({time.time() - t0:.0f}s) {row.note}")
            if out:
                _save(rows, out)
        del q, k, v, qh, kh, vh
    return rows


def environment() -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "cuda": torch.version.cuda}


def _save(rows: list[Row], path: str) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rows": [asdict(r) for r in rows]}, f, indent=1)


def table(rows: list[Row]) -> str:
    lines = ["| seqlen | provider | density | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | s2attn speed-up fwd / bwd |",
             "|---|---|---|---|---|---|---|---|"]
    ours = {r.seqlen: r for r in rows if r.provider == "s2attn"}
    for r in rows:
        o = ours.get(r.seqlen)
        speed = f"{r.fwd_ms / o.fwd_ms:.2f}x / {r.bwd_ms / o.bwd_ms:.2f}x" if o and r is not o else ""
        lines.append(f"| {r.seqlen} | {r.provider} | {r.density:.3f} | {r.fwd_ms:.3f} | {r.bwd_ms:.3f} | "
                     f"{r.fwd_tflops:.0f} | {r.bwd_tflops:.0f} | {speed} {r.note} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("fwd_ms", "bwd_ms"), ("forward", "backward")):
        for prov in dict.fromkeys(r.provider for r in rows):
            pts = [(r.seqlen, getattr(r, key)) for r in rows if r.provider == prov and not math.isnan(getattr(r, key))]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=prov)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def providers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in PROVIDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {', '.join(unknown) or '(none given)'}: "
                                         f"expected some of {', '.join(PROVIDERS)}")
    return names


def build_parser() -> Parser:
    p = Parser(prog="s2attn bench", description=__doc__)
    p.add_argument("--seqlens", type=int_list, default="8192,32768,131072", metavar="TOKENS,...",
                   help="comma-separated sequence lengths")
    p.add_argument("--providers", type=providers, default=DEFAULT_PROVIDERS,
                   help=f"comma-separated providers (see above), of {', '.join(PROVIDERS)}")
    p.add_argument("--heads", type=positive_int, default=32, help="query heads (= kv heads)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension")
    add_pattern_options(p, local=512, stride=16, dense_kv_heads=False)
    p.add_argument("--gluon-forward", action="store_true",
                   help="s2attn's forward as the warp-specialised Gluon kernel (sm_90; off by default: "
                        "plan_overrides(warp_specialised={'fwd': True}))")
    p.add_argument("--quick", action="store_true", help="8k and 32k, s2attn and SDPA only")
    p.add_argument("--out", default="s2attn-bench", help="directory for results.json, results.md, plot.png")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    pattern_options(a, a.heads, a.heads)
    if not torch.cuda.is_available():
        print("s2attn bench: error: needs a CUDA GPU (the CPU runs the reference only)", file=sys.stderr)
        return 2
    seqlens = [8192, 32768] if a.quick else a.seqlens
    chosen = ["s2attn", "sdpa-flash", "sdpa-cudnn"] if a.quick else a.providers
    output_dir(a.out, "--out")
    with plan_overrides(warp_specialised={"fwd": a.gluon_forward}):
        rows = run(seqlens, a.heads, a.head_dim, a.local, a.stride, a.block_size, chosen,
                   os.path.join(a.out, "results.json"))
    md = table(rows)
    env = environment()
    header = (f"{env['gpu']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}; "
              f"{a.heads} heads, d={a.head_dim}, bf16, causal, local {a.local}, stride {a.stride}, "
              f"block {a.block_size}{', Gluon forward' if a.gluon_forward else ''}\n\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(header + md + "\n")
    try:
        plot(rows, os.path.join(a.out, "plot.png"))
    except ImportError:
        pass
    print(header + md)
    return 0


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
