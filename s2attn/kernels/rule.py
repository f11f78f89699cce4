"""The pattern-to-kernel contract: :class:`KernelRule`, the integers every attention kernel reads, and
the Triton helpers that evaluate the local-stride rule inside the kernels (forward, backward, the Gluon
kernels of :mod:`.hopper`; the role of FlashAttention-3's ``mask.h``).

A closed-form pattern reaches the kernels as a :class:`KernelRule` (``s2attn.lowering`` builds it from a
``BlockPattern``); the launchers pass its fields by name, and the kernels' parameters carry the same
names. Query head ``h`` belongs to group ``g = (h + head_base) // heads_per_group`` (``g = 0`` for every
head when ``homogeneous``); groups from ``sparse_groups`` on are dense; a sparse group's vertical blocks
are those ``kb`` with ``(kb + g * step + offset) % stride == 0``, its window the ``local`` blocks up to
the query's (both sides when not causal). A mask pattern comes as CSR tables instead, with the
placeholder rule :meth:`KernelRule.for_tables` (only ``pattern_heads`` is read).

Adding a rule parameter: a field here, its value in ``s2attn.lowering.kernel_rule``, a parameter of the
same name in the kernels that read it (the launchers pass every field by name).
"""

from typing import NamedTuple

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in base 2
LOG2E_C = tl.constexpr(LOG2E)  # the same, for jitted code (which reads only constexpr globals)

# how the dK/dV kernels mask a run of query tiles against one key tile (``_dkdv_segment``'s ``MASK``)
UNMASKED = tl.constexpr(0)
MASK_BLOCKS = tl.constexpr(1)  # per key row: its query tiles ``row_lo..row_hi``, the block rule (or table bits),
# causality
MASK_OPENING = tl.constexpr(2)  # per key row: query tiles from ``row_lo`` on (long columns opening one by one)


class KernelRule(NamedTuple):
    """The local-stride rule as the kernels take it (see the module docstring), and the number of
    distinct head layers of the pattern (a table's heads)."""

    local: int  # window, in blocks
    stride: int  # vertical stride, in blocks
    step: int  # vertical offset between consecutive groups
    offset: int  # vertical offset of group 0
    heads_per_group: int
    head_base: int  # the first head's index in the full pattern (a slice of heads)
    sparse_groups: int  # groups before the dense ones
    homogeneous: int  # 1: every head uses group 0's offset
    pattern_heads: int

    @classmethod
    def for_tables(cls, pattern_heads: int) -> "KernelRule":
        """The rule sent along with mask tables: a dense one (no kernel on the table path reads it)."""
        return cls(1, 1, 0, 0, 1, 0, 0, 0, pattern_heads)

    def closed_form(self) -> dict:
        """The fields by name, less ``pattern_heads`` (for kernels that never read tables)."""
        fields = self._asdict()
        del fields["pattern_heads"]
        return fields


@triton.jit
def head_rule(h, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous):
    """Per-head constants of the local-stride rule: (vertical shift mod stride, is dense)."""
    g = (h + head_base) // heads_per_group
    shift = (g * (1 - homogeneous)) * step + offset
    return shift % stride, g >= sparse_groups


@triton.jit
def rows_allowed(qb_rows, kb, local, stride, shift, dense, CAUSAL: tl.constexpr):
    """Block-level rule for a vector of query blocks against one key block."""
    diff = qb_rows - kb
    if CAUSAL:
        near = (diff >= 0) & (diff < local)
    else:
        near = (diff < local) & (diff > -local)
    on_stride = ((kb + shift) % stride) == 0
    return near | on_stride | dense


@triton.jit
def first_congruent(lo, stride, shift):
    """Smallest j >= lo with (j + shift) % stride == 0."""
    r = (stride - (lo + shift) % stride) % stride
    return lo + r


