"""How much the 128k forward varies, ours against FlexAttention's, and with what the GPU was doing.

    python benchmarks/forward_spread.py --rounds 6

Each round times s2attn's forward and FlexAttention's (128-token blocks, its best case) back to
back with ``do_bench``, while a sampler thread reads the SM clock and the board power through NVML.
Our forward read 20.96 ms in one process and 24.1 ms in another (FlexAttention 24.66 both times):
this says whether the spread follows the clocks (power or heat) or stays at the same clocks.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from s2attn import bench
from s2attn.api import sparse_attention
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    heads, dim, n = 32, 128, a.seqlen
    q, k, v = (torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pat = local_stride(heads, n, 64, 8, 16)
    ours = lambda: sparse_attention(q, k, v, pat)  # noqa: E731
    from torch.nn.attention.flex_attention import flex_attention

    mask = bench._flex_block_mask(local_stride(heads, n, 128, 4, 16), n, "cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    theirs = lambda: flex(qh, kh, vh, block_mask=mask)  # noqa: E731
    ours(), theirs()
    torch.cuda.synchronize()
    samples: list = []
    stop = threading.Event()
    threading.Thread(target=_sampler, args=(samples, stop), daemon=True).start()
    bench._spin_up()
    print(f"{torch.cuda.get_device_name()}, {n} tokens; do_bench medians, mean SM clock and power while timed")
    print("| round | s2attn fwd ms | MHz | W | FlexAttention fwd ms | MHz | W | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in range(a.rounds):
        o, o_mhz, o_w = _timed(ours, samples)
        f, f_mhz, f_w = _timed(theirs, samples)
        print(f"| {r} | {o:.2f} | {o_mhz:.0f} | {o_w:.0f} | {f:.2f} | {f_mhz:.0f} | {f_w:.0f} | {f / o:.3f} |",
              flush=True)
    stop.set()


if __name__ == "__main__":
    main()
