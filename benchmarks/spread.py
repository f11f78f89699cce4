"""How much a timing varies, ours against FlexAttention's, and with what the GPU was doing.

    python benchmarks/spread.py --rounds 6                      # 128k forward
    python benchmarks/spread.py --backward --seqlen 32768       # 32k backward
    python benchmarks/spread.py --backward --tiles dq=128,64,8,2,1
    python benchmarks/spread.py --backward --peers flex-128,flex-fa4-128 --gluon-forward --rounds 5

Each round times s2attn and its peers (``--peers``, ``s2attn bench``'s providers; default FlexAttention
with 128-token blocks, its best case) back to back with the benchmark's ``do_bench`` (the backward alone:
repeated ``backward(retain_graph=True)``), while a sampler thread reads the SM clock and the board power
through NVML. ``--gluon-forward`` adds s2attn with the Gluon forward, ``--tiles kernel=bm,bn,warps,stages,
pairs`` s2attn with that tile override, so two configurations meet under the same clocks. At 128k the GPU runs at its power cap and single timings spread by
~10%: this says whether a difference follows the clocks or the code. Last, each contender's median over the
rounds and its ratio to s2attn's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time

import torch

from s2attn.apps import bench
from s2attn.api import sparse_attention
from s2attn.kernels.plan import Tiles, plan_overrides
from s2attn.patterns import local_stride


def _sampler(samples: list, stop: threading.Event, period: float = 0.05) -> None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    while not stop.is_set():
        samples.append((time.time(), pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1000))
        time.sleep(period)


def _timed(fn, samples: list) -> tuple[float, float, float]:
    """Median ms of ``fn``, and the mean SM clock (MHz) and power (W) sampled while it ran."""
    t0 = time.time()
    ms = bench._time(fn)
    during = [s for s in samples if s[0] >= t0]
    return ms, statistics.mean(s[1] for s in during), statistics.mean(s[2] for s in during)


def _contenders(a, q, k, v) -> dict:
    """name -> the call to time: the forward, or the backward alone (over one recorded graph)."""
    n, heads = q.shape[1], q.shape[2]
    pat, pat128 = local_stride(heads, n, 64, 8, 16), local_stride(heads, n, 128, 4, 16)
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_(a.backward) for x in (q, k, v))
    ours = lambda: sparse_attention(q, k, v, pat)  # noqa: E731
    forwards = {"s2attn": (ours, contextlib.nullcontext)}
    for name in a.peers:
        forward, layout, _ = bench._provider(name, n, pat, pat128)
        inputs = (q, k, v) if layout == "bshd" else (qh, kh, vh)
        forwards[name] = (lambda forward=forward, inputs=inputs: forward(*inputs), contextlib.nullcontext)
    if a.gluon_forward:
        forwards["s2attn gluon-fwd"] = (ours, lambda: plan_overrides(warp_specialised={"fwd": True}))
    if a.tiles:
        kernel, spec = a.tiles.split("=")
        bm, bn, w, st, pairs = (int(x) for x in spec.split(","))
        tiles = {kernel: Tiles(bm, bn, w, st, bool(pairs))}
        forwards[f"s2attn {a.tiles}"] = (ours, lambda: plan_overrides(tiles=tiles))
    calls = {}
    for name, (fwd, ctx) in forwards.items():
        if a.backward:
            with ctx():
                out = fwd()
            grad = torch.randn_like(out)

            def call(out=out, grad=grad, ctx=ctx):
                with ctx():
                    out.backward(grad, retain_graph=True)
        else:
            def call(fwd=fwd, ctx=ctx):
                with ctx():
                    return fwd()
        calls[name] = call
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--backward", action="store_true", help="time the backward alone, not the forward")
    ap.add_argument("--peers", type=bench.providers, default="flex-128",
                    help="peer providers of `s2attn bench` to alternate with: flex-128, flex-same, flex-fa4-128, "
                         "flex-fa4-same, fa4 (FlashAttention-4: scripts/fa4_wheels.sh)")
    ap.add_argument("--gluon-forward", action="store_true", help="also s2attn with the Gluon forward")
    ap.add_argument("--tiles", default="", help="kernel=bm,bn,warps,stages,pairs: also s2attn with these tiles")
    a = ap.parse_args()
    unknown = [x for x in a.peers if x == "s2attn" or x.startswith("sdpa")]
    if unknown:
        ap.error(f"--peers: {', '.join(unknown)} is not a sparse peer")
    heads, dim, n = 32, 128, a.seqlen
    q, k, v = (torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=a.backward)
               for _ in range(3))
    calls = _contenders(a, q, k, v)
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    samples: list = []
    stop = threading.Event()
    threading.Thread(target=_sampler, args=(samples, stop), daemon=True).start()
    bench._spin_up()
    what = "backward" if a.backward else "forward"
    print(f"{torch.cuda.get_device_name()}, {n} tokens, {what}; do_bench medians (ms), mean SM clock (MHz) and "
          f"power (W) while timed, every contender once a round")
    names = list(calls)
    print("| round | " + " | ".join(f"{x} ms | MHz | W" for x in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    times: dict[str, list[float]] = {x: [] for x in names}
    for r in range(a.rounds):
        row = {x: _timed(calls[x], samples) for x in names}
        for x, (ms, _, _) in row.items():
            times[x].append(ms)
        print(f"| {r} | " + " | ".join(f"{ms:.2f} | {mhz:.0f} | {w:.0f}" for ms, mhz, w in row.values()) + " |",
              flush=True)
    stop.set()
    ours = statistics.median(times["s2attn"])
    print(f"\nmedian over {a.rounds} rounds (ratio: contender / s2attn, > 1: s2attn faster)\n")
    print("| contender | median ms | min–max ms | ratio |\n|---|---|---|---|")
    for x in names:
        print(f"| {x} | {statistics.median(times[x]):.2f} | {min(times[x]):.2f}–{max(times[x]):.2f} | "
              f"{statistics.median(times[x]) / ours:.3f} |")


if __name__ == "__main__":
    main()
