"""Triton kernels for block-sparse attention: forward, and backward (dQ; dK/dV in two passes:
the long columns' full query tiles, then every key tile with the rest).

Kernels see plain tensors and integers. The pattern arrives in one of two forms, chosen by
the ``TABLE`` constexpr:

* ``TABLE=False``: the local-stride rule in closed form, the fields of :class:`.rule.KernelRule`
  (parameters of the same names; the rule's helpers live in :mod:`.rule`), so a million-token
  sequence needs no index tensor at all;
* ``TABLE=True``: CSR tables built once per (pattern, length, tile) by ``s2attn.lowering``:
  for each (pattern head, query tile) the key blocks it touches (``rows``), and for each
  (pattern head, key block) the query tiles that touch it (``cols``), each entry with a
  bit mask saying which of the tile's query blocks are allowed (Merge-Q).

With ``REMAP`` (rule only) the keys are packed (``s2attn.remap``): ``KEY_MAP`` maps each kv head's packed key
blocks to absolute ones, absolute query block = packed + ``q_shift``, and the packed blocks from ``own_first``
on are the queries' own (absolute = packed + ``q_shift``); the rule applies to absolute blocks. Without it
(``REMAP=False``) those parameters are never read, and the kernels compile as before.

Positions are absolute: query row ``i`` of a sequence sits at ``seqlen_k - seqlen_q + i``,
and query tiles are aligned to absolute positions so a tile never straddles a pattern block
boundary unevenly. Every sequence (batched or varlen) is located through ``cu_seqlens``.

Work is split into *segments* of key blocks (``start``, ``step``, ``count``), each either
fully allowed (no mask arithmetic) or masked (window edges, diagonal, table entries).

Constexpr values are passed to helpers one by one and by name, never inside a tuple: unpacked from
one, they stop being constexpr in compiled Triton (the interpreter does not notice;
``benchmarks/compile_sm90.py`` does).
"""

import triton
import triton.language as tl