@triton.jit
def row_segments(qb_lo, qb_hi, n_kb, local, stride, shift, dense, CAUSAL: tl.constexpr):
    """Key blocks read by query blocks [qb_lo, qb_hi] as five segments.

    Returns (a_start, a_count, b_lo, b_hi, c_lo, c_hi, d_lo, d_hi, e_start, e_count):
    a: unmasked, step ``stride`` (vertical blocks left of the window; all blocks for dense heads)
    b: masked, step 1 (window edge seen by only some rows of a merged tile)
    c: unmasked, step 1 (window interior) ; d: masked, step 1 (diagonal / whole bidirectional window)
    e: masked, step ``stride`` (bidirectional: vertical blocks right of the window)
    Ranges are inclusive; empty when hi < lo.
    """
    if CAUSAL:
        win_lo = tl.maximum(qb_lo - local + 1, 0)
        if dense:
            a_count = qb_lo
            win_lo = qb_lo
        else:
            first = first_congruent(0, stride, shift)
            a_count = tl.maximum(win_lo - first + stride - 1, 0) // stride
        c_lo = tl.minimum(tl.maximum(qb_hi - local + 1, win_lo), qb_lo)
        b_lo = win_lo
        b_hi = c_lo - 1
        c_hi = qb_lo - 1
        d_lo = qb_lo
        d_hi = qb_hi
        e_count = a_count * 0
    else:
        if dense:
            win_lo = qb_lo * 0
            win_hi = n_kb - 1
            a_count = qb_lo * 0
            e_count = qb_lo * 0
        else:
            win_lo = tl.maximum(qb_lo - local + 1, 0)
            win_hi = tl.minimum(qb_hi + local - 1, n_kb - 1)
            first = first_congruent(0, stride, shift)
            a_count = tl.maximum(win_lo - first + stride - 1, 0) // stride
            e_first = first_congruent(win_hi + 1, stride, shift)
            e_count = tl.maximum(n_kb - e_first + stride - 1, 0) // stride
        b_lo = win_lo
        b_hi = win_lo - 1
        c_lo = win_lo
        c_hi = win_lo - 1
        d_lo = win_lo
        d_hi = win_hi
    a_start = tl.where(dense, 0, first_congruent(0, stride, shift))
    e_start = first_congruent(d_hi + 1, stride, shift)
    return a_start, a_count, b_lo, b_hi, c_lo, c_hi, d_lo, d_hi, e_start, e_count


@triton.jit
def segment_block(i, start, step, ent_base, tab_kb, tab_bits, qb_rows, qb_lo, local, stride, shift, dense, key_map,
                  q_shift, CAUSAL: tl.constexpr, MASKED: tl.constexpr, TABLE: tl.constexpr, MAPPED: tl.constexpr):
    """The ``i``-th key block of a segment, and which of the tile's query rows read it. ``MAPPED`` (a remapped
    call's outside blocks): packed block ``kb`` holds absolute block ``key_map[kb]``, query block ``qb`` is
    absolute ``qb + q_shift``, and the rule (with its own ``shift``) and causality apply to the absolute ones; an
    outside block is never a query's own block, so causality is a whole block's."""
    if TABLE:
        kb = tl.load(tab_kb + ent_base + i)
        bits = tl.load(tab_bits + ent_base + i)
        row_ok = ((bits >> (qb_rows - qb_lo)) & 1) != 0
    elif MAPPED:
        kb = start + i * step
        kb_abs = tl.load(key_map + kb)
        qb_abs = qb_rows + q_shift
        row_ok = rows_allowed(qb_abs, kb_abs, local, stride, shift, dense, CAUSAL=CAUSAL) & (kb_abs >= 0)
        if CAUSAL:
            row_ok = row_ok & (kb_abs < qb_abs)
    else:
        kb = start + i * step
        if MASKED:
            row_ok = rows_allowed(qb_rows, kb, local, stride, shift, dense, CAUSAL=CAUSAL)
        else:
            row_ok = qb_rows >= 0
    return kb, row_ok


@triton.jit
def tile_ok(row_ok, q_pos, k_pos, len_k, CAUSAL: tl.constexpr):
    """Token-level mask of a (query rows x keys) tile: block rule (per row), sequence end, causality."""
    return keys_ok(row_ok[:, None], q_pos, k_pos, len_k, CAUSAL=CAUSAL)


