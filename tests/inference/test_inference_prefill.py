"""Prefill (packed, padded, chunked) equals the reference over the full keys."""

import pytest
import torch

import s2attn
from kvsim import DEVICE, TOL, Driver, rel_err
from s2attn.inference import SparseKVCache, prefill, prefill_padded

H, HKV, D, B = 8, 2, 16, 16
LENS = [1, 37, 64]


def _pattern():
    return s2attn.local_stride(H, 256, B, 2, 3, num_kv_heads=HKV, num_dense_heads=1)


def _cache():
    return SparseKVCache(_pattern(), num_layers=1, num_heads=H, num_kv_heads=HKV, head_dim=D, num_pages=64,
                         max_seqs=4, dtype=torch.float32, device=DEVICE)


def test_packed_prefill_matches_varlen_reference():
    cache = _cache()
    slots = [cache.add_sequence() for _ in LENS]
    total = sum(LENS)
    q, k, v = (torch.randn(total, h, D, device=DEVICE) for h in (H, HKV, HKV))
    with cache.step(slots, LENS) as step:
        out = prefill(cache, 0, q, k, v)
        cu = step.cu_seqlens_q
    ref = s2attn.reference_attention_varlen(q.double(), k.double(), v.double(), cu, cu, cache.layer(0).pattern)
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert [cache.seq_len(s) for s in slots] == LENS


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill(side):
    cache = _cache()
    slots = [cache.add_sequence() for _ in LENS]
    q, k, v = (torch.randn(3, 64, h, D, device=DEVICE) for h in (H, HKV, HKV))
    with cache.step(slots, LENS):
        out = prefill_padded(cache, 0, q, k, v, padding_side=side)
    for i, n in enumerate(LENS):
        rows = slice(0, n) if side == "right" else slice(64 - n, 64)
        ref = s2attn.reference_attention(q[i : i + 1, rows].double(), k[i : i + 1, rows].double(),
                                         v[i : i + 1, rows].double(), _pattern())
        assert rel_err(out[i, rows], ref[0]) <= TOL[torch.float32]
        pad = torch.ones(64, dtype=torch.bool)
        pad[rows] = False
        assert torch.all(out[i, pad] == 0)


@pytest.mark.parametrize("chunk", [7, 13, 40])
def test_chunked_prefill_reads_only_kept_blocks(chunk):
    """Chunks that do not divide the block: each chunk attends to the cached keys (gathered from the
    pages, freed blocks zero-filled) and to itself; a freed block read by a later chunk would break it."""
    drv = Driver(_pattern(), num_layers=1)
    a, b = drv.add(), drv.add()
    for _ in range(150 // chunk):
        drv.step([a, b], [chunk, chunk // 2 + 1])
    n_blocks = -(-drv.cache.seq_len(a) // B) + -(-drv.cache.seq_len(b) // B)
    assert drv.cache.pages_in_use(0) < HKV * n_blocks  # blocks were freed on the way


def test_prefill_shape_errors():
    cache = _cache()
    a = cache.add_sequence()
    with cache.step([a], 5):
        with pytest.raises(ValueError, match=r"q: expected shape \(5, 8, 16\)"):
            prefill(cache, 0, *(torch.randn(n, h, D, device=DEVICE) for n, h in ((4, H), (5, HKV), (5, HKV))))
        with pytest.raises(ValueError, match="padding_side='middle'"):
            prefill_padded(cache, 0, *(torch.randn(1, 5, h, D, device=DEVICE) for h in (H, HKV, HKV)),
                           padding_side="middle")