from .rule import (LOG2E_C, MASK_BLOCKS, MASK_OPENING, UNMASKED, col_tiles, column_block, first_congruent,
                   head_rule, long_open_tile, mapped_col_tiles, row_segments, rows_allowed, segment_block,
                   tile_ok)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # fp32 inputs use exact fp32 products; the interpreter also needs fp32 for bf16 (no numpy bf16)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _lse2(lse):
    """Row log-sum-exp in base 2; a row that attends nothing (-inf) reads +inf, so every probability
    recomputed from it is exactly 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)


@triton.jit
def _load_lse2(ptrs, mask):
    """:func:`_lse2` of the rows at ``ptrs``; rows that do not exist read +inf too."""
    return _lse2(tl.load(ptrs, mask=mask, other=float("inf")))


@triton.jit
def _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """First row and length of sequence ``b`` in q and in k (packed rows when ``VARLEN``)."""
    if VARLEN:
        q_start = tl.load(cu_q + b)
        k_start = tl.load(cu_k + b)
        len_q = tl.load(cu_q + b + 1) - q_start
        len_k = tl.load(cu_k + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        len_q = seqlen_q
        len_k = seqlen_k
    return q_start, k_start, len_q, len_k


@triton.jit
def _lower_bound(ptr, lo, hi, value):
    """The first index in ``[lo, hi)`` whose entry is ``>= value`` (``hi`` if none); entries ascend."""
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(ptr + mid) < value
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


# --------------------------------------------------------------------------- query-major: forward and dQ
@triton.jit
def _row_tile(acc, m_i, l_i, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, k_desc, v_desc, desc_b,
              desc_row, desc_h, q_pos, k_pos, offs_d, len_k, qk_scale, row_ok, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
              BACKWARD: tl.constexpr, TMA: tl.constexpr):
    """One tile of keys at positions ``k_pos`` against the query tile. Forward: online-softmax update
    of ``(acc, m_i, l_i)``. Backward: ``acc += dS @ K`` (dQ), with P recomputed from ``lse2``. With ``TMA``
    the keys are consecutive and K / V come through descriptors from row ``desc_row``; rows past the
    sequence's end read as zeros (never with packed sequences: their rows would be the next sequence's)."""
    if TMA:
        k = tl.reshape(k_desc.load([desc_b, desc_row, desc_h, 0]), [k_pos.shape[0], BLOCK_D])
        v = tl.reshape(v_desc.load([desc_b, desc_row, desc_h, 0]), [k_pos.shape[0], BLOCK_D])
    else:
        if MASKED:
            kv_mask = (k_pos < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
        else:  # an unmasked tile's keys all lie before the query tile, inside the sequence
            kv_mask = (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_base + k_pos[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), UPCAST)  # unscaled: the scale goes into each exponent's multiply-add
    if BACKWARD:
        if not TMA:
            v = tl.load(v_base + k_pos[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(tile_ok(row_ok, q_pos, k_pos, len_k, CAUSAL=CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        acc += _dot(ds.to(k.dtype), k, UPCAST)
    else:
        if MASKED:
            s = tl.where(tile_ok(row_ok, q_pos, k_pos, len_k, CAUSAL=CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0: the max commutes with it
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not TMA:
            v = tl.load(v_base + k_pos[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _row_segment(
    acc, m_i, l_i, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, k_desc, v_desc, desc_b, desc_row0,
    desc_h, q_pos, qb_rows, offs_n, offs_d, len_k, qk_scale,
    start, step, count, ent_base, tab_kb, tab_bits, qb_lo,
    local, stride, shift, dense, key_map, q_shift,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, TABLE: tl.constexpr, UPCAST: tl.constexpr, BACKWARD: tl.constexpr, PAIRS: tl.constexpr,
    TMA: tl.constexpr, MAPPED: tl.constexpr,
):
    """The key blocks ``start + i * step`` (or table entries), ``i < count``. With ``PAIRS`` (unmasked
    segments; only when ``BLOCK_N == BLOCK``, else ignored), two blocks of the segment, wherever they
    lie, make one tile of ``2 * BLOCK`` keys: half the iterations, twice the matrix size. ``MAPPED``: a remapped
    call's outside blocks (masked; see :func:`.rule.segment_block`)."""
    if PAIRS and BLOCK_N == BLOCK:
        offs_2 = tl.arange(0, 2 * BLOCK)
        pair_off = (offs_2 // BLOCK) * (step * BLOCK) + offs_2 % BLOCK
        for i in range(count // 2):
            k_pos = (start + 2 * i * step) * BLOCK + pair_off
            acc, m_i, l_i = _row_tile(acc, m_i, l_i, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                                      k_desc, v_desc, desc_b, 0, desc_h, q_pos, k_pos, offs_d, len_k, qk_scale,
                                      q_pos >= 0, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=False,
                                      UPCAST=UPCAST, BACKWARD=BACKWARD, TMA=False)
        start += (count - count % 2) * step
        count = count % 2
    # a block of several key tiles in the same loop, not an unrolled inner one: the pipeliner gives each load
    # of an unrolled loop its own buffers (block 256, 4 tiles: 410 KB of shared memory, over the H100's 227)
    NSUB: tl.constexpr = BLOCK // BLOCK_N
    for j in range(count * NSUB):
        kb, row_ok = segment_block(j // NSUB, start, step, ent_base, tab_kb, tab_bits, qb_rows, qb_lo, local, stride,
                                   shift, dense, key_map, q_shift, CAUSAL=CAUSAL, MASKED=MASKED, TABLE=TABLE,
                                   MAPPED=MAPPED)
        k_lo = kb * BLOCK + (j % NSUB) * BLOCK_N
        acc, m_i, l_i = _row_tile(acc, m_i, l_i, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, k_desc,
                                  v_desc, desc_b, desc_row0 + k_lo, desc_h, q_pos, k_lo + offs_n, offs_d, len_k,
                                  qk_scale, row_ok, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=MASKED,
                                  UPCAST=UPCAST, BACKWARD=BACKWARD, TMA=TMA)
    return acc, m_i, l_i


@triton.jit
def _query_tile(cu_q, cu_k, b, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, VARLEN: tl.constexpr):
    """This program's query tile (the longest, last in a causal sequence, launch first): sequence
    bounds, whether the tile exists, absolute positions, packed row indices and the row x head-dim
    mask of its queries."""
    q_start, k_start, len_q, len_k = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN)
    q_off = len_k - len_q
    tile = (len_k - 1) // BLOCK_M - tl.program_id(0)
    q_pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = q_start + q_pos - q_off
    row_ok = (q_pos >= q_off) & (q_pos < len_k)
    io_mask = row_ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    return k_start, len_k, tile, tile >= q_off // BLOCK_M, q_pos, rows, row_ok, io_mask


@triton.jit
def _load_rows(base, rows, stride_s, io_mask, BLOCK_D: tl.constexpr):
    return tl.load(base + rows[:, None] * stride_s + tl.arange(0, BLOCK_D)[None, :], mask=io_mask, other=0.0)


@triton.jit
def _query_tile_pass(
    q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, k_desc, v_desc, desc_b, k_start, kvh,
    q_pos, len_k, qk_scale, h, tile, n_tiles,
    tab_ptr, tab_kb, tab_bits, key_map, q_shift, own_first,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous, pattern_heads,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, TABLE: tl.constexpr, UPCAST: tl.constexpr, BACKWARD: tl.constexpr, PAIRS: tl.constexpr,
    TMA: tl.constexpr, REMAP: tl.constexpr,
):
    """Every key block the query tile reads: the table row, or the rule's five segments (unmasked
    vertical; masked window edge; unmasked window; masked diagonal; bidirectional: masked vertical
    right of the window). Returns ``(acc, m_i, l_i)``; backward: ``(dq, -, -)``.

    ``REMAP`` (packed keys, ``key_map`` this kv head's row of packed -> absolute key blocks): the packed blocks
    from ``own_first`` on are the queries' own, absolute ``packed + q_shift``, so there the five segments run in
    the packed frame with the rule's shift moved by ``q_shift`` and clipped to start at ``own_first``; the blocks
    before it (after the padding) are one masked segment through the map."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qb_rows = q_pos // BLOCK
    qb_lo = (tile * BLOCK_M) // BLOCK
    qb_hi = tl.minimum(tile * BLOCK_M + BLOCK_M - 1, len_k - 1) // BLOCK
    n_kb = tl.cdiv(len_k, BLOCK)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    state = (q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, k_desc, v_desc, desc_b, k_start, kvh,
             q_pos, qb_rows, offs_n, offs_d, len_k, qk_scale)
    if TABLE:
        row = (h % pattern_heads) * n_tiles + tile
        ent = tl.load(tab_ptr + row)
        cnt = tl.load(tab_ptr + row + 1) - ent
        acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, 0, 1, cnt, ent, tab_kb, tab_bits, qb_lo, local=1, stride=1,
                                     shift=0, dense=False, key_map=key_map, q_shift=q_shift, BLOCK=BLOCK,
                                     BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=True,
                                     TABLE=True, UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=False, TMA=TMA, MAPPED=False)
    else:
        shift, dense = head_rule(h, stride=stride, step=step, offset=offset, heads_per_group=heads_per_group,
                                 head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous)
        if REMAP:
            # outside blocks: after the padding (-1 entries, first), before the own ones
            out_lo = _lower_bound(key_map, own_first * 0, own_first, 0)
            acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, out_lo, 1, own_first - out_lo, 0, tab_kb, tab_bits,
                                         qb_lo, local, stride, shift, dense, key_map, q_shift, BLOCK=BLOCK,
                                         BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL,
                                         MASKED=True, TABLE=False, UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=False,
                                         TMA=TMA, MAPPED=True)
            shift = (shift + q_shift % stride + stride) % stride  # the own blocks' rule, in the packed frame
        a0, an, b_lo, b_hi, c_lo, c_hi, d_lo, d_hi, e0, en = row_segments(
            qb_lo, qb_hi, n_kb, local=local, stride=stride, shift=shift, dense=dense, CAUSAL=CAUSAL)
        rule = (0, tab_kb, tab_bits, qb_lo, local, stride, shift, dense, key_map, q_shift)
        a_step = tl.where(dense, 1, stride)
        if REMAP:  # own blocks only: clip the segments left of the queries to start at own_first
            skip = tl.maximum((own_first - a0 + a_step - 1) // a_step, 0)
            a0 += skip * a_step
            an = tl.maximum(an - skip, 0)
            b_lo = tl.maximum(b_lo, own_first)
            c_lo = tl.maximum(c_lo, own_first)
            d_lo = tl.maximum(d_lo, own_first)
        # the five segments in order (see rule.row_segments); unmasked ones may read key blocks in pairs
        acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, a0, a_step, an, *rule, BLOCK=BLOCK, BLOCK_N=BLOCK_N,
                                     HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=False, TABLE=False,
                                     UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=PAIRS, TMA=TMA, MAPPED=False)
        acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, b_lo, 1, b_hi - b_lo + 1, *rule, BLOCK=BLOCK,
                                     BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=True,
                                     TABLE=False, UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=False, TMA=TMA, MAPPED=False)
        acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, c_lo, 1, c_hi - c_lo + 1, *rule, BLOCK=BLOCK,
                                     BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=False,
                                     TABLE=False, UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=PAIRS, TMA=TMA, MAPPED=False)
        acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, d_lo, 1, d_hi - d_lo + 1, *rule, BLOCK=BLOCK,
                                     BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=True,
                                     TABLE=False, UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=False, TMA=TMA, MAPPED=False)
        if not CAUSAL:
            acc, m_i, l_i = _row_segment(acc, m_i, l_i, *state, e0, stride, en, *rule, BLOCK=BLOCK, BLOCK_N=BLOCK_N,
                                         HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASKED=True, TABLE=False,
                                         UPCAST=UPCAST, BACKWARD=BACKWARD, PAIRS=False, TMA=TMA, MAPPED=False)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["own_first"])  # a loop bound: a value, not a constexpr 1
def _attn_fwd(
    Q, K, V, O, LSE, cu_q, cu_k, tab_ptr, tab_kb, tab_bits, K_DESC, V_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, heads_per_kv, n_tiles, qk_scale,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous, pattern_heads,
    KEY_MAP, stride_map, q_shift, own_first,  # last: the other parameters keep their places (and code)
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, TABLE: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PAIRS: tl.constexpr,
    TMA: tl.constexpr, REMAP: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    k_start, len_k, tile, exists, q_pos, rows, row_ok, io_mask = _query_tile(
        cu_q, cu_k, b, seqlen_q, seqlen_k, BLOCK_M, HEAD_DIM, BLOCK_D, VARLEN)
    if not exists:
        return
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qs, io_mask, BLOCK_D)
    kvh = h // heads_per_kv
    acc, m_i, l_i = _query_tile_pass(
        q, q, 0.0, 0.0, K + b * stride_kb + k_start * stride_ks + kvh * stride_kh,
        V + b * stride_vb + k_start * stride_vs + kvh * stride_vh, stride_ks, stride_vs,
        K_DESC, V_DESC, 0 if VARLEN else b, k_start, kvh, q_pos, len_k, qk_scale, h, tile, n_tiles, tab_ptr, tab_kb,
        tab_bits, KEY_MAP + kvh * stride_map, q_shift, own_first, local=local, stride=stride, step=step,
        offset=offset, heads_per_group=heads_per_group,
        head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous, pattern_heads=pattern_heads,
        BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, TABLE=TABLE,
        UPCAST=UPCAST, BACKWARD=False, PAIRS=PAIRS, TMA=TMA, REMAP=REMAP)
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) / LOG2E_C, float("-inf"))
    o_ptrs = O + b * stride_ob + rows[:, None] * stride_os + h * stride_oh + tl.arange(0, BLOCK_D)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + b * stride_lb + h * stride_lh + rows * stride_ls, lse, mask=row_ok)


@triton.jit(do_not_specialize=["own_first"])
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DLSE, DELTA, cu_q, cu_k, tab_ptr, tab_kb, tab_bits, K_DESC, V_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, heads_per_kv, n_tiles, qk_scale, sm_scale,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous, pattern_heads,
    KEY_MAP, stride_map, q_shift, own_first,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, TABLE: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PAIRS: tl.constexpr,
    HAS_DLSE: tl.constexpr, TMA: tl.constexpr, REMAP: tl.constexpr,
):
    """dQ, query-major like the forward (the same pass over key blocks). It also computes and stores
    delta = rowsum(dO * O) - dlse, the softmax-backward row term the dK/dV kernel (launched after) reads."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    k_start, len_k, tile, exists, q_pos, rows, row_ok, io_mask = _query_tile(
        cu_q, cu_k, b, seqlen_q, seqlen_k, BLOCK_M, HEAD_DIM, BLOCK_D, VARLEN)
    if not exists:
        return
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qs, io_mask, BLOCK_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, stride_dos, io_mask, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, stride_os, io_mask, BLOCK_D)
    lse_ptrs = b * stride_lb + h * stride_lh + rows * stride_ls
    lse2 = _load_lse2(LSE + lse_ptrs, row_ok)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_ptrs, mask=row_ok, other=0.0)
    tl.store(DELTA + lse_ptrs, delta, mask=row_ok)
    kvh = h // heads_per_kv
    dq, _, _ = _query_tile_pass(
        q, do, lse2, delta, K + b * stride_kb + k_start * stride_ks + kvh * stride_kh,
        V + b * stride_vb + k_start * stride_vs + kvh * stride_vh, stride_ks, stride_vs,
        K_DESC, V_DESC, 0 if VARLEN else b, k_start, kvh, q_pos, len_k, qk_scale, h, tile, n_tiles, tab_ptr, tab_kb,
        tab_bits, KEY_MAP + kvh * stride_map, q_shift, own_first, local=local, stride=stride, step=step,
        offset=offset, heads_per_group=heads_per_group,
        head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous, pattern_heads=pattern_heads,
        BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, TABLE=TABLE,
        UPCAST=UPCAST, BACKWARD=True, PAIRS=PAIRS, TMA=TMA, REMAP=REMAP)
    dq_ptrs = DQ + b * stride_dqb + rows[:, None] * stride_dqs + h * stride_dqh + tl.arange(0, BLOCK_D)[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------- backward: dK, dV
@triton.jit
def _head_rows(Q, DO, LSE, DELTA, b, h, q_start, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
               stride_lb, stride_lh, stride_ls):
    """Where query head ``h`` of sequence ``b`` starts in q, dO, the log-sum-exp and delta."""
    return (Q + b * stride_qb + q_start * stride_qs + h * stride_qh,
            DO + b * stride_dob + q_start * stride_dos + h * stride_doh,
            LSE + b * stride_lb + h * stride_lh + q_start * stride_ls,
            DELTA + b * stride_lb + h * stride_lh + q_start * stride_ls)


@triton.jit
def _dkdv_segment(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls,
    q_desc, do_desc, desc_b, desc_row, desc_h,
    k_pos, kb, offs_m, offs_d, q_off, len_q, qk_scale,
    start, count, ent_base, tab_tile, tab_bits, row_lo, row_hi,
    local, stride, shift, dense,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, TABLE: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    """Query tiles ``start + i`` (or table entries), ``i < count``, against one key tile: dk, dv updated.
    ``MASK`` (named in :mod:`.rule`): ``UNMASKED``; ``MASK_OPENING``, key row ``r`` only in query tiles from
    ``row_lo[r]`` on (long columns opening one after another); ``MASK_BLOCKS``, key row ``r`` only in query
    tiles ``row_lo[r]..row_hi[r]``, the block rule of its key block ``kb[r]`` and causality, or with ``TABLE``
    the entry's bits (one key block ``kb``) and causality. With ``TMA`` the q and dO tiles come through tensor
    descriptors (``(batch, seq, heads, dim)``, tile ``desc_row + tile * BLOCK_M`` of sequence row 0): rows
    outside the sequence read as zeros (never with packed sequences: they would be a neighbour's rows, and
    P = 0 times a NaN there is not 0)."""
    d_ok = offs_d < HEAD_DIM
    for i in range(count):
        if TABLE:
            tile = tl.load(tab_tile + ent_base + i)
        else:
            tile = start + i
        q_pos = tile * BLOCK_M + offs_m
        q_row = q_pos - q_off
        row_ok = (q_row >= 0) & (q_row < len_q)
        if TMA:
            row = desc_row + tile * BLOCK_M
            q = tl.reshape(q_desc.load([desc_b, row, desc_h, 0]), [BLOCK_M, BLOCK_D])
            do = tl.reshape(do_desc.load([desc_b, row, desc_h, 0]), [BLOCK_M, BLOCK_D])
        else:
            io_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + q_row[:, None] * stride_qs + offs_d[None, :], mask=io_mask, other=0.0)
            do = tl.load(do_base + q_row[:, None] * stride_dos + offs_d[None, :], mask=io_mask, other=0.0)
        lse2 = _load_lse2(lse_base + q_row * stride_ls, row_ok)
        delta = tl.load(delta_base + q_row * stride_ls, mask=row_ok, other=0.0)
        # transposed scores: keys along rows, queries along columns
        st = _dot(k, tl.trans(q), UPCAST) * qk_scale
        pt = tl.exp2(st - lse2[None, :])
        if MASK == MASK_BLOCKS:
            qb_rows = q_pos // BLOCK
            if TABLE:
                bits = tl.load(tab_bits + ent_base + i)
                allowed = ((bits >> (qb_rows - (tile * BLOCK_M) // BLOCK)) & 1) != 0
                ok = allowed[None, :]
            else:
                in_rows = (row_lo <= tile) & (tile <= row_hi)
                ok = rows_allowed(qb_rows[None, :], kb[:, None], local, stride, shift, dense, CAUSAL=CAUSAL)
                ok = ok & in_rows[:, None]
            if CAUSAL:
                ok = ok & (k_pos[:, None] <= q_pos[None, :])
            pt = tl.where(ok, pt, 0.0)
        elif MASK == MASK_OPENING:
            pt = tl.where((row_lo <= tile)[:, None], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, UPCAST)
        dpt = _dot(v, tl.trans(do), UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, UPCAST)
    return dk, dv


@triton.jit
def _long_col_ptrs(PART, b, k_start, c, h, in_blk, offs_d, n_heads, part_cols, part_stride,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr):
    """Rows ``in_blk`` of long column ``c`` (scalar or per row) of head ``h`` in the fp32 partial sums
    ``PART (rows, heads, BLOCK, BLOCK_D)``. Sequence ``b``'s columns start at row ``b * part_cols``; a
    packed sequence's at ``k_start // (BLOCK * part_stride) + 2 * b``, which leaves room for each
    sequence's ``cdiv(n_blocks, part_stride)`` columns with no per-sequence table."""
    if VARLEN:
        base = k_start // (BLOCK * part_stride) + 2 * b
    else:
        base = b * part_cols
    row = ((base + c).to(tl.int64) * n_heads + h) * BLOCK + in_blk
    return PART + row[:, None] * BLOCK_D + offs_d[None, :]


@triton.jit
def _attn_bwd_dkdv_long(
    Q, K, V, DO, LSE, DELTA, PART_K, PART_V, ORDER, cu_q, cu_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, heads_per_kv, n_heads, qk_scale, chunk, n_splits, part_cols, part_stride,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr, OPEN_ALIGN: tl.constexpr,
):
    """The long columns' share of dK and dV (rule path), as fp32 partial sums the dK/dV kernel adds.

    Long columns hold most of the backward's work (a vertical block is read by every later query
    tile) in few, long, unmasked runs. ``COLS`` of one head's columns, ``stride`` blocks apart, sit
    side by side in one key tile of ``BLOCK_N`` rows (a big block is cut into ``BLOCK // BLOCK_N``
    tiles instead), so the matrix products are as wide as a dense kernel's whatever the pattern's
    block; until the tile's last column opens, rows of columns not yet open are masked. A program takes
    the ``split``-th chunk of ``chunk`` query tiles of one key tile of one head, so the long columns do
    not run alone at the end (query tiles ``q_tile_lo + split * chunk`` onwards, the same for every column,
    so programs side by side read the same ones); ``ORDER`` lists the programs' (key tile, split, head),
    in the order of ``launch._long_order``. With one chunk it stores, else it adds atomically (zeroed PART)."""
    code = tl.load(ORDER + tl.program_id(0))
    h = code % n_heads
    tile, split = code // n_heads // n_splits, code // n_heads % n_splits
    b = tl.program_id(2)
    q_start, k_start, len_q, len_k = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN)
    ROWS: tl.constexpr = BLOCK_N // COLS  # rows of one column in the tile
    NSUB: tl.constexpr = BLOCK // ROWS
    group = tile // NSUB
    shift, dense = head_rule(h, stride=stride, step=step, offset=offset, heads_per_group=heads_per_group,
                             head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous)
    first = first_congruent(0, stride, shift)
    if column_block(group * COLS, first, stride, dense) * BLOCK >= len_k:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c = group * COLS + offs_n // ROWS
    kb = column_block(c, first, stride, dense)
    in_blk = (tile % NSUB) * ROWS + offs_n % ROWS
    k_pos = kb * BLOCK + in_blk
    q_off = len_k - len_q
    q_tile_lo = q_off // BLOCK_M
    q_tile_hi = (len_k - 1) // BLOCK_M
    open_lo = long_open_tile(kb, q_tile_lo, BLOCK=BLOCK, BLOCK_M=BLOCK_M, OPEN_ALIGN=OPEN_ALIGN, CAUSAL=CAUSAL)
    lo = tl.maximum(tl.min(open_lo, 0), q_tile_lo + split * chunk)
    hi = tl.minimum(q_tile_lo + (split + 1) * chunk, q_tile_hi + 1)
    all_open = tl.max(open_lo, 0)
    kv_mask = (k_pos < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    kvh = h // heads_per_kv
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, k_start + k_pos, stride_ks, kv_mask, BLOCK_D)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, k_start + k_pos, stride_vs, kv_mask, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    q_base, do_base, lse_base, delta_base = _head_rows(Q, DO, LSE, DELTA, b, h, q_start, stride_qb, stride_qs,
                                                       stride_qh, stride_dob, stride_dos, stride_doh, stride_lb,
                                                       stride_lh, stride_ls)
    state = (q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls, Q, DO, 0, 0, 0,
             k_pos, kb, offs_m, offs_d, q_off, len_q, qk_scale)
    rule = (0, Q, Q, open_lo, open_lo, local, stride, shift, dense)  # row_hi: unused (no MASK_BLOCKS here)
    masked_hi = tl.minimum(hi, all_open)
    dk, dv = _dkdv_segment(dk, dv, k, v, *state, lo, masked_hi - lo, *rule, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASK=MASK_OPENING, TABLE=False,
                           UPCAST=UPCAST, TMA=False)
    open_start = tl.maximum(lo, all_open)
    dk, dv = _dkdv_segment(dk, dv, k, v, *state, open_start, hi - open_start, *rule, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASK=UNMASKED, TABLE=False,
                           UPCAST=UPCAST, TMA=False)
    where = (b, k_start, c, h, in_blk, offs_d, n_heads, part_cols, part_stride)
    if ATOMIC:
        if lo < hi:
            # relaxed: nothing reads the sums before the kernel ends (the default, acq_rel, orders each add)
            tl.atomic_add(_long_col_ptrs(PART_K, *where, BLOCK, BLOCK_D, VARLEN), dk, mask=kv_mask, sem="relaxed")
            tl.atomic_add(_long_col_ptrs(PART_V, *where, BLOCK, BLOCK_D, VARLEN), dv, mask=kv_mask, sem="relaxed")
    else:
        tl.store(_long_col_ptrs(PART_K, *where, BLOCK, BLOCK_D, VARLEN), dk, mask=kv_mask)
        tl.store(_long_col_ptrs(PART_V, *where, BLOCK, BLOCK_D, VARLEN), dv, mask=kv_mask)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, PART_K, PART_V, cu_q, cu_k, tab_ptr, tab_tile, tab_bits, Q_DESC, DO_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, heads_per_kv, n_heads, n_kblocks, qk_scale, sm_scale, chunk, n_splits, part_cols,
    part_stride,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous, pattern_heads,
    KEY_MAP, stride_map, q_shift,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, TABLE: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC: tl.constexpr, OPEN_ALIGN: tl.constexpr, TMA: tl.constexpr, REMAP: tl.constexpr,
):
    """dK and dV of one key tile for one kv head: every query head of its group.

    Tables: the column's entries, the ``split``-th chunk of ``chunk`` of them; with more than one
    chunk, results add atomically into fp32. Rule: a short column's query tiles (all masked: one loop), a
    long column's diagonal tiles plus its partial sums from :func:`_attn_bwd_dkdv_long`; every element is
    then stored once, in the output dtype. ``REMAP`` (rule, packed keys): key row ``r`` holds absolute block
    ``KEY_MAP[kvh, kb[r]]``; the rule and causality see it as block ``kb_abs - q_shift`` of the queries' packed
    frame, and every query tile that reads it is here (no long pass)."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1) // n_splits
    split = tl.program_id(1) % n_splits
    b = tl.program_id(2)
    q_start, k_start, len_q, len_k = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    q_off = len_k - len_q
    q_tile_lo = q_off // BLOCK_M
    q_tile_hi = (len_k - 1) // BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    k_pos = pid_n * BLOCK_N + offs_n
    if TABLE:
        kb = (pid_n * BLOCK_N) // BLOCK
    else:
        kb = k_pos // BLOCK  # rule: the key tile may hold several blocks
    kv_mask = (k_pos < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, k_start + k_pos, stride_ks, kv_mask, BLOCK_D)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, k_start + k_pos, stride_vs, kv_mask, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    work = 0
    if REMAP:
        kb_abs = tl.load(KEY_MAP + kvh * stride_map + kb, mask=k_pos < len_k, other=-1)
        kb_v = kb_abs - q_shift  # the key's block in the queries' packed frame
        k_cmp = kb_v * BLOCK + k_pos % BLOCK  # its position there, for causality
    else:
        kb_v = kb
        k_cmp = k_pos
    for i in range(heads_per_kv):
        h = kvh * heads_per_kv + i
        q_base, do_base, lse_base, delta_base = _head_rows(Q, DO, LSE, DELTA, b, h, q_start, stride_qb, stride_qs,
                                                           stride_qh, stride_dob, stride_dos, stride_doh, stride_lb,
                                                           stride_lh, stride_ls)
        state = (q_base, do_base, lse_base, delta_base,
                 stride_qs, stride_dos, stride_ls, Q_DESC, DO_DESC, 0 if VARLEN else b, q_start - q_off, h,
                 k_cmp, kb_v, offs_m, offs_d, q_off, len_q, qk_scale)
        if TABLE:
            col = (h % pattern_heads) * n_kblocks + kb
            end = tl.load(tab_ptr + col + 1)
            # a column lists absolute query tiles from tile 0: start at the sequence's first one (the splits
            # are sized for the query tiles there are, not for the keys')
            ent = _lower_bound(tab_tile, tl.load(tab_ptr + col), end, q_tile_lo)
            cnt = end - ent
            lo = tl.minimum(split * chunk, cnt)
            n = tl.minimum(cnt - lo, chunk)
            work += n
            dk, dv = _dkdv_segment(dk, dv, k, v, *state, 0, n, ent + lo, tab_tile, tab_bits, kb, kb, local=1,
                                   stride=1, shift=0, dense=False, BLOCK=BLOCK, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM,
                                   BLOCK_D=BLOCK_D, CAUSAL=CAUSAL, MASK=MASK_BLOCKS, TABLE=True, UPCAST=UPCAST,
                                   TMA=TMA)
        else:
            shift, dense = head_rule(h, stride=stride, step=step, offset=offset, heads_per_group=heads_per_group,
                                     head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous)
            # per key row its query tiles lo..hi (a long row only up to its own hi: the long pass has the rest),
            # for the tile their union, every tile masked: one loop, one pipeline to fill (H100, short pass,
            # block 64: 32k 1.46 -> 1.45 ms, 128k 6.59 -> 6.32; block 16, 32k 1.74 -> 1.65; against an unmasked
            # middle loop between two masked ones)
            if REMAP:
                lo, hi = mapped_col_tiles(kb_abs, kb_v, q_tile_lo, q_tile_hi, local, stride, shift, dense, BLOCK=BLOCK,
                                          BLOCK_M=BLOCK_M, CAUSAL=CAUSAL)
                shift = (shift + q_shift % stride + stride) % stride  # the rule in the packed frame
            else:
                lo, hi, long = col_tiles(kb, q_tile_lo, q_tile_hi, local, stride, shift, dense, BLOCK=BLOCK,
                                         BLOCK_M=BLOCK_M, CAUSAL=CAUSAL, OPEN_ALIGN=OPEN_ALIGN)
            rule = (0, tab_tile, tab_bits, lo, hi, local, stride, shift, dense)
            t_lo = tl.min(lo, 0)
            dk, dv = _dkdv_segment(dk, dv, k, v, *state, t_lo, tl.max(hi, 0) - t_lo + 1, *rule, BLOCK=BLOCK,
                                   BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CAUSAL=CAUSAL,
                                   MASK=MASK_BLOCKS, TABLE=False, UPCAST=UPCAST, TMA=TMA)
            if not REMAP:  # a long column's partial sums from the long pass
                if tl.max(long.to(tl.int32), 0) > 0:
                    c = tl.where(dense, kb, (kb - first_congruent(0, stride, shift)) // stride)
                    where = (b, k_start, c, h, k_pos - kb * BLOCK, offs_d, n_heads, part_cols, part_stride)
                    p_mask = kv_mask & long[:, None]
                    dk += tl.load(_long_col_ptrs(PART_K, *where, BLOCK, BLOCK_D, VARLEN), mask=p_mask, other=0.0)
                    dv += tl.load(_long_col_ptrs(PART_V, *where, BLOCK, BLOCK_D, VARLEN), mask=p_mask, other=0.0)
    k_rows = k_start + k_pos
    dk_ptrs = DK + b * stride_dkb + k_rows[:, None] * stride_dks + kvh * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + k_rows[:, None] * stride_dvs + kvh * stride_dvh + offs_d[None, :]
    if ATOMIC:
        if work > 0:
            tl.atomic_add(dk_ptrs, dk * sm_scale, mask=kv_mask, sem="relaxed")
            tl.atomic_add(dv_ptrs, dv, mask=kv_mask, sem="relaxed")
    else:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
