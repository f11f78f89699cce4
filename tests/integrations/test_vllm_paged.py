"""Attention over vLLM's paged cache layout (s2attn.integrations.vllm.paged) against the reference.

These need no vLLM: the cache is built here in vLLM's layouts (0.22's 5-D and 0.32's 4-D page view)
with shuffled page ids, so a kernel that ignored the block table or read another head's page fails.
"""

import pytest
import torch

import s2attn
from s2attn.integrations.vllm import paged
from s2attn.kernels.launch import interpreting

PAGE, HEADS, KV_HEADS, D = 16, 4, 2, 32


def pattern(dense_heads=0):
    return s2attn.local_stride(HEADS, 1024, PAGE, 2, 4, num_kv_heads=KV_HEADS, num_dense_heads=dense_heads)


def paged_cache(seq_lens, layout, dtype=torch.float32, seed=0):
    """Contiguous K/V per request, and the same tokens scattered over shuffled pages of a vLLM cache."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-n // PAGE) for n in seq_lens]
    num_pages = sum(pages_per) + 3
    order = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(seq_lens), max(pages_per), dtype=torch.int32)
    if layout == "0.22":
        kv = torch.randn(num_pages, 2, PAGE, KV_HEADS, D, generator=g, dtype=dtype)
    else:
        kv = torch.randn(num_pages, KV_HEADS, PAGE, 2 * D, generator=g, dtype=dtype)
    k_cache, v_cache = paged.split_kv_cache(kv, D)
    ks, vs, used = [], [], 0
    for i, n in enumerate(seq_lens):
        ids = order[used : used + pages_per[i]]
        used += pages_per[i]
        table[i, : len(ids)] = ids
        ks.append(k_cache[ids.long()].flatten(0, 1)[:n])
        vs.append(v_cache[ids.long()].flatten(0, 1)[:n])
    return kv, k_cache, v_cache, table, ks, vs


def reference(q_rows, ks, vs, query_lens, pat, scale):
    """Per request, reference attention of its last ``query_lens[i]`` positions."""
    outs, start = [], 0
    for k, v, n in zip(ks, vs, query_lens):
        q = q_rows[start : start + n]
        outs.append(s2attn.reference_attention(q[None].double(), k[None].double(), v[None].double(), pat,
                                                softmax_scale=scale)[0])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("layout", ["0.22", "0.32"])
def test_split_kv_cache_layouts(layout):
    kv, k_cache, v_cache, *_ = paged_cache([20], layout)
    assert k_cache.shape == v_cache.shape == (kv.shape[0], PAGE, KV_HEADS, D)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    with pytest.raises(ValueError, match="kv_cache of shape"):
        paged.split_kv_cache(kv, D + 1)


@pytest.mark.parametrize("layout", ["0.22", "0.32"])
@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_write_kv_kernel_matches_indexing(layout):
    kv, k_cache, v_cache, *_ = paged_cache([40], layout)
    tokens = 7
    key, value = torch.randn(2, tokens, KV_HEADS, D).unbind(0)
    slots = torch.tensor([5, 17, -1, 0, 47, -1, 33, -1, -1])  # longer than the tokens: vLLM pads it
    expected = kv.clone()
    ek, ev = paged.split_kv_cache(expected, D)
    for t in range(tokens):
        s = int(slots[t])
        if s >= 0:
            ek[s // PAGE, s % PAGE], ev[s // PAGE, s % PAGE] = key[t], value[t]
    paged.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(kv, expected)


@pytest.mark.parametrize("layout", ["0.22", "0.32"])
def test_prefill_chunks_after_cached_context(layout):
    """Chunks of 1..40 new tokens after 0..100 cached ones (chunked prefill, prefix caching)."""
    seq_lens, query_lens = [100, 37, 64, 5], [40, 37, 1, 3]
    kv, k_cache, v_cache, table, ks, vs = paged_cache(seq_lens, layout)
    pat = pattern()
    q = torch.randn(sum(query_lens), HEADS, D)
    out = paged.prefill(q, k_cache, v_cache, table, query_lens, seq_lens, pat, 0.3)
    ref = reference(q, ks, vs, query_lens, pat, 0.3)
    assert (out.double() - ref).norm() / ref.norm() < 1e-4


@pytest.mark.parametrize("layout", ["0.22", "0.32"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dense_heads", [0, 1])
@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_decode_kernel_reads_pages_through_block_table(layout, splits, dense_heads):
    seq_lens = [150, 1, 47, 96, 0]  # the last row is padding (a CUDA-graph batch): output 0
    kv, k_cache, v_cache, table, ks, vs = paged_cache([max(n, 1) for n in seq_lens], layout)
    pat = pattern(dense_heads)
    plan = paged.LayerPlan.build(pat, HEADS, KV_HEADS, torch.device("cpu"))
    buffers = paged.DecodeBuffers(8, HEADS, KV_HEADS, D, plan.blocks_read(1024), torch.device("cpu"),
                                  num_splits=splits)
    q = torch.randn(len(seq_lens), HEADS, D)
    out = torch.full_like(q, float("nan"))
    paged.decode(q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32), out, plan, buffers, 0.3)
    real = [i for i, n in enumerate(seq_lens) if n]
    ref = reference(q[real], [ks[i] for i in real], [vs[i] for i in real], [1] * len(real), pat, 0.3)
    assert (out[real].double() - ref).norm() / ref.norm() < 1e-4
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    # the gather path (the CPU fallback) gives the same
    fallback = paged.prefill(q[real], k_cache, v_cache, table[real], [1] * len(real), [seq_lens[i] for i in real],
                             pat, 0.3)
    assert (fallback.double() - ref).norm() / ref.norm() < 1e-4


def test_pattern_really_skips_blocks():
    """At these lengths the decode rows read a fraction of their pages, so a wrong walk shows."""
    assert pattern().blocks_per_row(150)[:, -1].max() < 150 // PAGE
