"""Issue 22, one GPU: each context-parallel rank's local attention, run rank by rank in one process on its
packed keys, through the kernels' remapped rule path (the key block map) against the table path (a mask over
the packed blocks) and, with ``--reference``, the PyTorch reference: values and gradients, and kernel time.

    python benchmarks/bench_remap.py --seq 131072 524288 --world 2 --reference

Per rank and chunk: the max relative error of out, lse, dq, dk, dv against the table path (and reference), and
the median time of forward and forward + backward on each path (CUDA events; the table path's tables are built
before timing). The issue asks the remap's kernel time to be within 5% of the table path's.
"""

from __future__ import annotations

import argparse
import time

import torch

from s2attn import local_stride
from s2attn.integrations.distributed import _plan_for
from s2attn.reference import reference_attention_remapped
from s2attn.remap import remap_layout, remapped_attention


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    diff = torch.where(a == b, torch.zeros_like(a), a - b)
    return float(diff.norm() / torch.where(b.isfinite(), b, 0).norm().clamp(min=1e-300))


def _step(fn, q, k, v, dout, backward: bool):
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    out, lse = fn(*leaves)
    if not backward:
        return [out, lse]
    (out * dout).sum().backward()
    return [out, lse] + [x.grad for x in leaves]


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--local", type=int, default=8)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="also the PyTorch reference (memory permitting)")
    a = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print("| tokens | rank | chunk | path | fwd ms | fwd+bwd ms | max rel err vs tables (out, lse, dq, dk, dv) |")
    print("|---|---|---|---|---|---|---|")
    for seq in a.seq:
        pattern = local_stride(a.heads, seq, a.block, a.local, a.stride, num_kv_heads=a.kv_heads)
        for rank in range(a.world):
            t0 = time.time()
            plan = _plan_for(pattern, seq, a.world, rank, a.heads, a.kv_heads, True)
            plan_s = time.time() - t0
            for i, chunk in enumerate(plan.chunks):
                g = torch.Generator(device=dev).manual_seed(rank * 10 + i)
                sq = chunk.rows.stop - chunk.rows.start
                q, dout = (torch.randn(1, sq, a.heads, a.head_dim, device=dev, dtype=dtype, generator=g)
                           for _ in range(2))
                k, v = (torch.randn(1, chunk.width, a.kv_heads, a.head_dim, device=dev, dtype=dtype, generator=g)
                        for _ in range(2))
                assert remap_layout(chunk.key_blocks, chunk.a, sq, chunk.width, a.block) is not None
                paths = {
                    "remap": lambda *x: remapped_attention(*x, pattern, chunk.key_blocks, chunk.a, return_lse=True),
                    "tables": lambda *x: remapped_attention(*x, pattern, chunk.key_blocks, chunk.a, return_lse=True,
                                                            via_tables=True),
                }
                if a.reference:
                    paths["reference"] = lambda *x: reference_attention_remapped(
                        *x, pattern, chunk.key_blocks, chunk.a, return_lse=True)
                results = {name: _step(fn, q, k, v, dout, True) for name, fn in paths.items()}
                for name, fn in paths.items():
                    fwd = _time(lambda: _step(fn, q, k, v, dout, False), a.reps)
                    both = _time(lambda: _step(fn, q, k, v, dout, True), a.reps)
                    errs = ", ".join(f"{_rel(x, y):.1e}" for x, y in zip(results[name], results["tables"]))
                    print(f"| {seq} | {rank} | {i} (plan {plan_s:.1f} s) | {name} | {fwd:.2f} | {both:.2f} | {errs} |",
                          flush=True)


if __name__ == "__main__":
    main()
