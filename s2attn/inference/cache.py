"""A paged KV cache with one page table per (sequence, kv head) that frees, after every
step, the key blocks no future query of that head can read.

Why it works: the vertical blocks of a local-stride pattern are chosen by *absolute*
block index, so whether a kv head will ever read key block ``j`` again depends only on
``j`` and on where the newest query is. For every pattern the cache keeps a table
``last_reader[kv_head, j]``: the last query block, over the query heads of that kv
group, that reads key block ``j`` (closed form for local-stride rules: ``j + local - 1``,
or "forever" for vertical blocks and dense heads; from the block mask otherwise). Once
the next query's block passes it, block ``j``'s page goes back to the pool, and a block
of a long prompt that only the prompt's own queries read never gets a page at all.

This is exact for every causal pattern. For a KV-cache-efficient one (no key block is
skipped by a query block and read again by a later one) whose query heads agree within
a kv group, the pages left are exactly the blocks the next query reads, so decode reads
nothing it does not need. For other patterns a page stays while any later query of the
group reads it, and decode applies each head's mask row to the pages it finds (more
memory and reads than the ideal, still exact). Bidirectional patterns have no meaning
for a decoding cache and are refused.

Layout: layers built with the same :class:`~s2attn.BlockPattern` object share one page
table and free list (their pages are allocated and freed in lockstep) but each layer has
its own K and V pools ``(num_pages + 1, block_size, head_dim)``. The extra last page
takes the writes of tokens that no query will ever read, so writing never needs a
host-side branch. Sequences live in *slots* (``add_sequence`` / ``remove_sequence``, at
any time; a slot in the step in progress cannot be removed). A step (``begin_step`` ... ``end_step``) adds tokens to some
slots: ``begin_step`` reserves pages in every layer at once — or raises before changing
anything — then each layer writes its keys/values and attends, and ``end_step`` frees
the pages the sequences have moved past.

A step is a transaction: it completes for every layer or changes nothing. ``abort_step``
(which ``with cache.step(...)`` calls on any exception, ``KeyboardInterrupt`` and errors of
the caller's own model included) puts lengths, page tables and free lists back as they were.
What a failed step wrote is never read: every read stops at the sequence's length, and a
page is zeroed whenever it is handed out, so a new owner never sees a former owner's values
even where it has not written yet.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple, Sequence

import torch

from ..patterns import BlockPattern, cdiv

NEVER = 2**62  # last reader of a block that every future query reads (vertical blocks, dense heads)


class Layer(NamedTuple):
    """One layer's storage, as :meth:`SparseKVCache.layer` returns it."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    page_table: torch.Tensor
    pattern: BlockPattern


