"""A :class:`~s2attn.BlockPattern` as a FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``).

For GPUs the Triton kernels are not tuned for, for the CPU, or to compare with FlexAttention: the
same attention through ``flex_attention``. FlexAttention computes whole tiles of ``TILE`` tokens (or
of a block, when blocks are larger): tiles entirely inside the pattern (below the diagonal when
causal) run unmasked, tiles it covers in part apply the pattern token by token through a
``mask_mod`` that evaluates the pattern's rule (or indexes its mask), so nothing beyond the
``BlockMask`` itself (heads x tiles x tiles) is kept.
"""

from __future__ import annotations

import torch

TILE = 128  # FlexAttention's default (and, on Hopper, smallest fast) tile


def to_flex_block_mask(pattern, seq_len: int, device: torch.device | str = "cpu"):
    """The ``BlockMask`` under which ``flex_attention(q, k, v, block_mask=mask, enable_gqa=True)`` on
    ``(batch, heads, seq_len, head_dim)`` tensors computes what ``sparse_attention(q, k, v, pattern,
    layout="bhsd")`` does: query ``t`` reads key ``s`` iff ``pattern[h, t // B, s // B]`` and, when
    causal, ``s <= t``. Its head dimension is the pattern's (1 for a pattern shared by all heads)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:
        raise ImportError(f"to_flex_block_mask needs FlexAttention (torch >= 2.5), found torch "
                          f"{torch.__version__}") from e
    B, n = pattern.block_size, pattern.num_blocks(seq_len)
    tile = max(TILE, B)
    f = tile // B  # pattern blocks per tile
    tiles = -(-seq_len // tile)
    per_head = pattern.num_heads is not None
    if pattern.rule is None:  # the mask itself, on the device (a rule is arithmetic: it runs anywhere)
        mask = pattern.block_mask(seq_len).to(device)
        allows = lambda head, qb, kb: mask[head, qb, kb]  # noqa: E731
    else:
        allows = pattern.allows

    def reads(head, qb, kb):
        """The key blocks ``kb`` query blocks ``qb`` compute (blocks past ``seq_len``: the last one)."""
        allowed = allows(head if per_head else head * 0, qb.clamp(max=n - 1), kb.clamp(max=n - 1))
        return allowed & (kb <= qb) if pattern.causal else allowed

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = reads(h, q_idx // B, kv_idx // B)
        return allowed & (kv_idx <= q_idx) if pattern.causal else allowed

    blocks = torch.arange(tiles * f, device=device, dtype=torch.int32)  # int32, as FlexAttention's own indices
    real = blocks < n
    any_read, all_read = [], []
    for h in range(pattern.pattern_heads):  # one head's (blocks x blocks) layout at a time
        read = reads(torch.tensor(h, device=device), blocks[:, None], blocks[None, :]) & real[:, None] & real[None, :]
        read = read.view(tiles, f, tiles, f)
        any_read.append(read.any(3).any(1))
        all_read.append(read.all(3).all(1))
    full = torch.stack(all_read)
    if pattern.causal:  # a diagonal tile also holds keys after its queries
        full &= ~torch.eye(tiles, dtype=torch.bool, device=device)
    partial = torch.stack(any_read) & ~full

    def indices(tiles_read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query tile: how many key tiles, and which first (FlexAttention's compressed rows)."""
        order = torch.argsort((~tiles_read).to(torch.int8), dim=-1, stable=True)
        return tiles_read.sum(-1).to(torch.int32)[None], order.to(torch.int32)[None]

    return BlockMask.from_kv_blocks(*indices(partial), *indices(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


__all__ = ["TILE", "to_flex_block_mask"]
