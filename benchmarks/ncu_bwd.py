"""Two forward + backward calls of the bench's shape at one length, for Nsight Compute to profile the
second backward's kernels: ``bash scripts/ncu_bwd.sh 65536`` (``python benchmarks/ncu_bwd.py N`` alone just
runs them)."""

import sys

import torch

from s2attn import ops
from s2attn.patterns import local_stride


def main(seqlen: int, heads: int = 32, dim: int = 128) -> None:
    pattern = local_stride(heads, seqlen, 64, 8, 16)  # local 512 tokens, stride 16 blocks
    q, k, v = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    for _ in range(2):
        out = ops.attention(q, k, v, pattern, softmax_scale=dim**-0.5, causal=True, layout="bshd", return_lse=False)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(int(sys.argv[1]))