def last_readers(pattern: BlockPattern, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Int64 ``(num_kv_heads, max_blocks)``: the last query block that reads key block ``j``,
    over the query heads of each kv group; ``NEVER`` when every later query reads it, -1 when
    none does."""
    if not pattern.causal:
        raise ValueError("pattern: a decoding KV cache needs a causal pattern, got causal=False")
    pattern.check_heads(num_heads, "num_heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    nb = pattern.max_blocks
    j = torch.arange(nb)
    heads = torch.arange(num_heads)
    r = pattern.rule
    if r is not None:
        forever = r.is_dense(heads)[:, None] | ((j[None, :] + r.shift(heads)[:, None]) % r.vert_stride == 0)
        last = torch.where(forever, NEVER, j[None, :] + r.local_blocks - 1)
    else:
        mask = pattern.block_mask(pattern.max_seq_len)
        rows = torch.arange(nb, dtype=torch.int32)[:, None]
        below = rows >= j[None, :].int()  # causal: only query blocks i >= j read block j
        last = torch.stack([torch.where(m & below, rows, -1).amax(0) for m in mask]).long()
        last = last.expand(num_heads, nb) if last.shape[0] == 1 else last
    return last.reshape(num_kv_heads, num_heads // num_kv_heads, nb).amax(1)


def kv_blocks_kept(pattern: BlockPattern, num_heads: int, num_kv_heads: int, seq_len: int) -> torch.Tensor:
    """Int64 ``(num_kv_heads,)``: pages the cache holds per kv head for one sequence of ``seq_len``
    tokens after a step: the blocks some query at position ``>= seq_len`` still reads."""
    pattern.check_seq_len(seq_len)
    last = last_readers(pattern, num_heads, num_kv_heads)
    return (last[:, : cdiv(seq_len, pattern.block_size)] >= seq_len // pattern.block_size).sum(1)


def sequences_that_fit(
    memory_bytes: int,
    seq_len: int,
    pattern: BlockPattern,
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """How many ``seq_len``-token sequences fit in ``memory_bytes`` of KV cache, with this cache
    (``pattern`` in every layer) and with a dense one, plus the bytes one sequence takes in each."""
    elem = torch.empty((), dtype=dtype).element_size()
    kept = int(kv_blocks_kept(pattern, num_heads, num_kv_heads, seq_len).sum())
    sparse = num_layers * kept * pattern.block_size * head_dim * elem * 2
    dense = num_layers * num_kv_heads * seq_len * head_dim * elem * 2
    return {"sparse": memory_bytes // sparse, "dense": memory_bytes // dense,
            "bytes_per_sequence_sparse": sparse, "bytes_per_sequence_dense": dense}


class Step:
    """The tokens one step adds: ``slots[i]`` goes from ``cached[i]`` to ``cached[i] + new[i]``
    tokens. Device index tensors are built on first use."""

    def __init__(self, slots: list[int], cached: list[int], new: list[int], device: torch.device):
        self.slots, self.cached, self.new, self.device = slots, cached, new, device
        self.total_new = sum(new)
        self.max_new = max(new)
        self.max_total = max(c + n for c, n in zip(cached, new))
        self.decode_plan = None  # built by decode() on first use, shared by the step's layers
        self.ending = False  # end_step() has begun: the step can only be finished, no longer undone

    @functools.cached_property
    def cu_seqlens_q(self) -> torch.Tensor:
        """Int32 ``(batch + 1,)``: offsets of each sequence's new tokens in a packed batch."""
        return torch.tensor([0] + self.new, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)

    @functools.cached_property
    def cu_seqlens_k(self) -> torch.Tensor:
        """Int32 ``(batch + 1,)``: offsets of each sequence's keys, cached plus new."""
        lens = [c + n for c, n in zip(self.cached, self.new)]
        return torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)

    @functools.cached_property
    def token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot, position)`` int64 ``(total_new,)`` of every new token, packed in batch order."""
        new = torch.tensor(self.new)
        slot = torch.tensor(self.slots).repeat_interleave(new)
        starts = torch.tensor([0] + self.new[:-1]).cumsum(0) - torch.tensor(self.cached)
        pos = torch.arange(self.total_new) - starts.repeat_interleave(new)
        return slot.to(self.device), pos.to(self.device)


class _PageGroup:
    """Page table, free list and per-layer pools of the layers that share one pattern."""

    def __init__(self, pattern: BlockPattern, layers: list[int], num_pages: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, max_seqs: int, dtype: torch.dtype, device: torch.device):
        self.pattern, self.layers, self.num_pages = pattern, layers, num_pages
        self.block = pattern.block_size
        self.last = last_readers(pattern, num_heads, num_kv_heads)
        shape = (len(layers), num_pages + 1, self.block, head_dim)  # + the trash page
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.full((max_seqs, num_kv_heads, pattern.max_blocks), -1, dtype=torch.int32)
        self.table_dev = self.table.to(device)
        self.free = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32)  # a stack: top at the end
        self.top = num_pages

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self.top

    def _set(self, idx: tuple[torch.Tensor, ...], pages: torch.Tensor) -> None:
        self.table[idx] = pages
        dev = self.table_dev.device
        self.table_dev[tuple(i.to(dev) for i in idx)] = pages.to(dev)

    def _push(self, pages: torch.Tensor) -> None:
        self.free[self.top : self.top + len(pages)] = pages
        self.top += len(pages)

    def to_allocate(self, slots: torch.Tensor, n0: torch.Tensor, n1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(slot, kv_head, block)`` of the new blocks some query of this step's last tokens or later
        reads through the cache (blocks only the prefill itself reads are never stored)."""
        nb0, nb1 = cdiv(n0, self.block), cdiv(n1, self.block)
        width = int((nb1 - nb0).max())
        if width == 0:
            return (torch.empty(0, dtype=torch.long),) * 3
        j = nb0[:, None] + torch.arange(width)[None, :]  # (seqs, width)
        last = self.last[:, j.clamp(max=self.last.shape[1] - 1)].permute(1, 0, 2)  # (seqs, kv_heads, width)
        need = (j < nb1[:, None])[:, None, :] & (last >= ((n1 - 1) // self.block)[:, None, None])
        s, h, w = need.nonzero(as_tuple=True)
        return slots[s], h, j[s, w]

    def allocate(self, idx: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Give blocks ``idx`` pages off the top of the free stack, zeroed in every layer's K and V pools
        (no former owner's values stay readable); returns the pages, for :meth:`give_back`."""
        count = len(idx[0])
        pages = self.free[self.top - count : self.top].clone()
        self.top -= count
        self._set(idx, pages)
        if count:
            dev = pages.to(device=self.k.device, dtype=torch.long)
            self.k.index_fill_(1, dev, 0)
            self.v.index_fill_(1, dev, 0)
        return pages

    def give_back(self, idx: tuple[torch.Tensor, ...], pages: torch.Tensor) -> None:
        """Undo :meth:`allocate`: the blocks lose their pages, which go back on the free stack in the
        order they left it."""
        self._set(idx, torch.full((len(pages),), -1, dtype=torch.int32))
        self._push(pages)

    def evict(self, slots: torch.Tensor, n0: torch.Tensor, n1: torch.Tensor) -> None:
        """Free the pages of blocks no query at or after position ``n1`` reads."""
        c1 = n1 // self.block
        moved = c1 > n0 // self.block  # only a sequence whose next query block advanced frees anything
        if not bool(moved.any()):
            return
        slots, c1, nb = slots[moved], c1[moved], int(cdiv(n1[moved], self.block).max())
        rows = self.table[slots, :, :nb]
        drop = (rows >= 0) & (self.last[None, :, :nb] < c1[:, None, None])
        s, h, j = drop.nonzero(as_tuple=True)
        self._push(rows[s, h, j])
        self._set((slots[s], h, j), torch.full((len(s),), -1, dtype=torch.int32))

    def release(self, slot: int) -> None:
        row = self.table[slot]
        self._push(row[row >= 0])
        row.fill_(-1)
        self.table_dev[slot].fill_(-1)


class SparseKVCache:
    """Paged KV cache for ``num_layers`` attention layers, one page table per (sequence, kv head).

    Args:
        patterns: one causal :class:`~s2attn.BlockPattern` for every layer, or a list of one per
            layer (e.g. sparse layers and a few ``dense`` ones). Layers given the *same object*
            share page tables.
        num_heads, num_kv_heads, head_dim: the attention shape (``num_heads % num_kv_heads == 0``).
        num_pages: pages in each layer's pool (an int, or one per layer, equal within a pattern);
            a page holds ``block_size`` tokens of one kv head: ``block_size * head_dim`` values of K
            and as many of V. :func:`kv_blocks_kept` gives the pages one sequence needs.
        max_seqs: sequence slots (rows of the page tables).
        dtype, device: of the pools.
        max_seq_len: the longest sequence a step may make (refused before anything changes); default
            and upper bound: the patterns' shortest ``max_seq_len``.

    State a kernel reads: ``seq_lens`` int32 ``(max_seqs,)`` on ``device``, and per layer
    :meth:`layer` = ``(k_pages, v_pages, page_table, pattern)``. A dense pattern (or dense heads)
    keeps every page of its heads; a sequence longer than a pattern's ``max_seq_len`` is refused.
    The page tables take ``4 * max_seqs * num_kv_heads * ceil(max_seq_len / block_size)`` bytes per
    distinct pattern, on the host and again on the device.
    """

    def __init__(
        self,
        patterns: BlockPattern | Sequence[BlockPattern],
        *,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int | Sequence[int],
        max_seqs: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        max_seq_len: int | None = None,
    ):
        patterns = [patterns] * num_layers if isinstance(patterns, BlockPattern) else list(patterns)
        pages = [num_pages] * num_layers if isinstance(num_pages, int) else list(num_pages)
        for name, got in (("patterns", patterns), ("num_pages", pages)):
            if len(got) != num_layers:
                raise ValueError(f"{name}: expected one per layer (num_layers={num_layers}), got {len(got)}")
        for name, val in (("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("max_seqs", max_seqs), *((f"num_pages[{i}]", p)
                                                                           for i, p in enumerate(pages))):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}={val!r}: expected a positive int")
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.max_seqs, self.dtype = max_seqs, dtype
        self.device = torch.empty(0, device=device).device  # with its index ("cuda" -> "cuda:0"), as tensors have
        limit = min(p.max_seq_len for p in patterns)
        max_seq_len = limit if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len!r}: expected an int in 1..{limit} (the patterns' shortest "
                             f"max_seq_len)")
        self.max_seq_len = max_seq_len
        by_pattern: dict[int, list[int]] = {}
        for layer, p in enumerate(patterns):
            by_pattern.setdefault(id(p), []).append(layer)
        self._groups: list[_PageGroup] = []
        self._where: list[tuple[_PageGroup, int]] = [None] * num_layers  # type: ignore[list-item]
        for layers in by_pattern.values():
            counts = {pages[i] for i in layers}
            if len(counts) > 1:
                raise ValueError(f"num_pages: layers {layers} share a pattern and must share num_pages, got {counts}")
            group = _PageGroup(patterns[layers[0]], layers, counts.pop(), num_heads, num_kv_heads, head_dim,
                               max_seqs, dtype, self.device)
            self._groups.append(group)
            for i, layer in enumerate(layers):
                self._where[layer] = (group, i)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=self.device)
        self._lens = [0] * max_seqs
        self._active = [False] * max_seqs
        self._kv_index = torch.arange(num_kv_heads, device=self.device)
        self.current_step: Step | None = None
        self._undo: list[tuple[_PageGroup, tuple[torch.Tensor, ...], torch.Tensor]] = []  # the step's allocations

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        """Claim a free slot for a new, empty sequence and return its index."""
        for slot, used in enumerate(self._active):
            if not used:
                self._active[slot] = True
                return slot
        raise RuntimeError(f"SparseKVCache: all max_seqs={self.max_seqs} sequence slots are in use; "
                           f"remove_sequence() one first")

    def remove_sequence(self, slot: int) -> None:
        """Free every page of ``slot`` in every layer and release the slot."""
        self._check_slot(slot)
        if self.current_step is not None and slot in self.current_step.slots:
            raise RuntimeError(f"slot={slot} is part of the step in progress; call end_step() first")
        for group in self._groups:
            group.release(slot)
        self._active[slot] = False
        self._lens[slot] = 0
        self.seq_lens[slot] = 0

    def seq_len(self, slot: int) -> int:
        """Tokens cached for ``slot`` (including those of a step in progress)."""
        self._check_slot(slot)
        return self._lens[slot]

    def _check_slot(self, slot: int) -> None:
        if not (isinstance(slot, int) and 0 <= slot < self.max_seqs and self._active[slot]):
            raise ValueError(f"slot={slot!r}: not an active sequence (add_sequence() returns slots)")

    # ------------------------------------------------------------------ steps
    def begin_step(self, slots: Sequence[int], num_new_tokens: int | Sequence[int]) -> Step:
        """Start a step that appends ``num_new_tokens[i]`` tokens to sequence ``slots[i]``.

        Reserves pages in every layer for the new tokens that a query of this step's last
        tokens or a later one will read. Raises ``RuntimeError`` when a pool is short of pages,
        ``ValueError`` for a bad slot, count or length, before anything is changed. Afterwards
        ``seq_lens`` counts the new tokens. Finish with :meth:`end_step`, or undo with :meth:`abort_step`.
        """
        if self.current_step is not None:
            raise RuntimeError("a step is already in progress; call end_step() first")
        slots = list(slots)
        new = [num_new_tokens] * len(slots) if isinstance(num_new_tokens, int) else list(num_new_tokens)
        if not slots or len(new) != len(slots):
            raise ValueError(f"slots ({len(slots)}) and num_new_tokens ({len(new)}): expected equal, non-zero lengths")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots={slots}: a sequence appears twice in one step")
        for s, n in zip(slots, new):
            self._check_slot(s)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"num_new_tokens={n!r} for slot {s}: expected a positive int")
            if self._lens[s] + n > self.max_seq_len:
                raise ValueError(f"slot {s}: {self._lens[s]} + {n} tokens exceed the cache's max_seq_len="
                                 f"{self.max_seq_len}")
        cached = [self._lens[s] for s in slots]
        slots_t, n0 = torch.tensor(slots), torch.tensor(cached)
        n1 = n0 + torch.tensor(new)
        wanted = [(g, g.to_allocate(slots_t, n0, n1)) for g in self._groups]
        for g, idx in wanted:
            if len(idx[0]) > g.top:
                raise RuntimeError(
                    f"SparseKVCache out of pages: layers {g.layers} need {len(idx[0])} new pages, "
                    f"{g.top} of num_pages={g.num_pages} are free; nothing was written. Remove sequences "
                    f"or build the cache with more num_pages")
        self.current_step = Step(slots, cached, new, self.device)
        try:
            for g, idx in wanted:
                self._undo.append((g, idx, g.allocate(idx)))
            for s, n in zip(slots, n1.tolist()):
                self._lens[s] = n
            self.seq_lens[slots_t.to(self.device)] = n1.to(device=self.device, dtype=torch.int32)
        except BaseException:
            self.abort_step()
            raise
        return self.current_step

    def abort_step(self) -> None:
        """Undo the step in progress: lengths, page tables and free lists return to their state before
        :meth:`begin_step` (a page comes back to the free stack where it was taken). What the step wrote
        is never read: reads stop at the lengths, and pages are zeroed when next handed out."""
        step = self.current_step
        if step is None:
            raise RuntimeError("abort_step() without begin_step()")
        if step.ending:
            raise RuntimeError("abort_step() after end_step() began (and was interrupted): call end_step() again")
        for g, idx, pages in reversed(self._undo):
            g.give_back(idx, pages)
        self._undo = []
        for s, n in zip(step.slots, step.cached):
            self._lens[s] = n
        self.seq_lens[torch.tensor(step.slots, device=self.device)] = torch.tensor(step.cached, dtype=torch.int32,
                                                                                   device=self.device)
        self.current_step = None

    def end_step(self) -> None:
        """Finish the step: free, in every layer, the pages no later query reads."""
        step = self.current_step
        if step is None:
            raise RuntimeError("end_step() without begin_step()")
        step.ending = True  # evicting twice frees nothing twice, so an interrupted end_step() can be repeated
        slots, n0 = torch.tensor(step.slots), torch.tensor(step.cached)
        n1 = n0 + torch.tensor(step.new)
        for g in self._groups:
            g.evict(slots, n0, n1)
        self._undo = []
        self.current_step = None

    @contextlib.contextmanager
    def step(self, slots: Sequence[int], num_new_tokens: int | Sequence[int]) -> Iterator[Step]:
        """``with cache.step(slots, n) as step:`` — :meth:`begin_step`, then :meth:`end_step` when the block
        completes, or :meth:`abort_step` when anything (``KeyboardInterrupt`` included) escapes it."""
        step = self.begin_step(slots, num_new_tokens)
        try:
            yield step
        except BaseException:
            if self.current_step is step:
                self.abort_step()
            raise
        self.end_step()

    # ------------------------------------------------------------------ storage
    def layer(self, layer: int) -> Layer:
        """``(k_pages, v_pages, page_table, pattern)`` of ``layer``, named: pools ``(num_pages + 1, block_size,
        head_dim)`` (the last page is the trash page) and the device page table int32
        ``(max_seqs, num_kv_heads, max_blocks)``, -1 where a block is absent."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer!r}: expected 0..{self.num_layers - 1}")
        group, i = self._where[layer]
        return Layer(group.k[i], group.v[i], group.table_dev, group.pattern)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor) -> None:
        """Store ``k, v (tokens, num_kv_heads, head_dim)`` of tokens at positions ``pos`` of sequences
        ``slot`` (int tensors ``(tokens,)`` on the device; slot -1 skips the token). Pages must be
        reserved by :meth:`begin_step`; tokens of absent blocks land in the trash page. Device-only
        (no host sync), so it can be captured in a CUDA graph."""
        k_pages, v_pages, table, pattern = self.layer(layer)
        for name, t in (("k", k), ("v", v)):
            self.check_input(name, t, (slot.shape[0], self.num_kv_heads, self.head_dim))
        B = pattern.block_size
        live = slot >= 0
        slot, pos = slot.clamp(min=0).long(), pos.clamp(min=0).long()
        page = table[slot[:, None], self._kv_index[None, :], (pos // B)[:, None]]  # (tokens, kv_heads)
        page = torch.where(live[:, None] & (page >= 0), page, k_pages.shape[0] - 1).long()
        offset = (pos % B)[:, None].expand_as(page)
        k_pages.index_put_((page, offset), k)
        v_pages.index_put_((page, offset), v)

    def gather(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(length, num_kv_heads, head_dim)`` of the first ``length`` tokens of ``slot``
        in ``layer``, read from the pages; zeros in blocks that have no page (freed or never stored)."""
        k_pages, v_pages, table, pattern = self.layer(layer)
        nb = cdiv(length, pattern.block_size)
        pages = table[slot, :, :nb].long()  # (kv_heads, nb)
        present = (pages >= 0)[:, :, None, None]
        k, v = (torch.where(present, pool[pages.clamp(min=0)], 0)  # (kv_heads, nb, block, head_dim)
                .reshape(self.num_kv_heads, nb * pattern.block_size, self.head_dim)[:, :length].transpose(0, 1)
                for pool in (k_pages, v_pages))
        return k, v

    def check_input(self, name: str, t: object, shape: tuple[int, ...]) -> None:
        """Raise unless ``t`` is a tensor of ``shape`` in the cache's dtype, on its device."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise TypeError(f"{name}.dtype={t.dtype}: expected the cache's dtype {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} is on device {t.device}: expected the cache's device {self.device}")

    # ------------------------------------------------------------------ memory
    def pages_in_use(self, layer: int) -> int:
        """Pages of ``layer``'s pool holding a block (each counts for K and V)."""
        self.layer(layer)
        return self._where[layer][0].pages_in_use

    def bytes_in_use(self, layer: int | None = None) -> int:
        """Bytes of K and V held for ``layer``, or for all layers when ``None``."""
        if layer is None:
            return sum(self.bytes_in_use(i) for i in range(self.num_layers))
        group = self._where[layer][0]
        page_bytes = 2 * group.block * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return self.pages_in_use(layer) * page_bytes

    def __repr__(self) -> str:
        active = sum(self._active)
        return (f"SparseKVCache(layers={self.num_layers}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, {self.dtype}, sequences={active}/{self.max_seqs}, "
                f"in use={self.bytes_in_use() / 2**20:.1f} MiB)")


def append(cache: SparseKVCache, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write the current step's new keys and values of ``layer`` into the cache.

    ``k, v (total_new, num_kv_heads, head_dim)``: the new tokens of the step's sequences, packed in
    the order of ``begin_step``'s slots.
    """
    step = _current(cache)
    slot, pos = step.token_index
    cache.write(layer, k, v, slot, pos)


def _current(cache: SparseKVCache) -> Step:
    if cache.current_step is None:
        raise RuntimeError("no step in progress: call cache.begin_step(slots, num_new_tokens) first")
    return cache.current_step


__all__ = ["SparseKVCache", "Step", "append", "kv_blocks_kept", "last_readers", "sequences_that_fit"]
