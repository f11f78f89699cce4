"""Attention over a gathered subset of a sequence's keys, with the pattern applied on absolute positions.

Whatever attends keys that were gathered from a longer sequence (context parallelism today; paged
caches and chunked prefill next) hands over the keys packed side by side plus one small map, and
the pattern's own rule, closed form, is applied through it:

* ``key_blocks`` ``(kv_heads, ceil(seqlen_k / block_size))``, int32: packed key block ``j`` of kv
  head ``g`` holds the keys of absolute block ``key_blocks[g, j]`` (its first ``block_size`` keys,
  fewer for the last packed block); ``-1`` marks padding, never read;
* ``query_start``: the absolute position of query 0; queries are consecutive.

Query ``i`` of head ``h`` reads packed key ``s`` of its kv head ``g`` iff the pattern lets absolute
query block ``(query_start + i) // B`` of head ``h`` read absolute key block ``key_blocks[g, s // B]``
and, when causal, the key's absolute position ``key_blocks[g, s // B] * B + s % B`` is ``<=
query_start + i``. Host memory is the map, ``O(kv_heads * blocks)``: no mask, no tables.

The packed keys keep the query rows' blocks in step with the absolute ones: queries are end-aligned
in the packed keys (as everywhere in s2attn), and ``query_start - (seqlen_k - seqlen_q)`` must be a
multiple of ``block_size``, so a query tile of packed blocks is a tile of absolute blocks shifted
by a constant.

What runs where (:func:`remapped_attention`):

* the Triton kernels (wherever ``s2attn.ops.use_kernel`` says they run: CUDA tensors, or the interpreter) take
  the map itself, for a local-stride pattern called with its own causality and a map laid out as context
  parallelism lays it out (:func:`remap_layout`): each kv head's row is padding (``-1``) first, then the
  outside blocks, then the queries' own blocks, absolute-contiguous. The kernels run the rule's segments on
  the own blocks and one masked segment through the map over the outside ones; no mask, no tables. (No long
  dK/dV pass and no warp-specialised kernels there yet: see ``s2attn.kernels.plan``);
* other calls on CUDA tensors (a mask pattern, ``causal`` other than the pattern's, another map layout) and
  ``via_tables=True``: the kernels' table path on a ``(heads, n, n)`` mask built from the map (quadratic in the
  packed blocks);
* elsewhere the PyTorch reference (no mask).
"""

from __future__ import annotations

import torch

