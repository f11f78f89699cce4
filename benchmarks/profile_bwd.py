"""Per-kernel GPU times of s2attn's forward and backward under tile / chunk variants.

    python benchmarks/profile_bwd.py --seqlens 32768,131072

Each variant runs forward + backward a few times under torch.profiler and reports the mean CUDA
time of each kernel (forward, dQ, dK/dV: its long-column pass + the rest), so a slow backward can be pinned
on one kernel before anything is tuned.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from s2attn import ops
from s2attn.kernels.plan import Tiles, plan_overrides
from s2attn.patterns import local_stride


def kernel_times(seqlen, heads=32, dim=128, block=64, reps=3, show_all=False):
    pat = local_stride(heads, seqlen, block, 512 // block, 16)  # local 512 tokens, stride 16 blocks
    q, k, v = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    run = lambda: ops.attention(q, k, v, pat, softmax_scale=dim**-0.5, causal=True, layout="bshd",  # noqa: E731
                                return_lse=False)
    out = run()
    g = torch.randn_like(out)
    out.backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run().backward(g)
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        name = e.key
        for kname in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv_long", "_attn_bwd_dkdv"):
            if name.startswith(kname):
                times[kname] = times.get(kname, 0) + e.device_time_total / reps / 1e3
                break
    other = sum(e.device_time_total for e in prof.key_averages()) / reps / 1e3 - sum(times.values())
    if show_all:  # every kernel, to pin down the time outside our three
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
            print(f"  {e.device_time_total / reps / 1e3:8.2f} ms  x{e.count // reps:<3} {e.key[:90]}")
    times["other"] = other
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="32768,131072")
    ap.add_argument("--only", default="", help="comma-separated substrings: run the variants whose name has one")
    ap.add_argument("--all-kernels", action="store_true", help="list every kernel's time under each variant")
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, in alternation")
    ap.add_argument("--block", type=int, default=64, help="the pattern's block size")
    a = ap.parse_args()
    T = Tiles
    triton_long = {"warp_specialised": {"dkdv_long": False}}  # variants of the Triton kernels (plan_overrides)
    triton_dq = {"warp_specialised": {"dq": False}}
    variants = [("default", {}, {}), ("triton long pass", {}, triton_long), ("triton dq", {}, triton_dq),
                ("ws dq stages3", {}, {"ws_dq_stages": 3}),
                ("ws dq everywhere", {}, {"ws_dq_from": 0}), ("ws long stages3", {}, {"ws_tiles": T(64, 128, 12, 3)})]
    ws_fwd = {"warp_specialised": {"fwd": True}}  # the Gluon forward (off by default), and its settings
    variants += [("ws fwd", {}, ws_fwd), ("ws fwd no pingpong", {}, {**ws_fwd, "ws_fwd_pingpong": False}),
                 ("ws fwd stages3", {}, {**ws_fwd, "ws_fwd_tiles": T(128, 128, 4, 3)}),
                 ("ws fwd bn64 stages3", {}, {**ws_fwd, "ws_fwd_tiles": T(128, 64, 4, 3)})]
    for off in ("fwd", "dq", "dkdv"):  # one kernel back on plain loads
        variants.append((f"no TMA {off}", {}, {"use_tma": {off: False}, **(triton_dq if off == "dq" else {})}))
    for bm, bn, w, st in [(32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 4)]:
        variants.append((f"long bm{bm} bn{bn} w{w} s{st}", {"dkdv_long": T(bm, bn, w, st)}, triton_long))
    for bn in (16, 32):  # the short-column kernel's key tile (default: 64 keys, several small blocks to a tile)
        variants.append((f"short bn{bn}", {"dkdv": T(32, bn, 4, 3)}, {}))
    # unpaired tiles (TMA loads): 64 queries fit two programs an SM (shared memory), 128 queries one
    for kernel, bm, w, st in [("dq", 64, 4, 2), ("dq", 64, 4, 3), ("dq", 128, 8, 4), ("fwd", 64, 4, 2),
                              ("fwd", 64, 4, 3)]:
        variants.append((f"{kernel} bm{bm} w{w} s{st} unpaired", {kernel: T(bm, 64, w, st)}, triton_dq))
    for splits in (2, 8):
        variants.append((f"splits{splits}", {}, {"dkdv_splits": splits}))
    wanted = [x for x in a.only.split(",") if x]
    variants = [v for v in variants if not wanted or any(x in v[0] for x in wanted)]
    print("| seqlen | variant | fwd | dq | dkdv (long + short) | other | bwd total |")
    print("|---|---|---|---|---|---|---|")
    for seqlen in [int(s) for s in a.seqlens.split(",")]:
        for name, tiles, settings in variants * a.rounds:
            try:
                with plan_overrides(tiles=tiles, **settings):
                    t = kernel_times(seqlen, block=a.block, show_all=a.all_kernels)
                long, short = t.get("_attn_bwd_dkdv_long", 0), t.get("_attn_bwd_dkdv", 0)
                bwd = t.get("_attn_bwd_dq", 0) + long + short + t["other"]
                print(f"| {seqlen} | {name} | {t.get('_attn_fwd', 0):.2f} | {t.get('_attn_bwd_dq', 0):.2f} | "
                      f"{long + short:.2f} ({long:.2f} + {short:.2f}) | {t['other']:.2f} | {bwd:.2f} |", flush=True)
            except Exception as e:
                print(f"| {seqlen} | {name} | failed: {e!r:.150} |", flush=True)


if __name__ == "__main__":
    main()
