"""Attention across GPUs on ``torch.distributed``: head (tensor) parallelism and context parallelism.

**Head parallelism** (:func:`head_parallel_attention`): each rank of a group holds ``heads / world``
query heads (and their kv heads) of every token. No communication is needed: the rank attends
with the pattern sliced to its head range (:func:`shard_heads`), which keeps every head's global
index, so the result is exactly those heads of the single-process layer.

**Context parallelism** (:func:`context_parallel_attention`): each rank holds a slice of the
sequence, in the zig-zag order that balances causal work: the sequence is cut into ``2 * world``
equal chunks and rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r`` (:func:`zigzag_split`,
:func:`zigzag_merge`; the order Megatron-core uses). Before attending, the ranks swap, in one
``all_to_all``, only the key/value tokens that their queries' pattern reads, *per kv head*: a
local-stride head needs the tail of the preceding chunk and its own vertical blocks, not the whole
sequence. The amount is planned from the pattern once per shape, in vectorised steps linear in the
number of blocks (closed form for rule patterns), and every rank derives the same reads, so no sizes
are exchanged; a rank keeps only its own sends and receives, as runs of rows. For each of its two
query chunks a rank then lays the gathered keys of each kv head out in absolute order (the query
chunk's own blocks last) and attends through :func:`s2attn.remap.remapped_attention`: the pattern's
own rule on absolute blocks, through a ``(kv_heads, packed blocks)`` map, with no mask and no
tables. The result is exact, and the backward pass returns dK/dV to their owners through the
differentiable ``all_to_all``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from ..api import sparse_attention
from ..lowering import memo
from ..patterns import BlockPattern
from ..remap import remapped_attention
from ..validation import check_layout

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank and the group size; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _to_bshd(layout: str, *xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) if check_layout(layout) == "bhsd" else x for x in xs]


# ---------------------------------------------------------------------------- head parallelism
def head_range(num_heads: int, rank: int, world: int) -> tuple[int, int]:
    """Query heads ``[start, stop)`` held by ``rank`` of ``world`` (contiguous, as Megatron's TP)."""
    if num_heads % world:
        raise ValueError(f"num_heads={num_heads} is not divisible by the group size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world={world}")
    per = num_heads // world
    return rank * per, (rank + 1) * per


def kv_head_range(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    """Kv heads ``[start, stop)`` that ``rank``'s query heads read.

    With ``num_kv_heads >= world`` these are ``num_kv_heads / world`` heads of the rank's own; with
    fewer kv heads than ranks (``world % num_kv_heads == 0``) each kv head is replicated on
    ``world / num_kv_heads`` ranks and the range is the one kv head of the rank's query heads.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if num_kv_heads % world == 0:
        return head_range(num_kv_heads, rank, world)
    if world % num_kv_heads == 0:
        g = head_range(num_heads, rank, world)[0] // (num_heads // num_kv_heads)
        return g, g + 1
    raise ValueError(f"num_kv_heads={num_kv_heads} and group size {world}: expected one to divide the other")


def shard_heads(pattern: BlockPattern, rank: int, world: int) -> BlockPattern:
    """The pattern of ``rank``'s query heads (a shared pattern is returned as is)."""
    if pattern.num_heads is None:
        return pattern
    return pattern.heads(*head_range(pattern.num_heads, rank, world))


def head_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    group: dist.ProcessGroup | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
) -> Output:
    """Sparse attention on this rank's share of the heads; equal to those heads of the full layer.

    Args:
        q: ``(batch, seqlen_q, heads / world, d)`` (``bhsd``: heads second): query heads
            :func:`head_range` ``(heads, rank, world)`` of the full layer.
        k, v: ``(batch, seqlen_k, local_kv_heads, d)``: kv heads :func:`kv_head_range` of the layer
            (one replicated kv head when the layer has fewer kv heads than ranks).
        pattern: the *full* layer's pattern over ``heads`` query heads (or a shared one).
        group: the tensor-parallel group (default: the world); only its rank and size are used.
        softmax_scale, causal, layout, return_lse: as in :func:`s2attn.sparse_attention`.

    Returns: ``out`` like ``q`` (and ``lse (batch, heads / world, seqlen_q)`` with ``return_lse``).
    """
    rank, world = _rank_world(group)
    h_axis = 2 if layout == "bshd" else 1
    local_heads, local_kv = q.shape[h_axis], k.shape[h_axis]
    if pattern.num_heads is not None:
        if pattern.num_heads != local_heads * world:
            raise ValueError(f"q has {local_heads} heads on each of {world} ranks, but the pattern has "
                             f"{pattern.num_heads} heads: pass the full layer's pattern")
        r = pattern.rule
        if r is not None and r.head_base == 0 and r.num_dense_heads < r.num_kv_heads:
            start, stop = kv_head_range(pattern.num_heads, r.num_kv_heads, rank, world)
            if local_kv != stop - start:
                raise ValueError(f"k has {local_kv} kv heads: rank {rank} of {world} should hold kv heads "
                                 f"[{start}, {stop}) of the pattern's {r.num_kv_heads}")
    return sparse_attention(q, k, v, shard_heads(pattern, rank, world), softmax_scale=softmax_scale,
                            causal=causal, layout=layout, return_lse=return_lse)


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad, recv_splits, send_splits, ctx.group), None, None, None


