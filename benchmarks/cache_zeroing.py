"""What zeroing pages when they are handed out costs the serving cache.

``SparseKVCache`` zeroes a page's K and V in every layer of its group whenever ``begin_step`` hands
it to a sequence, so a new owner never sees a former owner's values. This times the cache's own
work per step (``begin_step``, ``append`` in every layer, ``end_step``; no attention, the smallest
denominator a real step has) and the share spent in the zeroing, for a prefill, one-token decode
steps and 256-token chunks. 16 sequences, 4 layers, 32 / 8 heads, head_dim 128, bf16, block 64,
local 8 blocks, stride 16.

    python benchmarks/cache_zeroing.py            # on CUDA if there is a GPU, else the CPU

CPU (2 cores shared with other jobs, torch 2.13, 2026-12-07, three runs): zeroing took 22-26% of a
1024-token prefill's cache work (16-30 of 72-115 ms), 4.5-5.7% of a decode step's (0.03-0.05 of
0.8-0.9 ms: a sequence gets new pages once per 64 tokens) and 35% of a 256-token chunk's (11-13 of
32-36 ms). It writes as many bytes as the appends of those blocks do, so it is small beside the
same step's attention, which reads every kept block of every layer. Not yet measured on a GPU.
"""

from __future__ import annotations

import time

import torch

import s2attn
from s2attn.inference import SparseKVCache, append

SEQS, LAYERS = 16, 4


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    spent = [0.0]
    fill = torch.Tensor.index_fill_

    def timed_fill(self, *args):
        sync()
        t = time.perf_counter()
        out = fill(self, *args)
        sync()
        spent[0] += time.perf_counter() - t
        return out

    torch.Tensor.index_fill_ = timed_fill
    pattern = s2attn.local_stride(32, 16384, 64, 8, 16, num_kv_heads=8)
    cache = SparseKVCache(pattern, num_layers=LAYERS, num_heads=32, num_kv_heads=8, head_dim=128, num_pages=8192,
                          max_seqs=SEQS, dtype=torch.bfloat16, device=device)
    slots = [cache.add_sequence() for _ in range(SEQS)]
    for new, steps in ((1024, 1), (1, 640), (256, 8)):
        x = torch.randn(SEQS * new, 8, 128, dtype=torch.bfloat16, device=device)
        spent[0] = 0.0
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            with cache.step(slots, new):
                for layer in range(LAYERS):
                    append(cache, layer, x, x)
        sync()
        total = time.perf_counter() - t
        print(f"{device}: {steps} step(s) of {new} token(s) a sequence: {total / steps * 1e3:.2f} ms a step, zeroing "
              f"{spent[0] / steps * 1e3:.3f} ms ({spent[0] / total:.1%})")
    torch.Tensor.index_fill_ = fill


if __name__ == "__main__":
    main()
