"""Cache bookkeeping (no attention): what is kept, what is freed, memory, errors."""

import pytest
import torch

import s2attn
from kvsim import kv_cache_efficient
from s2attn.inference import SparseKVCache, append, kv_blocks_kept, last_readers, sequences_that_fit

B = 16


def _rule_variants():
    return [
        s2attn.local_stride(8, 512, B, 2, 3, num_kv_heads=2),
        s2attn.local_stride(8, 512, B, 3, 4, num_kv_heads=4, num_dense_heads=1, head_offset=2),
        s2attn.local_stride(8, 512, B, 1, 5, num_kv_heads=8, homogeneous=True),
        s2attn.dense(512, B, num_heads=8),
    ]


def _cache(pattern, num_kv_heads, num_pages=512, **kw):
    return SparseKVCache(pattern, num_layers=1, num_heads=8, num_kv_heads=num_kv_heads, head_dim=2,
                         num_pages=num_pages, max_seqs=4, dtype=torch.float32, **kw)


def _fill(cache, slots, new):
    with cache.step(slots, new) as step:
        k = torch.randn(step.total_new, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
        for layer in range(cache.num_layers):
            append(cache, layer, k, k)


def _present(cache, slot, layer=0):
    table = cache.layer(layer).page_table.cpu()[slot]
    return table >= 0  # (kv_heads, max_blocks)


@pytest.mark.parametrize("i", range(4))
def test_closed_form_last_readers_match_the_mask(i):
    """Within the pattern's blocks (the closed form may point past the last one), the rule's last
    readers equal those read off its explicit mask."""
    rule = _rule_variants()[i]
    kv = rule.rule.num_kv_heads
    as_mask = s2attn.from_mask(rule.block_mask(512), B)
    last_block = 512 // B - 1
    assert torch.equal(last_readers(rule, 8, kv).clamp(max=last_block), last_readers(as_mask, 8, kv))


@pytest.mark.parametrize("as_mask", [False, True])
@pytest.mark.parametrize("i", range(4))
def test_pages_left_are_exactly_what_the_next_query_reads(i, as_mask):
    """For KV-cache-efficient patterns whose heads agree within a kv group, after every step the
    present pages of a (sequence, kv head) are the blocks the next query's row reads — so decode's
    page-table enumeration reads nothing it does not need."""
    pattern = _rule_variants()[i]
    kv = pattern.rule.num_kv_heads
    if as_mask:
        pattern = s2attn.from_mask(pattern.block_mask(512), B)
    mask = pattern.block_mask(512)
    assert kv_cache_efficient(mask)
    cache = _cache(pattern, kv)
    a, b = cache.add_sequence(), cache.add_sequence()
    for new_a, new_b in [(5, 40), (11, 1), (1, 1), (29, 16), (64, 1), (1, 7), (100, 3)]:
        _fill(cache, [a, b], [new_a, new_b])
        for slot in (a, b):
            n = cache.seq_len(slot)
            row = mask[:, n // B, : -(-n // B)].reshape(kv, 8 // kv, -1)
            assert torch.equal(row.all(1), row.any(1))  # heads of a group agree
            assert torch.equal(_present(cache, slot)[:, : -(-n // B)], row[:, 0])
            assert not _present(cache, slot)[:, -(-n // B) :].any()


def test_inefficient_mask_keeps_every_block_a_later_query_reads():
    n_blocks = 512 // B
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, n_blocks, n_blocks, generator=gen) < 0.2) | torch.eye(n_blocks, dtype=torch.bool)
    assert not kv_cache_efficient(mask)
    pattern = s2attn.from_mask(mask, B)
    cache = _cache(pattern, 2)
    a = cache.add_sequence()
    for new in (30, 1, 17, 50, 1, 100):
        _fill(cache, [a], new)
        n = cache.seq_len(a)
        later = mask[:, n // B :, : -(-n // B)].tril(diagonal=n // B).any(1)  # rows >= the next query's
        assert torch.equal(_present(cache, a)[:, : -(-n // B)], later.view(2, 4, -1).any(1))


def test_out_of_pages_raises_before_anything_changes():
    pattern = s2attn.local_stride(8, 512, B, 2, 3, num_kv_heads=2)
    dense = s2attn.dense(512, B, num_heads=8)
    cache = SparseKVCache([pattern, dense], num_layers=2, num_heads=8, num_kv_heads=2, head_dim=2,
                          num_pages=[20, 20], max_seqs=2, dtype=torch.float32)
    a = cache.add_sequence()
    _fill(cache, [a], 100)  # dense layer: 7 blocks x 2 heads = 14 pages
    before = [t.clone() for layer in range(2) for t in cache.layer(layer)[:3]]
    lens = cache.seq_lens.clone()
    with pytest.raises(RuntimeError, match=r"layers \[1\] need 8 new pages, 6 of num_pages=20 are free"):
        cache.begin_step([a], 70)
    assert all(torch.equal(x, y) for x, y in zip(before, (t for layer in range(2) for t in cache.layer(layer)[:3])))
    assert torch.equal(lens, cache.seq_lens) and cache.seq_len(a) == 100 and cache.current_step is None
    _fill(cache, [a], 30)  # what still fits does fit: 4 more pages


def test_bytes_in_use_dense_layers_and_removal():
    pattern = s2attn.local_stride(8, 512, B, 2, 4, num_kv_heads=2)
    dense = s2attn.dense(512, B, num_heads=8)
    cache = SparseKVCache([pattern, dense, pattern], num_layers=3, num_heads=8, num_kv_heads=2, head_dim=4,
                          num_pages=[100, 200, 100], max_seqs=2, dtype=torch.float16)
    a, b = cache.add_sequence(), cache.add_sequence()
    _fill(cache, [a, b], [300, 45])
    page_bytes = 2 * B * 4 * 2
    sparse_pages = int(kv_blocks_kept(pattern, 8, 2, 300).sum() + kv_blocks_kept(pattern, 8, 2, 45).sum())
    dense_pages = 2 * (-(-300 // B) + -(-45 // B))
    assert [cache.pages_in_use(i) for i in range(3)] == [sparse_pages, dense_pages, sparse_pages]
    assert cache.bytes_in_use(1) == dense_pages * page_bytes
    assert cache.bytes_in_use() == (2 * sparse_pages + dense_pages) * page_bytes
    cache.remove_sequence(a)
    cache.remove_sequence(b)
    assert cache.bytes_in_use() == 0 and (cache.layer(0).page_table == -1).all()


def test_memory_at_128k_is_within_ten_percent_of_ideal():
    """32 query / 8 kv heads, head_dim 128, bf16, local 512 tokens, stride 16, block 64: a 128k-token
    prefill (keys/values written in chunks) leaves <= 1.1x the ideal local window + context / stride
    per kv head in the pool — sized to 1.1x ideal, so the peak during the prefill fits too."""
    ctx, block, kv, d = 131072, 64, 8, 128
    pattern = s2attn.local_stride(32, ctx, block, 512 // block, 16, num_kv_heads=kv)
    ideal_tokens = kv * (512 + ctx // 16)
    pages = int(1.1 * ideal_tokens / block)
    cache = SparseKVCache(pattern, num_layers=1, num_heads=32, num_kv_heads=kv, head_dim=d, num_pages=pages,
                          max_seqs=1, dtype=torch.bfloat16)
    a = cache.add_sequence()
    chunk = torch.randn(8192, kv, d, dtype=torch.bfloat16)
    for _ in range(ctx // 8192):
        with cache.step([a], 8192):
            append(cache, 0, chunk, chunk)
    dense_bytes = 2 * kv * ctx * d * 2
    assert cache.pages_in_use(0) * block <= 1.1 * ideal_tokens
    assert cache.bytes_in_use() / dense_bytes <= 0.07


def test_sequences_that_fit_7b_shape():
    pattern = s2attn.local_stride(32, 131072, 64, 8, 16, num_kv_heads=8)
    fit = sequences_that_fit(80 * 2**30, 131072, pattern, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    assert fit["bytes_per_sequence_dense"] == 32 * 8 * 131072 * 128 * 2 * 2
    assert fit["dense"] == 5 and fit["sparse"] >= 15 * fit["dense"]


def test_errors_name_the_problem():
    pattern = s2attn.local_stride(8, 512, B, 2, 3, num_kv_heads=2)
    with pytest.raises(ValueError, match="causal"):
        _cache(s2attn.local_stride(8, 512, B, 2, 3, num_kv_heads=2, causal=False), 2)
    with pytest.raises(ValueError, match="num_heads=8: the pattern was built for 4 heads"):
        _cache(s2attn.local_stride(4, 512, B, 2, 3), 2)
    cache = _cache(pattern, 2)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="slot=3"):
        cache.begin_step([3], 1)
    with pytest.raises(ValueError, match="max_seq_len=512"):
        cache.begin_step([a], 513)
    with pytest.raises(RuntimeError, match="no step in progress"):
        append(cache, 0, torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with cache.step([a], 3):
        with pytest.raises(RuntimeError, match="already in progress"):
            cache.begin_step([a], 1)
        with pytest.raises(RuntimeError, match="end_step"):
            cache.remove_sequence(a)
        with pytest.raises(ValueError, match=r"k: expected shape \(3, 2, 2\)"):
            append(cache, 0, torch.zeros(2, 2, 2), torch.zeros(3, 2, 2))
        append(cache, 0, torch.zeros(3, 2, 2), torch.zeros(3, 2, 2))
