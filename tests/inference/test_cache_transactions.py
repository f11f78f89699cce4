"""A failed step changes nothing: lengths, page tables and free lists come back exactly, and what the
step wrote is never read — by its own sequence or by the next owner of its slot and pages."""

import pytest
import torch

import s2attn
from s2attn.inference import SparseKVCache, append, decode, prefill

H, HKV, D, B = 4, 2, 16, 16


def _cache(num_pages=(40, 60, 40), **kw):
    """Three layers, the middle one dense; the sparse ones share a page table."""
    pattern = s2attn.local_stride(H, 256, B, 2, 3, num_kv_heads=HKV)
    return SparseKVCache([pattern, s2attn.dense(256, B, num_heads=H), pattern], num_layers=3, num_heads=H,
                         num_kv_heads=HKV, head_dim=D, num_pages=list(num_pages), max_seqs=2, dtype=torch.float32,
                         **kw)


def _state(cache):
    """Everything a step may change, copied: lengths, page tables (host and device), free stacks."""
    groups = [(g.table.clone(), g.table_dev.clone(), g.free[: g.top].clone()) for g in cache._groups]
    return list(cache._lens), cache.seq_lens.clone(), groups


def _same(a, b):
    return a[0] == b[0] and torch.equal(a[1], b[1]) and all(
        torch.equal(x, y) for ga, gb in zip(a[2], b[2]) for x, y in zip(ga, gb))


def _qkv(n, value):
    """Random queries and keys; values all ``value``."""
    return torch.randn(n, H, D), torch.randn(n, HKV, D), torch.full((n, HKV, D), float(value))


def _fail_bad_dtype(cache, layer, q, k, v):
    prefill(cache, layer, q.half(), k.half(), v.half())


def _fail_bad_shape(cache, layer, q, k, v):
    prefill(cache, layer, q, k[:-1], v)


def _fail_model_raises(cache, layer, q, k, v):
    raise RuntimeError("the model failed between two layers")


def _fail_interrupt(cache, layer, q, k, v):
    raise KeyboardInterrupt


FAILURES = {
    "bad dtype": (_fail_bad_dtype, TypeError, r"q\.dtype=torch\.float16: expected the cache's dtype torch\.float32"),
    "bad shape": (_fail_bad_shape, ValueError, r"k: expected shape \(20, 2, 16\), got \(19, 2, 16\)"),
    "exception between layers": (_fail_model_raises, RuntimeError, "between two layers"),
    "KeyboardInterrupt": (_fail_interrupt, KeyboardInterrupt, None),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failed_first_step_of_a_reused_slot_changes_nothing(kind, monkeypatch):
    """The issue's scenario: A writes and leaves, B takes its slot and pages, B's first step fails in its
    last layer (layers 0 and 1 written). B's length stays 0 and its next decode sees only its own token:
    zeros over zero values, exactly — not A's values (100) nor the failed step's (NaN)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path: transactions do not depend on the kernels
    fail, exc, message = FAILURES[kind]
    cache = _cache()
    a = cache.add_sequence()
    with cache.step([a], 40):
        for layer in range(3):
            prefill(cache, layer, *_qkv(40, 100.0))
    cache.remove_sequence(a)
    b = cache.add_sequence()
    assert b == a
    before = _state(cache)
    with pytest.raises(exc, match=message):
        with cache.step([b], 20):
            for layer in range(2):
                prefill(cache, layer, *_qkv(20, float("nan")))
            fail(cache, 2, *_qkv(20, float("nan")))
    assert cache.seq_len(b) == 0 and cache.current_step is None
    assert _same(_state(cache), before)
    assert all(cache.pages_in_use(layer) == 0 for layer in range(3))
    with cache.step([b], 1):
        for layer in range(3):
            q, k, v = _qkv(1, 0.0)
            append(cache, layer, k, v)
            out, lse = decode(cache, layer, q, return_lse=True)
            assert torch.equal(out, torch.zeros_like(out)), (kind, layer)
            scale = D ** -0.5
            ref = (q.view(1, HKV, H // HKV, D) * k[:, :, None]).sum(-1).view(1, H) * scale  # one key: lse = score
            torch.testing.assert_close(lse, ref)
    assert cache.seq_len(b) == 1


def test_failed_step_of_a_running_sequence_leaves_its_tokens_and_pages():
    """A sequence with tokens, a failed chunk that crosses block boundaries: everything as before, and the
    next chunk reads the earlier tokens (not the failed chunk's NaNs, written past the length)."""
    cache = _cache()
    a, other = cache.add_sequence(), cache.add_sequence()
    kept = [(torch.randn(42, H, D), torch.randn(42, HKV, D), torch.randn(42, HKV, D)) for _ in range(3)]
    with cache.step([a, other], [37, 5]):
        for layer, qkv in enumerate(kept):
            prefill(cache, layer, *qkv)
    before = _state(cache)
    with pytest.raises(RuntimeError, match="between two layers"):
        with cache.step([a], 30):
            prefill(cache, 0, *_qkv(30, float("nan")))
            _fail_model_raises(cache, 1, *_qkv(30, 0.0))
    assert _same(_state(cache), before)
    q, k, v = (torch.randn(11, h, D) for h in (H, HKV, HKV))
    with cache.step([a], 11):
        for layer, (_, k0, v0) in enumerate(kept):
            k0, v0 = k0[:37], v0[:37]  # sequence a's rows of the packed first step
            out = prefill(cache, layer, q, k, v)
            pattern = cache.layer(layer).pattern
            ref = s2attn.reference_attention(q[None].double(), torch.cat([k0, k])[None].double(),
                                             torch.cat([v0, v])[None].double(), pattern)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), ref[0], rtol=1e-4, atol=1e-4)


