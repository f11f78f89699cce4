"""Host cost of planning context parallelism: time and peak RSS of rank 0, each case in a fresh process.

    python benchmarks/plan_cost.py                          # 128k, 512k, 1M tokens on 2, 4, 8 ranks
    python benchmarks/plan_cost.py --repo /path/to/checkout # the same, measuring another checkout's s2attn

"Planning" is all the host work before the first attention of :func:`context_parallel_attention` can run
for one shape: the exchange plan (``_plan_for``) and what its first call builds from it before
attending. For a checkout whose chunks carry a packed mask pattern (before issue 22), that is the mask
and the kernels' CSR tables (built on the host, here for the CPU); for one whose chunks carry a block
map, the token gather indices. No process group and no GPU: rank 0's view is computed directly.

Default pattern: 32 query / 32 kv heads, block 64, local 8 blocks, vert_stride 16, causal. Each row: wall
seconds, peak RSS of the process, and the planning's own share (peak RSS minus the RSS before planning,
after importing torch and s2attn). The log-log slope is from the smallest to the largest length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

KIB = 1024


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _one(args) -> dict:
    """Runs in the child: plan rank 0 once, report seconds and RSS."""
    sys.path.insert(0, os.path.abspath(args.repo))
    import torch

    import s2attn
    from s2attn import local_stride
    from s2attn.integrations import distributed as cp

    torch.set_num_threads(args.threads)
    pattern = local_stride(args.heads, args.seq, args.block, args.local_blocks, args.vert_stride,
                           num_kv_heads=args.kv_heads)
    before = _rss_kib()
    start = time.perf_counter()
    plan = cp._plan_for(pattern, args.seq, args.world, 0, args.heads, args.kv_heads, True)
    if hasattr(plan, "send_runs"):  # block map (issue 22): the gather indices the first call builds
        plan.send_index()
        received = sum(plan.recv_splits)
        for chunk in plan.chunks:
            chunk.gather_index(received)
    else:  # packed mask pattern: the mask and the kernels' tables the first call builds
        from s2attn.kernels import launch
        from s2attn.tables import block_tables

        for chunk in plan.chunks:
            packed = chunk.pattern
            block_tables(packed, packed.max_seq_len, launch.TABLE_BLOCK_M, torch.device("cpu"))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seq": args.seq, "world": args.world, "seconds": seconds, "peak_kib": peak, "before_kib": before,
            "s2attn": os.path.dirname(s2attn.__file__)}


def _slope(rows: list[dict], key) -> dict:
    out = {}
    for world in sorted({r["world"] for r in rows}):
        pts = sorted((r["seq"], key(r)) for r in rows if r["world"] == world)
        (s0, v0), (s1, v1) = pts[0], pts[-1]
        out[world] = math.log(v1 / v0) / math.log(s1 / s0) if s1 > s0 and v0 > 0 and v1 > 0 else float("nan")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072, 524288, 1048576])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose s2attn is measured (default: this one)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args)))
        return
    rows = []
    for seq in args.seqlens:
        for world in args.worlds:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--seq", str(seq), "--world", str(world)]
            for name in ("heads", "kv_heads", "block", "local_blocks", "vert_stride", "threads", "repo"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            own = (row["peak_kib"] - row["before_kib"]) / KIB
            print(f"{seq:>8} tokens, world {world}: {row['seconds']:7.2f} s, peak RSS "
                  f"{row['peak_kib'] / KIB**2:6.2f} GiB (planning {own:7.1f} MiB)", file=sys.stderr, flush=True)
    worlds = sorted({r["world"] for r in rows})
    print(f"s2attn from {rows[0]['s2attn']}; {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"{args.heads} heads / {args.kv_heads} kv heads, block {args.block}, local {args.local_blocks}, "
          f"stride {args.vert_stride}\n")
    print("| tokens | " + " | ".join(f"world {w}: s, peak RSS GiB, planning MiB" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    for seq in args.seqlens:
        cells = []
        for w in worlds:
            r = next(x for x in rows if x["seq"] == seq and x["world"] == w)
            own = (r["peak_kib"] - r["before_kib"]) / KIB
            cells.append(f"{r['seconds']:.2f} s, {r['peak_kib'] / KIB**2:.2f}, {own:.0f}")
        print(f"| {seq // 1024}k | " + " | ".join(cells) + " |")
    t = _slope(rows, lambda r: r["seconds"])
    m = _slope(rows, lambda r: r["peak_kib"] - r["before_kib"])
    print("| log-log slope | " + " | ".join(f"time {t[w]:.2f}, planning memory {m[w]:.2f}" for w in worlds) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
