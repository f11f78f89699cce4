"""Lowering: a :class:`~s2attn.patterns.BlockPattern` into what the kernels read.

Every kernel gets the pattern in one of three forms, all built here:

* :func:`kernel_rule`: a local-stride rule as a :class:`~s2attn.kernels.rule.KernelRule` (nine ints, passed to
  the attention kernels by name), so a million-token sequence needs no index tensor at all;
* :func:`block_tables`: a mask pattern as CSR index tables (which key blocks each query tile reads, and the
  transpose), built once per (pattern, length, tile, device);
* :func:`decode_form`: the decode kernel's per-kv-head rule (or the device block mask).

:func:`lower` picks the attention kernels' form for a call. What lowering builds is memoised here, per pattern
object (:func:`memo`), never on the pattern itself (an immutable value), and goes when the pattern does.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional, TypeVar

import torch

from .kernels.plan import TABLE_BLOCK_M
from .kernels.rule import KernelRule
from .patterns import BlockPattern, cdiv

Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # CSR (ptr, index, bits), int32
T = TypeVar("T")

_MEMO: "weakref.WeakKeyDictionary[BlockPattern, dict]" = weakref.WeakKeyDictionary()


def memo(pattern: BlockPattern, key, build: Callable[[], T]) -> T:
    """``build()``, once per ``(pattern, key)``: index tables, device masks, plans derived from a pattern."""
    built = _MEMO.setdefault(pattern, {})
    if key not in built:
        built[key] = build()
    return built[key]


# ----------------------------------------------------------------------------------- attention kernels
class Lowered(NamedTuple):
    """A pattern as the attention kernels take it for one call: the rule (a placeholder with tables), the row
    and column tables (None for a rule), and whether a rule has dense heads."""

    rule: KernelRule
    rows: Optional[Table]
    cols: Optional[Table]
    has_dense: bool


def kernel_rule(pattern: BlockPattern) -> KernelRule:
    """A local-stride pattern's rule, field by field as the kernels read it."""
    r = pattern.rule
    if r is None:
        raise ValueError("kernel_rule: the pattern is a mask, not a local-stride rule (use block_tables)")
    return KernelRule(local=r.local_blocks, stride=r.vert_stride, step=r.head_step, offset=r.head_offset,
                      heads_per_group=r.heads_per_group, head_base=r.head_base,
                      sparse_groups=r.num_kv_heads - r.num_dense_heads, homogeneous=int(r.homogeneous),
                      pattern_heads=pattern.pattern_heads)


def lower(pattern: BlockPattern, seq_len: int, device: torch.device, causal: bool) -> Lowered:
    """The attention kernels' form of ``pattern`` for a call over ``seq_len`` keys.

    The kernels' rule path derives the block window from ``causal``; a call whose ``causal`` differs from the
    pattern's (e.g. dropping ``s <= t`` inside a causal layout) keeps the pattern's own block layout through the
    tables instead."""
    if pattern.rule is None or causal != pattern.causal:
        rows, cols = block_tables(pattern, seq_len, TABLE_BLOCK_M, device)
        return Lowered(KernelRule.for_tables(pattern.pattern_heads), rows, cols, False)
    return Lowered(kernel_rule(pattern), None, None, pattern.rule.num_dense_heads > 0)


def _tile_bits(pattern: BlockPattern, seq_len: int, tile_m: int) -> torch.Tensor:
    """Int64 ``(pattern_heads, n_tiles, k_blocks)``: per query tile, bits of the blocks reading each key block.

    A query tile of ``tile_m`` rows spans ``max(1, tile_m // block)`` pattern blocks (Merge-Q): bit ``r`` is set
    when the tile's ``r``-th query block reads the key block."""
    mask = pattern.block_mask(seq_len)  # (hp, n, n)
    hp, n, _ = mask.shape
    block = pattern.block_size
    n_tiles = cdiv(seq_len, tile_m)
    if tile_m <= block:
        qb_of_tile = torch.arange(n_tiles) * tile_m // block
        return mask[:, qb_of_tile, :].to(torch.int64)
    per_tile = tile_m // block
    padded = torch.zeros(hp, n_tiles * per_tile, n, dtype=torch.int64)
    padded[:, :n] = mask
    weights = (1 << torch.arange(per_tile, dtype=torch.int64))[None, None, :, None]
    return (padded.view(hp, n_tiles, per_tile, n) * weights).sum(2)


def _csr(bits: torch.Tensor, device: torch.device) -> Table:
    """CSR over the last dim of ``bits (heads, rows, cols)``: ``ptr`` has ``heads * rows + 1`` entries."""
    present = bits != 0
    counts = present.flatten(0, 1).sum(-1)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    index = present.nonzero()[:, 2]
    return tuple(t.to(device=device, dtype=torch.int32) for t in (ptr, index, bits[present]))


def block_tables(pattern: BlockPattern, seq_len: int, tile_m: int, device: torch.device) -> tuple[Table, Table]:
    """``(rows, cols)`` for a mask pattern: rows per (head, query tile) list key blocks; cols per
    (head, key block) list query tiles."""

    def build():
        bits = _tile_bits(pattern, seq_len, tile_m)
        return _csr(bits, device), _csr(bits.transpose(1, 2), device)

    return memo(pattern, ("tables", seq_len, tile_m, str(device)), build)


# ----------------------------------------------------------------------------------- decode kernel
class DecodeForm(NamedTuple):
    """What the decode kernel takes of a pattern (``kernels.decode.decode_attention``'s keywords): ``rule =
    (first, dense, local_blocks, vert_stride)`` with int32 ``(kv_heads,)`` device tensors for a local-stride
    rule, else ``block_mask``, the int8 device mask ``(heads or 1, blocks, blocks)``."""

    rule: Optional[tuple[torch.Tensor, torch.Tensor, int, int]]
    block_mask: Optional[torch.Tensor]


def decode_form(pattern: BlockPattern, num_heads: int, num_kv_heads: int, device: torch.device) -> DecodeForm:
    """``pattern`` for the decode kernel, whose programs each serve one kv head: a local-stride rule's query heads
    of one kv head must then agree on their vertical offset and on being dense."""
    def build() -> DecodeForm:
        r = pattern.rule
        if r is None:
            return DecodeForm(None, pattern.block_mask(pattern.max_seq_len).to(device, torch.int8))
        heads = torch.arange(num_heads).view(num_kv_heads, -1)
        shift, dense = r.shift(heads), r.is_dense(heads)
        for name, t in (("vertical offsets", shift % r.vert_stride), ("dense flags", dense)):
            if bool((t != t[:, :1]).any()):
                raise ValueError(f"pattern: the query heads of one kv head have different {name}; build "
                                 f"local_stride(..., num_kv_heads={num_kv_heads}) so each kv group shares its rule")
        first = (-shift[:, 0]) % r.vert_stride  # smallest key block on each kv head's vertical stride
        as_dev = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
        return DecodeForm((as_dev(first), as_dev(dense[:, 0]), r.local_blocks, r.vert_stride), None)

    return memo(pattern, ("decode", num_heads, num_kv_heads, str(device)), build)