@triton.jit
def keys_ok(ok, q_pos, k_pos, len_k, CAUSAL: tl.constexpr):
    """:func:`tile_ok` with the block rule ``ok`` given per (row, key) (a tile of keys from several blocks)."""
    ok = ok & (k_pos < len_k)[None, :]
    if CAUSAL:
        ok = ok & (k_pos[None, :] <= q_pos[:, None])
    return ok


@triton.jit
def long_open(kb, BLOCK: tl.constexpr, OPEN_ALIGN: tl.constexpr):
    """Causal: the first query position of long column ``kb``'s full query tiles (its block's end
    rounded up to ``OPEN_ALIGN``, a multiple of both dK/dV kernels' query tiles, so they meet there)."""
    return tl.cdiv(kb * BLOCK + BLOCK, OPEN_ALIGN) * OPEN_ALIGN


@triton.jit
def long_open_tile(kb, q_tile_lo, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, OPEN_ALIGN: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """The long pass's first query tile (of ``BLOCK_M``) for long column ``kb``, shaped like ``kb``: where
    its full tiles start (causal), else the sequence's first tile."""
    if CAUSAL:
        return tl.maximum(long_open(kb, BLOCK=BLOCK, OPEN_ALIGN=OPEN_ALIGN) // BLOCK_M, q_tile_lo)
    else:
        return kb * 0 + q_tile_lo


@triton.jit
def column_block(c, first, stride, dense):
    """Key block of long column ``c``: columns sit ``stride`` blocks apart from block ``first`` (a dense
    head's are all its blocks)."""
    return tl.where(dense, c, first + c * stride)


@triton.jit
def col_tiles(kb, q_tile_lo, q_tile_hi, local, stride, shift, dense,
              BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, OPEN_ALIGN: tl.constexpr):
    """The dK/dV kernel's query tiles ``lo..hi`` (clipped) for key block ``kb``, and whether ``kb`` is a
    long column: on the head's vertical stride (or of a dense head), read in full by every query tile
    from :func:`long_open` on (causal) or by all of them. Those full tiles are the long pass's
    (``attention._attn_bwd_dkdv_long``); a short column's are all here."""
    long = dense | (((kb + shift) % stride) == 0)
    past = (kb + local) * BLOCK  # first query position past the window
    if CAUSAL:
        lo = (kb * BLOCK) // BLOCK_M
        hi = tl.where(long, long_open(kb, BLOCK=BLOCK, OPEN_ALIGN=OPEN_ALIGN) // BLOCK_M - 1, (past - 1) // BLOCK_M)
    else:
        lo = tl.maximum((kb - local + 1) * BLOCK, 0) // BLOCK_M
        hi = tl.where(long, lo - 1, (past - 1) // BLOCK_M)
    return tl.maximum(lo, q_tile_lo), tl.minimum(hi, q_tile_hi), long



@triton.jit
def mapped_col_tiles(kb_abs, kb_v, q_tile_lo, q_tile_hi, local, stride, shift, dense,
                     BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """A remapped call's dK/dV query tiles ``lo..hi`` (clipped; empty for padding, ``kb_abs < 0``) for key rows of
    absolute block ``kb_abs``, ``kb_v = kb_abs - q_shift`` in the queries' packed frame (negative for blocks
    far before them). No long pass: a long column's tiles are all here."""
    long = dense | (((kb_abs + shift) % stride) == 0)
    past = (kb_v + local) * BLOCK  # first query position past the window (packed frame)
    near_hi = tl.where(past > 0, (past - 1) // BLOCK_M, -1)  # (no negative division: it truncates)
    if CAUSAL:
        lo = tl.maximum(kb_v * BLOCK, 0) // BLOCK_M
        hi = tl.where(long, q_tile_hi, near_hi)
    else:
        lo = tl.where(long, q_tile_lo, tl.maximum((kb_v - local + 1) * BLOCK, 0) // BLOCK_M)
        hi = tl.where(long, q_tile_hi, near_hi)
    return tl.maximum(lo, q_tile_lo), tl.where(kb_abs >= 0, tl.minimum(hi, q_tile_hi), -1)