def test_out_of_pages_and_lengths_are_refused_before_anything_changes():
    cache = _cache(num_pages=(40, 20, 40), max_seq_len=100)
    a = cache.add_sequence()
    with cache.step([a], 90):
        for layer in range(3):
            append(cache, layer, *_qkv(90, 1.0)[1:])
    before = _state(cache)
    with pytest.raises(ValueError, match=r"slot 0: 90 \+ 11 tokens exceed the cache's max_seq_len=100"):
        cache.begin_step([a], 11)
    b = cache.add_sequence()
    with pytest.raises(RuntimeError, match=r"out of pages: layers \[1\] need 14 new pages, 8 of num_pages=20"):
        cache.begin_step([b], 100)  # the dense layer's pool is short
    assert _same(_state(cache), before) and cache.current_step is None
    with pytest.raises(ValueError, match=r"max_seq_len=300: expected an int in 1\.\.256"):
        _cache(max_seq_len=300)


def test_abort_without_a_step_and_explicit_abort():
    cache = _cache()
    with pytest.raises(RuntimeError, match=r"abort_step\(\) without begin_step\(\)"):
        cache.abort_step()
    a = cache.add_sequence()
    before = _state(cache)
    cache.begin_step([a], 50)
    assert cache.seq_len(a) == 50 and cache.pages_in_use(1) > 0
    cache.abort_step()
    assert _same(_state(cache), before) and cache.current_step is None


def test_an_interrupted_end_step_can_only_be_finished(monkeypatch):
    """Once end_step() has begun freeing pages the step is committed: undoing it would hand pages out
    twice. Interrupted, it is refused for abort_step() and completes when called again."""
    cache = _cache()
    a = cache.add_sequence()
    cache.begin_step([a], 100)
    dense_group = cache._groups[1]
    evict = dense_group.evict
    monkeypatch.setattr(dense_group, "evict", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cache.end_step()
    with pytest.raises(RuntimeError, match=r"abort_step\(\) after end_step\(\) began .* call end_step\(\) again"):
        cache.abort_step()
    monkeypatch.setattr(dense_group, "evict", evict)
    cache.end_step()
    assert cache.seq_len(a) == 100 and cache.current_step is None
    for layer in range(3):
        kept = s2attn.inference.kv_blocks_kept(cache.layer(layer).pattern, H, HKV, 100).sum()
        assert cache.pages_in_use(layer) == kept


def test_a_handed_out_page_holds_zeros_not_its_former_owners_values():
    """Pages are zeroed when handed out: a step that forgot a layer (a caller's bug, not an exception)
    still shows no other sequence's values there."""
    cache = _cache()
    a = cache.add_sequence()
    with cache.step([a], 64):
        for layer in range(3):
            append(cache, layer, *_qkv(64, 7.0)[1:])
    cache.remove_sequence(a)
    b = cache.add_sequence()
    with cache.step([b], 64):
        pass  # nothing written
    for layer in range(3):
        k, v = cache.gather(layer, b, 64)
        assert torch.equal(v, torch.zeros_like(v)) and torch.equal(k, torch.zeros_like(k))


def test_inputs_are_named_with_what_was_expected():
    cache = _cache()
    a = cache.add_sequence()
    with cache.step([a], 5):
        q, k, v = _qkv(5, 0.0)
        with pytest.raises(TypeError, match=r"v: expected a torch\.Tensor, got list"):
            prefill(cache, 0, q, k, v.tolist())
        with pytest.raises(ValueError, match=r"q is on device meta: expected the cache's device cpu"):
            prefill(cache, 0, q.to("meta"), k, v)
        with pytest.raises(TypeError, match=r"k\.dtype=torch\.float64: expected the cache's dtype torch\.float32"):
            append(cache, 0, k.double(), v)
        with pytest.raises(ValueError, match=r"q: expected shape \(1, 4, 16\), got \(5, 4, 16\)"):
            decode(cache, 0, q)