# ---------------------------------------------------------------------------- zig-zag layout
def zigzag_ranges(seq_len: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The two token ranges ``[(start, stop), (start, stop)]`` that ``rank`` holds: chunks ``rank``
    and ``2 * world - 1 - rank`` of ``2 * world`` equal chunks."""
    if seq_len % (2 * world):
        raise ValueError(f"seq_len={seq_len}: context parallelism over {world} ranks needs a multiple of "
                         f"2 * world = {2 * world} tokens")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world={world}")
    c = seq_len // (2 * world)
    return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]


def zigzag_split(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full sequence ``x`` along ``dim``: chunks ``rank`` and ``2*world-1-rank``."""
    (a0, e0), (a1, e1) = zigzag_ranges(x.shape[dim], rank, world)
    return torch.cat([x.narrow(dim, a0, e0 - a0), x.narrow(dim, a1, e1 - a1)], dim)


def zigzag_merge(parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`: the full sequence from every rank's part, in rank order."""
    world = len(parts)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([halves[i][0] for i in range(world)] + [halves[i][1] for i in reversed(range(world))], dim)


# ---------------------------------------------------------------------------- which keys a query range reads
def needed_key_blocks(pattern: BlockPattern, heads: torch.Tensor, q_first: int, q_last: int,
                      seq_len: int) -> torch.Tensor:
    """Bool ``(ceil(seq_len / block_size),)``: key blocks that any of ``heads`` (query-head indices of
    the pattern) reads from any query block in ``[q_first, q_last]``.

    Closed form for rule patterns (linear in the number of blocks, nothing quadratic at a million
    tokens); the union of the mask's rows for mask patterns.
    """
    n = pattern.num_blocks(seq_len)
    j = torch.arange(n)
    r = pattern.rule
    heads = heads if pattern.num_heads is not None else torch.zeros(1, dtype=torch.long)
    if r is None:
        return pattern.block_mask(seq_len)[heads, q_first:q_last + 1].any(0).any(0)
    reach = j <= q_last if pattern.causal else torch.ones(n, dtype=torch.bool)
    if bool(r.is_dense(heads).any()):
        return reach
    hi = q_last if pattern.causal else q_last + r.local_blocks - 1
    local = (j > q_first - r.local_blocks) & (j <= hi)
    shifts = r.shift(heads).unique()
    vertical = ((j[None, :] + shifts[:, None]) % r.vert_stride == 0).any(0)
    return local | (vertical & reach)


def _check_chunking(pattern: BlockPattern, seq_len: int, world: int, causal: bool) -> None:
    c = seq_len // (2 * world)
    if not causal and c % pattern.block_size:
        raise ValueError(f"seq_len={seq_len} over {world} ranks gives chunks of {c} tokens: non-causal "
                         f"context parallelism needs chunks that are a multiple of block_size="
                         f"{pattern.block_size}, i.e. seq_len a multiple of {2 * world * pattern.block_size}")


def _owner(pos: torch.Tensor, seq_len: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank holding each token position, and its row in that rank's local (zig-zag) sequence."""
    c = seq_len // (2 * world)
    chunk = pos // c
    first = chunk < world
    owner = torch.where(first, chunk, 2 * world - 1 - chunk)
    local = pos - chunk * c + torch.where(first, 0, c)
    return owner, local


@dataclass
class _Chunk:
    """One query chunk ``[a, e)`` of a rank: its local rows, the map of its packed keys to absolute
    blocks (:mod:`s2attn.remap`), and where its packed keys sit in the receive buffer, as runs."""

    rows: slice
    a: int
    key_blocks: torch.Tensor  # int32 (kv_heads, packed blocks): absolute block of each packed key block, -1: padding
    width: int  # packed keys of each kv head, padding included
    runs: torch.Tensor  # int64 (runs, 4): kv head, first packed key, first receive row, length
    on_device: dict = field(default_factory=dict)

    def gather_index(self, pad_row: int) -> torch.Tensor:
        """Int64 ``(kv_heads, width)``: the receive row of each packed key (``pad_row``, a zero row: padding)."""
        g, packed, recv, length = self.runs.unbind(1)
        index = torch.full((len(self.key_blocks), self.width), pad_row, dtype=torch.long)
        index.view(-1)[_ranges(g * self.width + packed, length)] = _ranges(recv, length)
        return index


@dataclass
class _Plan:
    """What one rank sends and receives. ``send_runs`` (int64 ``(runs, 3)``: kv head, first local row,
    length), in send order: per destination, per kv head, ascending; the receive buffer is in the same
    order seen from the other side (per source, per kv head, ascending)."""

    send_runs: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    chunks: list[_Chunk]
    kv_heads: int
    on_device: dict = field(default_factory=dict)

    def send_index(self) -> torch.Tensor:
        """Int64: rows of the ``(local tokens * kv_heads)`` key/value rows, in send order."""
        g, local, length = self.send_runs.unbind(1)
        return _ranges(local, length) * self.kv_heads + g.repeat_interleave(length)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The ranges ``[start, start + length)`` one after another (int64), without a Python loop."""
    ends = lengths.cumsum(0)
    return torch.arange(int(ends[-1]) if len(ends) else 0) + (starts - (ends - lengths)).repeat_interleave(lengths)


def _runs(cols: list[torch.Tensor], starts: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
    """Int64 rows ``(*cols, *starts, length)``, consecutive rows merged into one run where every ``col`` is
    equal and every ``start`` continues the previous row's range."""
    if not len(lengths):
        return torch.zeros(0, len(cols) + len(starts) + 1, dtype=torch.long)
    cont = torch.ones(len(lengths) - 1, dtype=torch.bool)
    for c in cols:
        cont &= c[1:] == c[:-1]
    for s in starts:
        cont &= s[1:] == s[:-1] + lengths[:-1]
    new = torch.cat([torch.ones(1, dtype=torch.bool), ~cont])
    first = new.nonzero().squeeze(1)
    total = torch.zeros(len(first), dtype=torch.long).index_add_(0, new.cumsum(0) - 1, lengths)
    return torch.stack([c[first] for c in cols] + [s[first] for s in starts] + [total], 1)


@dataclass
class _Atoms:
    """The sequence cut at every block and every zig-zag chunk boundary: each atom lies in one key block and
    on one rank. ``O(blocks + world)`` of them; the plan is computed over atoms, never over tokens."""

    start: torch.Tensor
    length: torch.Tensor
    block: torch.Tensor
    owner: torch.Tensor
    local: torch.Tensor  # first row in the owner's local (zig-zag) sequence

    @staticmethod
    def of(seq_len: int, world: int, block_size: int) -> "_Atoms":
        c = seq_len // (2 * world)
        cuts = torch.unique(torch.cat([torch.arange(0, seq_len, block_size), torch.arange(0, seq_len, c),
                                       torch.tensor([seq_len])]))
        start = cuts[:-1]
        return _Atoms(start, cuts[1:] - start, start // block_size, *_owner(start, seq_len, world))


def _chunk_reads(pattern: BlockPattern, atoms: _Atoms, a: int, e: int, seq_len: int, kv_heads: int, heads: int,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Query chunk ``[a, e)``: bool ``(kv_heads, blocks)`` of the key blocks outside its own blocks that each
    kv head reads (before the chunk when causal), and bool ``(kv_heads, atoms)`` of the atoms it reads: its
    blocks, cut at ``e`` (a causal chunk reads no key past its end; non-causal chunks are whole blocks)."""
    B, per_group = pattern.block_size, heads // kv_heads
    lo, hi = a // B, (e - 1) // B
    j = torch.arange(pattern.num_blocks(seq_len))
    keep = ((j < lo) | (j > hi)) & ((j < lo) if causal else True)
    outside = torch.stack([needed_key_blocks(pattern, torch.arange(g * per_group, (g + 1) * per_group), lo, hi,
                                             seq_len) & keep for g in range(kv_heads)])
    own = (atoms.block >= lo) & (atoms.block <= hi)
    reads = (outside[:, atoms.block] | own) & ((atoms.block > hi) | (atoms.start < e))
    return outside, reads


def _build_plan(pattern: BlockPattern, seq_len: int, world: int, rank: int, heads: int, kv_heads: int,
                causal: bool) -> _Plan:
    """The exchange and the packed layouts of ``rank``, in ``O(world * kv_heads * blocks)`` vectorised steps.

    Every rank derives the same reads of every query chunk (that is why no sizes are exchanged), but keeps
    only its own sends and receives, as runs of rows, and its two chunks' maps."""
    atoms = _Atoms.of(seq_len, world, pattern.block_size)
    n_atoms = len(atoms.start)
    chunks = [(r, a, e) for r in range(world) for a, e in zigzag_ranges(seq_len, r, world)]
    reads_of = [torch.zeros(kv_heads, n_atoms, dtype=torch.bool) for _ in range(world)]
    mine = []
    for reader, a, e in chunks:
        outside, reads = _chunk_reads(pattern, atoms, a, e, seq_len, kv_heads, heads, causal)
        reads_of[reader] |= reads
        if reader == rank:
            mine.append((a, e, outside, reads))
    # sends: per destination, per kv head, the atoms it reads that this rank holds, ascending
    send_runs, send_splits = [], []
    for p in range(world):
        g, i = (reads_of[p] & (atoms.owner == rank)).nonzero(as_tuple=True)
        send_runs.append(_runs([g], [atoms.local[i]], atoms.length[i]))
        send_splits.append(int(atoms.length[i].sum()))
    # receives: the same order seen from here; the first receive row of each (kv head, atom) read
    g, i = reads_of[rank].nonzero(as_tuple=True)
    order = torch.argsort((atoms.owner[i] * kv_heads + g) * n_atoms + i)
    g, i = g[order], i[order]
    length = atoms.length[i]
    recv_row = torch.full((kv_heads, n_atoms), -1, dtype=torch.long)
    recv_row[g, i] = length.cumsum(0) - length
    recv_splits = torch.zeros(world, dtype=torch.long).index_add_(0, atoms.owner[i], length).tolist()
    return _Plan(torch.cat(send_runs), send_splits, recv_splits,
                 [_packed_chunk(c, a, e, outside, reads, atoms, recv_row, pattern.block_size)
                  for c, (a, e, outside, reads) in enumerate(mine)], kv_heads)


def _packed_chunk(c: int, a: int, e: int, outside: torch.Tensor, reads: torch.Tensor, atoms: _Atoms,
                  recv_row: torch.Tensor, B: int) -> _Chunk:
    """Chunk ``c`` of a rank: each kv head's packed keys are its outside blocks ascending, then the chunk's own
    blocks, right-aligned (padding first)."""
    kv_heads = len(outside)
    lo, hi = a // B, (e - 1) // B
    m = hi - lo + 1
    count = outside.sum(1)
    n = int(count.max()) + m
    key_blocks = torch.full((kv_heads, n), -1, dtype=torch.int32)
    g, j = outside.nonzero(as_tuple=True)
    within = torch.arange(len(g)) - (count.cumsum(0) - count)[g]
    key_blocks[g, n - m - count[g] + within] = j.to(torch.int32)
    key_blocks[:, n - m:] = torch.arange(lo, hi + 1, dtype=torch.int32)
    # packed keys: outside atoms ascending, then own atoms ascending, per kv head
    own = (atoms.block >= lo) & (atoms.block <= hi)
    g_out, i_out = (reads & ~own).nonzero(as_tuple=True)
    g_own, i_own = (reads & own).nonzero(as_tuple=True)
    g, i = torch.cat([g_out, g_own]), torch.cat([i_out, i_own])
    order = torch.argsort(g, stable=True)
    g, i = g[order], i[order]
    length = atoms.length[i]
    tokens = torch.zeros(kv_heads, dtype=torch.long).index_add_(0, g, length)
    width = int(tokens.max())  # the kv head with the most blocks has no padding
    pad = width - tokens
    if bool((pad % B != 0).any()) or -(-width // B) != n:  # every packed block but the last is whole
        raise AssertionError(f"packed keys of chunk [{a}, {e}) are not block-aligned: padding {pad.tolist()}")
    within = length.cumsum(0) - length - (tokens.cumsum(0) - tokens)[g]
    runs = _runs([g], [pad[g] + within, recv_row[g, i]], length)
    rows = slice(c * (e - a), (c + 1) * (e - a))
    return _Chunk(rows, a, key_blocks, width, runs)


def _plan_for(pattern: BlockPattern, seq_len: int, world: int, rank: int, heads: int, kv_heads: int,
              causal: bool) -> _Plan:
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads and k, v have {kv_heads}: expected a multiple")
    pattern.check_heads(heads)
    pattern.check_seq_len(seq_len, "seq_len (global, local * world)")
    zigzag_ranges(seq_len, rank, world)
    _check_chunking(pattern, seq_len, world, causal)
    key = ("context_parallel_plan", seq_len, world, rank, heads, kv_heads, causal)
    return memo(pattern, key, lambda: _build_plan(pattern, seq_len, world, rank, heads, kv_heads, causal))


def _on(holder, device: torch.device, name: str, build) -> torch.Tensor:
    """``build()`` on ``device``, built once per holder and device."""
    if (name, device) not in holder.on_device:
        holder.on_device[(name, device)] = build().to(device)
    return holder.on_device[(name, device)]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    group: dist.ProcessGroup | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
) -> Output:
    """Sparse self-attention over a sequence split across the ranks of ``group`` in zig-zag order.

    Every rank of the group must call it with the same pattern and shapes.

    Args:
        q: ``(batch, seqlen / world, heads, d)``: this rank's queries, i.e.
            ``zigzag_split(q_full, rank, world, dim=1)`` (``bhsd``: heads second, ``dim=2``).
        k, v: ``(batch, seqlen / world, kv_heads, d)``, split the same way.
        pattern: the layer's pattern over ``heads`` heads (slice it first with :func:`shard_heads`
            when heads are also split by tensor parallelism). ``seqlen`` must be a multiple of
            ``2 * world``; for ``causal=False`` also of ``2 * world * block_size``.
        group: the context-parallel group (default: the world).
        softmax_scale, causal, layout, return_lse: as in :func:`s2attn.sparse_attention`.

    Returns: this rank's rows of the full attention, ``out`` like ``q`` (and ``lse (batch, heads,
    seqlen / world)``), exact in values and in the gradients of ``q``, ``k`` and ``v``.
    """
    rank, world = _rank_world(group)
    q, k, v = _to_bshd(layout, q, k, v)
    batch, s_local, heads, _ = q.shape
    kv_heads = k.shape[2]
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[:2] != (batch, s_local):
            raise ValueError(f"{name}.shape={tuple(x.shape)}: expected batch {batch} and {s_local} local tokens "
                             f"like q ({layout})")
    causal = pattern.causal if causal is None else causal
    plan = _plan_for(pattern, s_local * world, world, rank, heads, kv_heads, causal)
    # one row per (local token, kv head): keys and values of every batch entry side by side
    kv = torch.cat([k, v], -1).permute(1, 2, 0, 3).reshape(s_local * kv_heads, batch, -1)
    sent = kv.index_select(0, _on(plan, q.device, "send_index", plan.send_index))
    received = sent if world == 1 else _AllToAll.apply(sent, plan.send_splits, plan.recv_splits, group)
    table = torch.cat([received, received.new_zeros((1,) + tuple(received.shape[1:]))])
    outs, lses = [], []
    for chunk in plan.chunks:
        index = _on(chunk, q.device, "index", lambda: chunk.gather_index(len(received)))
        packed = table[index].permute(2, 1, 0, 3)  # (batch, K, kv_heads, dk + dv)
        k_c, v_c = packed.split([k.shape[-1], v.shape[-1]], -1)
        out, lse = remapped_attention(q[:, chunk.rows], k_c, v_c, pattern, chunk.key_blocks, chunk.a,
                                      softmax_scale=softmax_scale, causal=causal, return_lse=True)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 1)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, torch.cat(lses, 2)) if return_lse else out


def context_parallel_comm_bytes(
    pattern: BlockPattern,
    seq_len: int,
    world: int,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_heads: int | None = None,
    batch: int = 1,
    element_size: int = 2,
    causal: bool | None = None,
) -> dict:
    """Bytes of keys+values each rank receives from the others in one forward pass of
    :func:`context_parallel_attention`, next to an all-gather of the full keys and values.

    The backward pass moves the same amount again (the gradients go back to their owners), as
    a reduce-scatter would after an all-gather. Returns ``{"sparse": [bytes per rank],
    "all_gather": bytes per rank, "ratio": max(sparse) / all_gather}``.
    """
    heads = pattern.num_heads if num_heads is None else num_heads
    if heads is None:
        raise ValueError("num_heads: required for a pattern shared by all heads")
    causal = pattern.causal if causal is None else causal
    row = batch * 2 * head_dim * element_size
    sparse = []
    for r in range(world):
        plan = _plan_for(pattern, seq_len, world, r, heads, num_kv_heads, causal)
        sparse.append((sum(plan.recv_splits) - plan.recv_splits[r]) * row)
    gather = (world - 1) * (seq_len // world) * num_kv_heads * row
    return {"sparse": sparse, "all_gather": gather, "ratio": max(sparse) / gather if gather else 0.0}


__all__ = [
    "context_parallel_attention", "context_parallel_comm_bytes", "head_parallel_attention", "head_range",
    "kv_head_range", "needed_key_blocks", "shard_heads", "zigzag_merge", "zigzag_ranges", "zigzag_split",
]
