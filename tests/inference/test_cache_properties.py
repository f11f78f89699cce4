"""Property tests of the serving cache against a plain model, and a soak.

The plain model keeps each sequence's own tokens (float64) and attends with the reference. Random
schedules of add / step / failing step / remove over several sequences and three layers (GQA, blocks
of 16-64, a dense layer between two sparse ones that share a page table) must give the model's
outputs, never let a sequence read another's values (poisoned sequences and failed steps write NaN),
hold exactly the pages the pattern still needs, and hand every page back once all sequences leave.

Both run on the reference path: the Triton decode kernel under the CPU interpreter takes about half
a second a step; ``test_inference_decode.py`` checks it against the reference over the same cache.
"""

from __future__ import annotations

import collections
import tracemalloc

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import s2attn  # noqa: E402
from kvsim import rel_err  # noqa: E402
from s2attn.inference import SparseKVCache, append, decode, kv_blocks_kept, prefill  # noqa: E402

MAX_LEN, D, LAYERS, MAX_SEQS = 320, 8, 3, 3
SCHEDULES = 150  # hypothesis examples
SOAK_STEPS = 10_000
STATS: collections.Counter = collections.Counter()


@pytest.fixture(autouse=True)
def _reference_path_one_thread(monkeypatch):
    """The reference path, on one thread: these tensors are tiny, and a second thread's start-up costs
    more than the op (repeat_interleave: 0.02 ms on one thread, 0.1-4 ms on two of a busy machine)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Failure(Exception):
    """What a failing step raises between two layers (its model's own error)."""


class Plain:
    """The model: per active slot, its own (K, V) per layer in float64, and whether it is poisoned."""

    def __init__(self, cache: SparseKVCache):
        self.cache = cache
        self.heads, self.kv = cache.num_heads, cache.num_kv_heads
        self.tokens: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.poison: dict[int, bool] = {}
        self._kept: dict[tuple[int, int], int] = {}

    def length(self, slot: int) -> int:
        return self.tokens[slot][0][0].shape[0]

    def kept(self, pattern, n: int) -> int:
        key = (id(pattern), n)
        if key not in self._kept:
            self._kept[key] = int(kv_blocks_kept(pattern, self.heads, self.kv, n).sum())
        return self._kept[key]

    def check_invariants(self) -> None:
        """Lengths agree; each page group holds exactly the blocks some later query reads; every page is
        in exactly one place (a table or the free stack)."""
        for slot in self.tokens:
            assert self.cache.seq_len(slot) == self.length(slot)
        for g in self.cache._groups:
            assert g.pages_in_use == sum(self.kept(g.pattern, self.length(s)) for s in self.tokens)
            held = torch.cat([g.free[: g.top], g.table[g.table >= 0]]).sort().values
            assert torch.equal(held, torch.arange(g.num_pages, dtype=held.dtype))
            assert torch.equal(g.table, g.table_dev.cpu())


def _snapshot(cache: SparseKVCache):
    return (list(cache._lens), cache.seq_lens.clone(),
            [(g.table.clone(), g.free[: g.top].clone()) for g in cache._groups])


def _same(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and all(
        torch.equal(x, y) for ga, gb in zip(a[2], b[2]) for x, y in zip(ga, gb))


def _build(data) -> SparseKVCache:
    block = data.draw(st.sampled_from([16, 32, 64]), label="block_size")
    kv = data.draw(st.sampled_from([1, 2]), label="num_kv_heads")
    heads = kv * data.draw(st.sampled_from([1, 2, 3]), label="heads per kv head")
    local, stride = data.draw(st.integers(1, 3), label="local"), data.draw(st.integers(2, 4), label="stride")
    sparse = s2attn.local_stride(heads, MAX_LEN, block, local, stride, num_kv_heads=kv)
    full = kv * -(-MAX_LEN // block)  # pages of one sequence at MAX_LEN in the dense layer
    pages = [data.draw(st.integers(2 * kv, 2 * full), label=f"num_pages[{name}]") for name in ("sparse", "dense")]
    return SparseKVCache([sparse, s2attn.dense(MAX_LEN, block, num_heads=heads), sparse], num_layers=LAYERS,
                         num_heads=heads, num_kv_heads=kv, head_dim=D, num_pages=[pages[0], pages[1], pages[0]],
                         max_seqs=MAX_SEQS, dtype=torch.float32)


def _run_step(data, model: Plain, gen: torch.Generator) -> None:
    """One step over some active sequences: prefill or decode, maybe failing inside; then the outputs
    against the model (or, for a refused or failed step, the cache exactly as before)."""
    cache = model.cache
    active = sorted(model.tokens)
    slots = data.draw(st.lists(st.sampled_from(active), min_size=1, max_size=len(active), unique=True), label="slots")
    decoding = data.draw(st.booleans(), label="decode")
    lengths = st.integers(1, 70) | st.integers(100, MAX_LEN + 10)  # the long ones may pass max_seq_len
    new = [1] * len(slots) if decoding else [data.draw(lengths, label="new") for _ in slots]
    fail = data.draw(st.sampled_from([None] * 8 + ["dtype", "shape", "raise", "interrupt"]), label="failure")
    fail_layer = data.draw(st.integers(0, LAYERS - 1), label="failing layer")
    total, H, KV = sum(new), cache.num_heads, cache.num_kv_heads
    before = _snapshot(cache)
    if any(model.length(s) + n > MAX_LEN for s, n in zip(slots, new)):
        with pytest.raises(ValueError, match="exceed the cache's max_seq_len"):
            cache.begin_step(slots, new)
        STATS["steps refused (length)"] += 1
        assert _same(_snapshot(cache), before)
        return
    rows = torch.tensor(sum(([model.poison[s]] * n for s, n in zip(slots, new)), []))[:, None, None]
    qkv = []
    for _ in range(LAYERS):
        q, k, v = (torch.randn(total, h, D, generator=gen) for h in (H, KV, KV))
        if fail:
            k, v = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        qkv.append((q, torch.where(rows, float("nan"), k), torch.where(rows, float("nan"), v)))
    outs = []
    try:
        with cache.step(slots, new):
            for layer, (q, k, v) in enumerate(qkv):
                if fail and layer == fail_layer:
                    if fail == "dtype":
                        q = q.double()
                    elif fail == "shape":
                        k = k[:-1]
                    else:
                        raise Failure() if fail == "raise" else KeyboardInterrupt()
                if decoding:
                    append(cache, layer, k, v)
                    outs.append(decode(cache, layer, q).clone())
                else:
                    outs.append(prefill(cache, layer, q, k, v))
    except RuntimeError as e:
        assert "out of pages" in str(e) and not outs, e
        STATS["steps refused (pages)"] += 1
        assert _same(_snapshot(cache), before)
        return
    except (TypeError, ValueError, Failure, KeyboardInterrupt):
        assert fail, "only a failing step may raise"
        STATS["steps failed inside"] += 1
        assert _same(_snapshot(cache), before)
        return
    assert not fail
    STATS["decode steps" if decoding else "prefill steps"] += 1
    start = 0
    for slot, n in zip(slots, new):
        for layer, (q, k, v) in enumerate(qkv):
            K, V = model.tokens[slot][layer]
            K, V = torch.cat([K, k[start : start + n].double()]), torch.cat([V, v[start : start + n].double()])
            model.tokens[slot][layer] = (K, V)
            if not model.poison[slot]:
                ref = s2attn.reference_attention(q[None, start : start + n].double(), K[None], V[None],
                                                 cache.layer(layer).pattern)
                got = outs[layer][start : start + n]
                assert torch.isfinite(got).all(), f"slot {slot} layer {layer} read another sequence's NaN"
                assert rel_err(got, ref[0]) <= 1e-4, (slot, layer)
        start += n


@settings(max_examples=SCHEDULES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def _random_schedule(data):
    cache = _build(data)
    model = Plain(cache)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    for _ in range(data.draw(st.integers(6, 24), label="operations")):
        op = data.draw(st.sampled_from(["add", "step", "step", "step", "step", "remove"]), label="op")
        if op == "add" and len(model.tokens) < MAX_SEQS:
            slot = cache.add_sequence()
            empty = torch.zeros(0, cache.num_kv_heads, D, dtype=torch.float64)
            model.tokens[slot] = [(empty, empty)] * LAYERS
            model.poison[slot] = data.draw(st.booleans(), label="poisoned")
            STATS["sequences"] += 1
        elif op == "remove" and model.tokens:
            slot = data.draw(st.sampled_from(sorted(model.tokens)), label="removed")
            cache.remove_sequence(slot)
            del model.tokens[slot], model.poison[slot]
        elif op == "step" and model.tokens:
            _run_step(data, model, gen)
        model.check_invariants()
    for slot in list(model.tokens):
        cache.remove_sequence(slot)
    for g in cache._groups:
        assert g.pages_in_use == 0 and bool((g.table == -1).all())
        assert torch.equal(g.free[: g.top].sort().values, torch.arange(g.num_pages, dtype=torch.int32))
    STATS["schedules"] += 1


def test_random_schedules_match_the_plain_model(record_property):
    STATS.clear()
    _random_schedule()
    record_property("summary", f"cache properties: {STATS['schedules']} schedules, "
                    f"{STATS['sequences']} sequences, {STATS['prefill steps']} prefill and {STATS['decode steps']} "
                    f"decode steps checked, {STATS['steps failed inside']} failed inside and rolled back, "
                    f"{STATS['steps refused (pages)']} refused for pages, {STATS['steps refused (length)']} for length")
    assert STATS["steps failed inside"] > 0 and STATS["decode steps"] > 0 and STATS["prefill steps"] > 0


def test_soak_no_page_leaks_and_flat_memory(record_property):
    """10,000 completed steps (failed and refused ones on top, and the arrivals and departures between them)
    of sequences growing, mostly by one token, failing and leaving, the pages accounted exactly after each.
    Each stored value says who wrote it (sequence, position, layer); every 500 iterations each sequence's
    tokens are read back from the pages: its own, or zeros where no page is kept. The Python heap
    (tracemalloc) must not grow over the last 5,000 completed steps."""
    gen = torch.Generator().manual_seed(0)
    pattern = s2attn.local_stride(4, 512, 16, 2, 4, num_kv_heads=2)
    cache = SparseKVCache([pattern, s2attn.dense(512, 16, num_heads=4), pattern], num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=4, num_pages=[96, 200, 96], max_seqs=6, dtype=torch.float32)
    kept = {id(g.pattern): [int(kv_blocks_kept(g.pattern, 4, 2, n).sum()) for n in range(513)]
            for g in cache._groups}
    lengths: dict[int, int] = {}
    owner: dict[int, int] = {}
    stats = collections.Counter()
    pick = lambda n: int(torch.randint(n, (), generator=gen))  # noqa: E731
    it = 0
    while stats["steps"] < SOAK_STEPS:  # completed steps; failed and refused ones come on top
        it += 1
        if stats["steps"] == SOAK_STEPS // 2 and not tracemalloc.is_tracing():
            tracemalloc.start()
            heap_start = tracemalloc.get_traced_memory()[0]
        active = sorted(owner)
        if len(active) < cache.max_seqs and pick(8) == 0:
            slot = cache.add_sequence()
            stats["sequences"] += 1
            owner[slot], lengths[slot] = stats["sequences"], 0
        elif active and (pick(40) == 0 or max(lengths.values()) >= 500):
            slot = max(active, key=lengths.get) if pick(2) else active[pick(len(active))]
            cache.remove_sequence(slot)
            del owner[slot], lengths[slot]
            stats["removed"] += 1
        elif active:
            slots = [s for s in active if pick(4)] or active[:1]
            new = [1 if pick(6) else 1 + pick(12) for _ in slots]
            failing = pick(25) == 0
            stats["attempted"] += 1
            try:
                with cache.step(slots, new) as current:
                    _, pos = current.token_index
                    who = torch.tensor([owner[s] for s in slots]).repeat_interleave(torch.tensor(new))
                    for layer in range(3):
                        if failing and layer == 2:
                            raise Failure()
                        val = torch.stack([who, pos, torch.full_like(pos, layer), torch.full_like(pos, -1)], -1)
                        val = val.float()[:, None, :].expand(-1, 2, -1).contiguous()
                        if failing:
                            val = torch.full_like(val, float("nan"))
                        append(cache, layer, val, val)
            except Failure:
                stats["failed inside"] += 1
            except RuntimeError as e:
                assert "out of pages" in str(e)
                stats["refused for pages"] += 1
            else:
                for s, n in zip(slots, new):
                    lengths[s] += n
                stats["steps"] += 1
        assert all(cache.seq_len(s) == n for s, n in lengths.items())
        for g in cache._groups:
            assert g.pages_in_use == sum(kept[id(g.pattern)][n] for n in lengths.values())
        if it % 500 == 0:
            for slot, n in lengths.items():
                for layer in range(3):
                    stored = cache.gather(layer, slot, n)[0][:, 0]  # (n, 4): sequence, position, layer, -1
                    present = stored.abs().sum(-1) > 0  # zeros: no page kept for that block
                    expect = torch.stack([torch.full((n,), float(owner[slot])), torch.arange(n).float(),
                                          torch.full((n,), float(layer)), torch.full((n,), -1.0)], -1)
                    assert torch.equal(stored[present], expect[present]), (it, slot, layer)
                    assert n == 0 or present[-1]  # the newest token is kept (local window of 2 blocks)
    heap_growth = tracemalloc.get_traced_memory()[0] - heap_start
    tracemalloc.stop()
    for slot in list(owner):
        cache.remove_sequence(slot)
    assert all(cache.pages_in_use(layer) == 0 for layer in range(3))
    record_property("summary", f"cache soak: {stats['attempted']} steps tried: {stats['steps']} done, "
                    f"{stats['failed inside']} failed inside and rolled back, {stats['refused for pages']} refused "
                    f"for pages; {stats['sequences']} sequences ({stats['removed']} removed); Python heap "
                    f"{heap_growth:+d} bytes over the last {SOAK_STEPS // 2} steps")
    assert stats["failed inside"] > 100
    assert heap_growth < 64 * 1024
