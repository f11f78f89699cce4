"""Index tables for patterns given as masks: which key blocks each query tile reads, and the
transpose. Built once per (pattern, length, tile, device) and cached on the pattern.

A query tile of ``tile_m`` rows spans ``max(1, tile_m // block)`` pattern blocks (Merge-Q). Each
entry carries a bit mask over those blocks: bit ``r`` is set when the tile's ``r``-th query block
reads the key block.
"""

from __future__ import annotations

import torch

from .patterns import BlockPattern

Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # CSR (ptr, index, bits), int32


def _tile_bits(pattern: BlockPattern, seq_len: int, tile_m: int) -> torch.Tensor:
    """Int64 ``(pattern_heads, n_tiles, k_blocks)``: per query tile, bits of the blocks reading each key block."""
    mask = pattern.block_mask(seq_len)  # (hp, n, n)
    hp, n, _ = mask.shape
    block = pattern.block_size
    n_tiles = -(-seq_len // tile_m)
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

    return pattern.cached(("tables", seq_len, tile_m, str(device)), build)
