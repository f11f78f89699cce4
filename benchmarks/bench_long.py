"""First-call time (compile + tables) and a 1M-token forward + backward on one GPU.

    python benchmarks/bench_long.py [--seqlen 1048576 --heads 16]

Prints the time of the very first call in a fresh process (every kernel compiles), then the
time and peak memory of forward and backward at the long length (batch 1, head_dim 128, bf16,
local 512 tokens, stride 16, block 64).
"""

import argparse
import time

import torch

import s2attn


def fwd_bwd(seqlen, heads, dim=128):
    pat = s2attn.local_stride(heads, seqlen, 64, 8, 16)
    q, k, v = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = s2attn.sparse_attention(q, k, v, pat)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return t1 - t0, t2 - t1, peak, pat.density(seqlen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=1 << 20)
    ap.add_argument("--heads", type=int, default=16)
    a = ap.parse_args()
    f, b, _, _ = fwd_bwd(8192, 32)
    print(f"first call (compile + tables), 8k, 32 heads: forward {f:.1f} s, backward {b:.1f} s")
    fwd_bwd(a.seqlen, a.heads)  # warm (tables for this length: none for local-stride)
    f, b, peak, dens = fwd_bwd(a.seqlen, a.heads)
    inputs = 3 * a.seqlen * a.heads * 128 * 2 / 2**30
    print(f"{a.seqlen} tokens, {a.heads} heads, density {dens:.4f}: forward {f * 1e3:.0f} ms, backward "
          f"{b * 1e3:.0f} ms, peak memory above q/k/v {peak:.1f} GiB (q/k/v themselves {inputs:.1f} GiB)")


if __name__ == "__main__":
    main()
