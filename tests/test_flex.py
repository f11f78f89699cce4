"""BlockPattern.to_flex_block_mask: flex_attention under it computes what sparse_attention does."""

import pytest
import torch

import s2attn
from s2attn import dense, from_mask, local_stride

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
# eager FlexAttention (the CPU's) is the unfused reference implementation: what these tests want
pytestmark = [pytest.mark.quick, pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEQ = 300  # not a multiple of the 128-token tile

PATTERNS = {
    "gqa_block16": (local_stride(4, 512, 16, 2, 4, num_kv_heads=2), 2),
    "dense_group": (local_stride(4, 512, 32, 2, 4, num_kv_heads=2, num_dense_heads=1), 2),
    "bidirectional": (local_stride(4, 512, 16, 2, 4, num_kv_heads=2, causal=False), 2),
    "block256": (local_stride(2, 1024, 256, 1, 2), 1),  # a tile of 256: one block
    "shared": (dense(SEQ, 32), 4),
    "mask": (from_mask(torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.5, 32), 3),
    "shared_mask_bidirectional": (from_mask(torch.eye(10, dtype=torch.bool) | (torch.arange(10) % 3 == 0), 32,
                                            causal=False), 1),
}


def qkv(pattern, kv_heads, requires_grad=False):
    heads = pattern.num_heads or 4
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, heads, SEQ, 32), (1, kv_heads, SEQ, 32), (1, kv_heads, SEQ, 32)]
    return [torch.randn(s, generator=gen).to(DEVICE).requires_grad_(requires_grad) for s in shapes]


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("name", PATTERNS)
def test_same_attention_as_sparse_attention(name):
    pattern, kv_heads = PATTERNS[name]
    q, k, v = qkv(pattern, kv_heads)
    mask = pattern.to_flex_block_mask(SEQ, DEVICE)
    assert mask.shape == (1, pattern.pattern_heads, SEQ, SEQ)
    out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    assert rel_err(out, s2attn.sparse_attention(q, k, v, pattern, layout="bhsd")) <= 1e-4


def test_tiles_the_pattern_skips_are_not_computed():
    """At 4k tokens, local 512 + every 8th block of 64: FlexAttention visits the tiles the pattern touches,
    the ones wholly inside it without the mask, and no others."""
    pattern = local_stride(8, 4096, 64, 8, 8, num_kv_heads=8)
    mask = pattern.to_flex_block_mask(4096)
    partial, full = mask.kv_num_blocks.sum().item(), mask.full_kv_num_blocks.sum().item()
    tiles = pattern.block_mask(4096).view(8, 32, 2, 32, 2).any(4).any(2)  # 128-token tiles any block touches
    assert partial + full == tiles.sum().item() < 8 * 32 * 33 // 2 and full > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on the CPU")
@pytest.mark.parametrize("name", PATTERNS)
def test_same_gradients_as_sparse_attention(name):
    pattern, kv_heads = PATTERNS[name]
    grads = []
    for attend in (lambda q, k, v: flex_attention(q, k, v, block_mask=pattern.to_flex_block_mask(SEQ, DEVICE),
                                                  enable_gqa=True),
                   lambda q, k, v: s2attn.sparse_attention(q, k, v, pattern, layout="bhsd")):
        q, k, v = qkv(pattern, kv_heads, requires_grad=True)
        attend(q, k, v).backward(torch.ones(1, q.shape[1], SEQ, 32, device=DEVICE) / SEQ)
        grads.append([x.grad for x in (q, k, v)])
    for name, got, ref in zip("qkv", *grads):
        assert rel_err(got, ref) <= 1e-3, f"d{name}"