from . import ops
from .api import sparse_attention
from .patterns import BlockPattern, from_mask
from .reference import reference_attention_remapped, resolve_scale

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def check_remap(q: torch.Tensor, k: torch.Tensor, pattern: BlockPattern, key_blocks: torch.Tensor,
                query_start: int) -> None:
    """Shapes and alignment of a remapped call (``bshd``); errors name the argument and what was expected."""
    B = pattern.block_size
    seqlen_q, seqlen_k, kv_heads = q.shape[1], k.shape[1], k.shape[2]
    want = (kv_heads, -(-seqlen_k // B))
    if not isinstance(key_blocks, torch.Tensor) or key_blocks.dtype not in (torch.int32, torch.int64) \
            or tuple(key_blocks.shape) != want:
        got = tuple(key_blocks.shape) if isinstance(key_blocks, torch.Tensor) else type(key_blocks).__name__
        raise ValueError(f"key_blocks: expected an int32 tensor of shape (kv_heads, ceil(seqlen_k / block_size)) "
                         f"= {want}, got {got}")
    if seqlen_q > seqlen_k:
        raise ValueError(f"seqlen_q={seqlen_q} > seqlen_k={seqlen_k}: the queries' keys are among the packed keys")
    shift = query_start - (seqlen_k - seqlen_q)
    if query_start < 0 or shift % B:
        raise ValueError(f"query_start={query_start}: expected a position >= 0 whose offset from the end-aligned "
                         f"packed position {seqlen_k - seqlen_q} is a multiple of block_size={B}")
    pattern.check_seq_len(query_start + seqlen_q, "query_start + seqlen_q")


def remap_layout(key_blocks: torch.Tensor, query_start: int, seqlen_q: int, seqlen_k: int,
                 block_size: int) -> tuple[int, int] | None:
    """``(q_shift, own_first)`` of a checked call's map if the kernels can take it, else None. ``q_shift``: absolute
    query block minus packed; ``own_first``: the first of the packed blocks that are absolute ``packed + q_shift``
    in every kv head (a suffix holding every query's block). Before it, each row must be padding (``-1``) then
    blocks outside the own absolute range. ``O(kv_heads * blocks)`` on the host (one copy of the map)."""
    B = block_size
    q_shift = (query_start - (seqlen_k - seqlen_q)) // B
    rows = key_blocks.detach().to("cpu", torch.int64)
    n = rows.shape[1]
    same = (rows == torch.arange(n) + q_shift).all(0)
    tail = int(torch.flip(same, (0,)).cumprod(0).sum())
    own_first = n - tail
    if seqlen_q == 0 or own_first > (seqlen_k - seqlen_q) // B:
        return None
    outside = rows[:, :own_first]
    padding = outside < 0
    if bool((padding[:, 1:] & ~padding[:, :-1]).any()):  # padding only first
        return None
    own_lo, own_hi = own_first + q_shift, n - 1 + q_shift
    if bool((~padding & (outside >= own_lo) & (outside <= own_hi)).any()):
        return None
    return q_shift, own_first


def remapped_mask_pattern(pattern: BlockPattern, key_blocks: torch.Tensor, query_start: int, seqlen_q: int,
                          seqlen_k: int, heads: int) -> BlockPattern:
    """The same attention as a mask pattern over the packed blocks, ``(heads, n, n)`` with ``n`` the packed
    blocks: quadratic, for comparing with the kernels' table path only (what context parallelism built
    before the remap). Causality then compares packed positions: the same as absolute ones when the
    packed keys ascend in absolute position up to the queries' blocks, as context parallelism's do."""
    B = pattern.block_size
    n = key_blocks.shape[1]
    group = heads // key_blocks.shape[0]
    shift = (query_start - (seqlen_k - seqlen_q)) // B
    first = (seqlen_k - seqlen_q) // B  # packed block of query 0
    q_blocks = torch.arange(first, -(-seqlen_k // B)) + shift
    pattern_heads = torch.arange(heads) if pattern.num_heads is not None else torch.zeros(heads, dtype=torch.long)
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        cols = key_blocks[h // group].long()
        rows = pattern.allows(pattern_heads[h], q_blocks[:, None], cols.clamp(min=0)[None, :])
        mask[h, first:] = rows & (cols >= 0)
    return from_mask(mask, B, causal=pattern.causal, max_seq_len=n * B)


def remapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    key_blocks: torch.Tensor,
    query_start: int,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    return_lse: bool = False,
    via_tables: bool | None = None,
) -> Output:
    """Sparse attention over packed keys, the pattern applied through ``key_blocks`` (see the module).

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)``.
        k, v: ``(batch, seqlen_k, kv_heads, head_dim)``: the packed keys, ``seqlen_q <= seqlen_k``.
        pattern: the pattern of the whole sequence (absolute blocks), over ``heads`` query heads.
        key_blocks: ``(kv_heads, ceil(seqlen_k / block_size))`` int32, absolute block of each packed key
            block, ``-1`` for padding.
        query_start: absolute position of query 0; ``query_start - (seqlen_k - seqlen_q)`` a multiple of
            ``block_size``.
        softmax_scale, causal, return_lse: as in :func:`s2attn.sparse_attention`.
        via_tables: True: build the packed ``(heads, n, n)`` mask and run the kernels' table path (quadratic in
            the packed blocks), for comparison. None: the kernels on the map where they take it, else on CUDA
            tensors the table path, elsewhere the reference (see the module). False: never the table path.

    Returns: ``out`` like ``q`` (and ``lse (batch, heads, seqlen_q)``).
    """
    check_remap(q, k, pattern, key_blocks, query_start)
    causal = pattern.causal if causal is None else causal
    scale = resolve_scale(softmax_scale, q.shape[-1])
    if not via_tables and ops.use_kernel(q) and pattern.rule is not None and causal == pattern.causal:
        layout = remap_layout(key_blocks, query_start, q.shape[1], k.shape[1], pattern.block_size)
        if layout is not None:
            out, lse = ops.remapped_attention(q, k, v, pattern, key_blocks, *layout, softmax_scale=scale,
                                              causal=causal)
            return (out, lse) if return_lse else out
    if via_tables or (via_tables is None and q.is_cuda):
        packed = remapped_mask_pattern(pattern, key_blocks.cpu(), query_start, q.shape[1], k.shape[1], q.shape[2])
        return sparse_attention(q, k, v, packed, softmax_scale=scale, causal=causal, return_lse=return_lse)
    return reference_attention_remapped(q, k, v, pattern, key_blocks, query_start, softmax_scale=scale,
                                        causal=causal, return_lse=return_lse)


__all__ = ["check_remap", "remap_layout", "remapped_attention", "remapped_mask_pattern"]
