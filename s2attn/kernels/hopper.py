"""Warp-specialised kernels for Hopper GPUs (Gluon): the backward's dK/dV long pass and dQ, and the forward.

Same work and same outputs as their Triton twins in :mod:`s2attn.kernels.attention`
(``_attn_bwd_dkdv_long``: fp32 partial sums of the long columns' full query tiles; ``_attn_bwd_dq`` on
the rule path: dQ and delta; ``_attn_fwd`` on the rule path: out and lse), with the roles split across warps
instead of every warp doing everything in lockstep at CTA barriers:

* one *loader* warp streams tiles through TMA into a ring of shared-memory stages (the long pass: Q and
  dO tiles of 64 queries with their lse and delta rows; dQ: K and V tiles of 64 keys; the forward: K and V
  tiles of 128 keys, each in its own ring) and signals each one ready on an mbarrier;
* two *compute* warpgroups each own 64 rows (long pass: key rows, with their K, V, dK and dV; dQ: query
  rows, with their Q, dO and dQ). They share the ring but nothing else, so neither waits for the other:
  while one computes ``exp2`` and dS, the other's products keep the tensor cores busy. Each releases a
  stage by arriving on its ``empty`` barrier (count 2).

In the long pass a warpgroup skips the query tiles before its first column opens (causal); with pattern
blocks under 64 its rows span several columns, and a row is masked until its own column opens. The Triton
kernels stay the reference, and the path everywhere else: other GPUs, the CPU interpreter, packed
sequences, mask tables, head dims other than 64 and 128, fp32 (see ``launch._hopper_descriptors``); and
for dQ, pattern blocks under 64 and up to 32k keys, where Triton's tiles are faster; the forward unless asked
for (``plan_overrides(warp_specialised={"fwd": True})``: faster on an H100, its GPU tests not yet passed).
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .attention import _load_lse2, _lse2
from .rule import (LOG2E_C, column_block, first_congruent, head_rule, keys_ok, long_open_tile, row_segments,
                   rows_allowed, tile_ok)

ROWS = gl.constexpr(64)  # rows a compute warpgroup owns (one wgmma M)


@triton.constexpr_function
def _acc_layout(n):
    """Registers of a compute warpgroup's ``ROWS x n`` wgmma accumulator."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@triton.constexpr_function
def _operand_layout(n):
    """Registers of a 16-bit left operand (P, dS) of a wgmma whose accumulator is ``ROWS x n``."""
    return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(n), k_width=2)


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """A ring's mbarriers, ``ready`` (a stage's TMA bytes landed) and ``empty`` (both compute warpgroups are
    done with it) per stage, and one for the tiles loaded once."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    mbarrier.init(once, count=1)
    return ready, empty, once


@gluon.jit
def _stage_products(a0, a1, bufs0, bufs1, ready, s, phase, zeros):
    """Once stage ``s`` of the ring has landed: ``a0 @ tile0^T`` (the scores), done, and ``a1 @ tile1^T``
    (dP), still in flight; and the stage's two tiles."""
    mbarrier.wait(ready.index(s), phase)
    ROWS_T: gl.constexpr = bufs0.type.shape[2]
    DIM: gl.constexpr = bufs0.type.shape[4]
    t0 = bufs0.index(s).reshape([ROWS_T, DIM])
    t1 = bufs1.index(s).reshape([ROWS_T, DIM])
    s0 = warpgroup_mma(a0, t0.permute((1, 0)), zeros, use_acc=False, is_async=True)
    s1 = warpgroup_mma(a1, t1.permute((1, 0)), zeros, use_acc=False, is_async=True)
    return warpgroup_mma_wait(num_outstanding=1, deps=(s0,)), s1, t0, t1


@gluon.jit
def _loader(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_bufs, v_bufs, lse_bufs,
            delta_bufs, ready, empty, kv_ready, b, h, kvh, lse_row, c0, c1, in0, in1, first, stride, dense, lo, hi,
            q_off, BLOCK: gl.constexpr, BLOCK_M: gl.constexpr):
    """Each warpgroup's 64 key rows (one TMA tile per column they span) once, then Q, dO, lse and delta tile
    after tile through the ring (lse and delta: row ``lse_row = b * heads + h``)."""
    stages: gl.constexpr = q_bufs.type.shape[0]
    RPC: gl.constexpr = k_desc.block_type.shape[1]  # rows a column gives a warpgroup
    CW: gl.constexpr = ROWS // RPC  # columns a warpgroup spans
    mbarrier.expect(kv_ready, 2 * CW * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for j in gl.static_range(CW):  # rows of a column past the sequence's end read as zeros
        row = column_block(c0 + j, first, stride, dense) * BLOCK + in0
        tma.async_copy_global_to_shared(k_desc, [b, row, kvh, 0], kv_ready, k_bufs.index(0).slice(j * RPC, RPC, 1))
        tma.async_copy_global_to_shared(v_desc, [b, row, kvh, 0], kv_ready, v_bufs.index(0).slice(j * RPC, RPC, 1))
        row = column_block(c1 + j, first, stride, dense) * BLOCK + in1
        tma.async_copy_global_to_shared(k_desc, [b, row, kvh, 0], kv_ready, k_bufs.index(1).slice(j * RPC, RPC, 1))
        tma.async_copy_global_to_shared(v_desc, [b, row, kvh, 0], kv_ready, v_bufs.index(1).slice(j * RPC, RPC, 1))
    for i in range(hi - lo):
        s = i % stages
        mbarrier.wait(empty.index(s), (i // stages & 1) ^ 1)  # a fresh barrier's phase "1" is complete
        bar = ready.index(s)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes + lse_desc.block_type.nbytes
                        + delta_desc.block_type.nbytes)
        row = (lo + i) * BLOCK_M - q_off  # negative or past the end: TMA reads zeros there
        tma.async_copy_global_to_shared(q_desc, [b, row, h, 0], bar, q_bufs.index(s))
        tma.async_copy_global_to_shared(do_desc, [b, row, h, 0], bar, do_bufs.index(s))
        # lse / delta rows from entry -(q_off % 4) on (launch._tma_rows): tiles start on 16-byte boundaries
        tma.async_copy_global_to_shared(lse_desc, [lse_row, row + q_off % 4], bar, lse_bufs.index(s))
        tma.async_copy_global_to_shared(delta_desc, [lse_row, row + q_off % 4], bar, delta_bufs.index(s))


@gluon.jit
def _compute(q_bufs, do_bufs, k_bufs, v_bufs, lse_bufs, delta_bufs, ready, empty, kv_ready, PART_K, PART_V,
             c_first, in_first, first, stride, dense, part_base, n_heads, h, len_k, q_tile_lo, lo, hi, qk_scale,
             WG: gl.constexpr, BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
             CAUSAL: gl.constexpr, ATOMIC: gl.constexpr, OPEN_ALIGN: gl.constexpr):
    """Compute warpgroup ``WG``: dK and dV of its 64 key rows (rows from ``in_first`` of column ``c_first``,
    or whole columns from ``c_first`` for blocks under 64) over query tiles ``lo..hi-1``, each row from the
    tile its column opens at; added (or stored) into the partial sums of sequence row ``part_base``."""
    stages: gl.constexpr = q_bufs.type.shape[0]
    dtype: gl.constexpr = q_bufs.dtype
    RPC: gl.constexpr = ROWS if BLOCK > ROWS else BLOCK  # rows of one column here
    s_layout: gl.constexpr = _acc_layout(BLOCK_M)
    d_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    a_layout: gl.constexpr = _operand_layout(HEAD_DIM)
    # where each key row's column opens (causal): rows of later columns are masked in the tiles between
    offs_k = gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    row_open = long_open_tile(column_block(c_first + offs_k // RPC, first, stride, dense), q_tile_lo, BLOCK=BLOCK,
                              BLOCK_M=BLOCK_M, OPEN_ALIGN=OPEN_ALIGN, CAUSAL=CAUSAL)
    n = hi - lo
    kb = column_block(c_first, first, stride, dense)
    opens = long_open_tile(kb, q_tile_lo, BLOCK=BLOCK, BLOCK_M=BLOCK_M, OPEN_ALIGN=OPEN_ALIGN, CAUSAL=CAUSAL)
    n_skip = gl.where(kb * BLOCK + in_first < len_k, gl.minimum(gl.maximum(opens - lo, 0), n), n)  # else no rows
    n_masked = gl.minimum(gl.maximum(gl.max(row_open, 0) - lo, n_skip), n)
    zeros_s = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
    k = k_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    v = v_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    for i in range(n_skip):  # tiles before this warpgroup's first column opens: pass the stage on
        mbarrier.wait(ready.index(i % stages), i // stages & 1)
        mbarrier.arrive(empty.index(i % stages), count=1)
    mbarrier.wait(kv_ready, 0)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    for i in range(n_skip, n):
        s = i % stages
        st, dpt, q, do = _stage_products(k, v, q_bufs, do_bufs, ready, s, i // stages & 1, zeros_s)
        # lse and delta from shared memory, not registers held across the products (spills 124 -> 0 bytes);
        # rows outside the sequence read 0 there, and their Q and dO rows 0, so they add nothing
        pt = gl.exp2(st * qk_scale - _lse2(lse_bufs.index(s).load(s_layout)))  # lse: (1, BLOCK_M)
        if i < n_masked:
            pt = gl.where((row_open <= lo + i)[:, None], pt, 0.0)
        # dV's product runs while dS is computed (H100: long pass 128k 34.2-34.8 ms against 35.2, 32k 2.09-2.11
        # against 2.12-2.16)
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt,))
        dst = pt * (dpt - delta_bufs.index(s).load(s_layout))
        dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), a_layout), q, dk, is_async=True)
        # waiting here, not after the next tile's first products: releasing the stage a tile later starved
        # the loader (H100, 128k: long pass 41-42 ms against 34-35)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        mbarrier.arrive(empty.index(s), count=1)
    offs_r = gl.arange(0, ROWS, gl.SliceLayout(1, d_layout))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, d_layout))
    col = c_first + offs_r // RPC
    in_blk = in_first + offs_r % RPC
    ok = (column_block(col, first, stride, dense) * BLOCK + in_blk < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = ((part_base + col).to(gl.int64) * n_heads + h) * BLOCK + in_blk
    ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    if ATOMIC:
        if n_skip < n:
            gl.atomic_add(PART_K + ptrs, dk, mask=ok, sem="relaxed")
            gl.atomic_add(PART_V + ptrs, dv, mask=ok, sem="relaxed")
    else:  # every row once, zeros included (a column with no full tile here still reads its sums)
        gl.store(PART_K + ptrs, dk, mask=ok)
        gl.store(PART_V + ptrs, dv, mask=ok)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])  # worker partitions take values, not Python ints
def _attn_bwd_dkdv_long_ws(
    q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, PART_K, PART_V, ORDER,
    seqlen_q, seqlen_k, heads_per_kv, n_heads, qk_scale, chunk, n_splits, part_cols,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
    BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, COLS: gl.constexpr, HEAD_DIM: gl.constexpr,
    CAUSAL: gl.constexpr, ATOMIC: gl.constexpr, OPEN_ALIGN: gl.constexpr, STAGES: gl.constexpr,
):
    """Program ``ORDER[program_id(0)]``: the ``split``-th chunk of query tiles of one 128-key tile (``COLS``
    columns side by side, or a part of one column of 128 keys or more) of one head, as in the Triton long
    pass; batch ``program_id(2)``."""
    code = gl.load(ORDER + gl.program_id(0))
    h = code % n_heads
    tile = code // n_heads // n_splits
    split = code // n_heads % n_splits
    b = gl.program_id(2)
    len_q = seqlen_q
    len_k = seqlen_k
    COL_ROWS: gl.constexpr = 2 * ROWS // COLS  # rows of one column in the 128-key tile
    NSUB: gl.constexpr = BLOCK // COL_ROWS  # tiles to a column
    group = tile // NSUB
    shift, dense = head_rule(h, stride=stride, step=step, offset=offset, heads_per_group=heads_per_group,
                             head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous)
    first = first_congruent(0, stride, shift)
    # each warpgroup's first column and row in it
    c0 = group * COLS
    c1 = group * COLS + ROWS // COL_ROWS
    in0 = (tile % NSUB) * COL_ROWS
    in1 = (tile % NSUB) * COL_ROWS + ROWS % COL_ROWS
    kb0 = column_block(c0, first, stride, dense)
    if kb0 * BLOCK < len_k:
        q_off = len_k - len_q
        q_tile_lo = q_off // BLOCK_M
        opens = long_open_tile(kb0, q_tile_lo, BLOCK=BLOCK, BLOCK_M=BLOCK_M, OPEN_ALIGN=OPEN_ALIGN, CAUSAL=CAUSAL)
        lo = gl.maximum(opens, q_tile_lo + split * chunk)  # split: an absolute range (launch._long_order)
        hi = gl.minimum(q_tile_lo + (split + 1) * chunk, (len_k - 1) // BLOCK_M + 1)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        kv_shape: gl.constexpr = [2, 1, ROWS, 1, HEAD_DIM]  # a warpgroup's rows, whatever the columns they span
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, kv_shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, kv_shape, v_desc.layout)
        lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
        ready, empty, kv_ready = _barriers(STAGES)
        base = b * part_cols
        gl.warp_specialize([
            (_compute, (q_bufs, do_bufs, k_bufs, v_bufs, lse_bufs, delta_bufs, ready, empty, kv_ready, PART_K,
                        PART_V, c0, in0, first, stride, dense, base, n_heads, h, len_k, q_tile_lo, lo, hi, qk_scale,
                        0, BLOCK, BLOCK_M, HEAD_DIM, CAUSAL, ATOMIC, OPEN_ALIGN)),
            (_compute, (q_bufs, do_bufs, k_bufs, v_bufs, lse_bufs, delta_bufs, ready, empty, kv_ready, PART_K,
                        PART_V, c1, in1, first, stride, dense, base, n_heads, h, len_k, q_tile_lo, lo, hi, qk_scale,
                        1, BLOCK, BLOCK_M, HEAD_DIM, CAUSAL, ATOMIC, OPEN_ALIGN)),
            (_loader, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_bufs, v_bufs,
                       lse_bufs, delta_bufs, ready, empty, kv_ready, b, h, h // heads_per_kv, b * n_heads + h, c0, c1,
                       in0, in1, first, stride, dense, lo, hi, q_off, BLOCK, BLOCK_M)),
        ], [4, 1], [240, 24])


# --------------------------------------------------------------------------- query-major: dQ and the forward
@gluon.jit
def _query_tile(seqlen_q, seqlen_k, TILE: gl.constexpr):
    """This program's tile of ``TILE`` queries (the last, the longest, first), where the queries start among the
    keys (``q_off``), and whether the tile holds any."""
    q_off = seqlen_k - seqlen_q
    tile = (seqlen_k - 1) // TILE - gl.program_id(0)
    return tile, q_off, tile >= q_off // TILE


@gluon.jit
def _query_tile_blocks(tile, len_k, h, local, stride, step, offset, heads_per_group, head_base, sparse_groups,
                       homogeneous, TILE: gl.constexpr, BLOCK: gl.constexpr, CAUSAL: gl.constexpr):
    """Head ``h``'s rule ``(shift, dense)``; the key blocks a tile of ``TILE`` queries (tile ``tile``) reads, as its
    five segments (``segs``, which :func:`_nth_block` walks; see ``rule.row_segments``); and how many they are."""
    shift, dense = head_rule(h, stride=stride, step=step, offset=offset, heads_per_group=heads_per_group,
                             head_base=head_base, sparse_groups=sparse_groups, homogeneous=homogeneous)
    qb_lo = (tile * TILE) // BLOCK
    qb_hi = gl.minimum(tile * TILE + TILE - 1, len_k - 1) // BLOCK
    n_kb = gl.cdiv(len_k, BLOCK)
    a0, an, b_lo, b_hi, c_lo, c_hi, d_lo, d_hi, e0, en = row_segments(
        qb_lo, qb_hi, n_kb, local=local, stride=stride, shift=shift, dense=dense, CAUSAL=CAUSAL)
    bn = gl.maximum(b_hi - b_lo + 1, 0)
    cn = gl.maximum(c_hi - c_lo + 1, 0)
    dn = gl.maximum(d_hi - d_lo + 1, 0)
    segs = (a0, gl.where(dense, 1, stride), an, b_lo, bn, c_lo, cn, d_lo, dn, e0, en, stride, n_kb)
    return shift, dense, segs, an + bn + cn + dn + en


@gluon.jit
def _nth_block(i, segs):
    """Key block of step ``i`` (scalar or tensor) over a query tile's five segments in order, past them block
    ``n_kb`` (past the sequence's end: TMA reads zeros there); and whether it is masked (segments b, d, e, and
    past them)."""
    a0, a_step, an, b_lo, bn, c_lo, cn, d_lo, dn, e0, en, stride, n_kb = segs
    ab = an + bn
    abc = ab + cn
    abcd = abc + dn
    kb = gl.where(i < abcd + en, e0 + (i - abcd) * stride, n_kb)
    kb = gl.where(i < abcd, d_lo + (i - abc), kb)
    kb = gl.where(i < abc, c_lo + (i - ab), kb)
    kb = gl.where(i < ab, b_lo + (i - an), kb)
    kb = gl.where(i < an, a0 + i * a_step, kb)
    return kb, (i >= an) & ((i < ab) | (i >= abc))


@gluon.jit
def _load_query_rows(desc, bufs, bar, b, h, row0):
    """The two compute warpgroups' query rows of ``desc`` (``ROWS`` each from sequence row ``row0``) into ``bufs``."""
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(desc, [b, row0 + w * ROWS, h, 0], bar, bufs.index(w))


@gluon.jit
def _dq_loader(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty,
               b, h, kvh, q_row0, steps, segs, BLOCK: gl.constexpr):
    """The warpgroups' query and dO rows once, then K and V tile after tile through the ring."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    NSUB: gl.constexpr = BLOCK // KEYS  # key tiles to a pattern block
    mbarrier.expect(qdo_ready, 2 * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
    _load_query_rows(q_desc, q_bufs, qdo_ready, b, h, q_row0)
    _load_query_rows(do_desc, do_bufs, qdo_ready, b, h, q_row0)
    for j in range(steps):
        s = j % stages
        kb, _ = _nth_block(j // NSUB, segs)
        row = kb * BLOCK + (j % NSUB) * KEYS
        mbarrier.wait(empty.index(s), (j // stages & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, row, kvh, 0], bar, k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [b, row, kvh, 0], bar, v_bufs.index(s))


@gluon.jit
def _dq_compute(q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty, O, DO, DQ, LSE, DLSE, DELTA,
                stride_os, stride_dos, stride_dqs, q_first, len_q, len_k, q_off, qk_scale, sm_scale,
                steps, segs, local, stride, shift, dense,
                WG: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                HAS_DLSE: gl.constexpr):
    """Compute warpgroup ``WG``: delta and dQ of its 64 query rows (positions from ``q_first``); ``O``,
    ``DO``, ``DQ``, ``LSE``, ``DLSE`` and ``DELTA`` point at this head's row 0 of the sequence."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    dtype: gl.constexpr = k_bufs.dtype
    KEYS: gl.constexpr = k_bufs.type.shape[2]
    NSUB: gl.constexpr = BLOCK // KEYS
    s_layout: gl.constexpr = _acc_layout(KEYS)
    d_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    a_layout: gl.constexpr = _operand_layout(HEAD_DIM)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    # delta = rowsum(dO * O) - dlse, for the dK/dV kernels too
    q_pos_d = q_first + gl.arange(0, ROWS, gl.SliceLayout(1, d_layout))
    q_row_d = q_pos_d - q_off
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, d_layout))
    io_mask = ((q_row_d >= 0) & (q_row_d < len_q))[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = gl.load(O + q_row_d.to(gl.int64)[:, None] * stride_os + offs_d[None, :], mask=io_mask, other=0.0)
    do_r = gl.load(DO + q_row_d.to(gl.int64)[:, None] * stride_dos + offs_d[None, :], mask=io_mask, other=0.0)
    delta = gl.sum(o.to(gl.float32) * do_r.to(gl.float32), 1)
    q_pos = q_first + gl.arange(0, ROWS, row_layout)
    q_row = q_pos - q_off
    row_ok = (q_row >= 0) & (q_row < len_q)
    if HAS_DLSE:
        delta = delta - gl.convert_layout(gl.load(DLSE + q_row, mask=row_ok, other=0.0), delta.type.layout)
    gl.store(DELTA + q_row_d, delta, mask=(q_row_d >= 0) & (q_row_d < len_q))
    delta = gl.convert_layout(delta, row_layout)
    lse2 = _load_lse2(LSE + q_row, row_ok)
    qb_rows = q_pos // BLOCK
    offs_n = gl.arange(0, KEYS, gl.SliceLayout(0, s_layout))
    zeros_s = gl.zeros([ROWS, KEYS], gl.float32, s_layout)
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    mbarrier.wait(qdo_ready, 0)
    q = q_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    do = do_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    for j in range(steps):
        s = j % stages
        kb, masked = _nth_block(j // NSUB, segs)
        st, dpt, k, v = _stage_products(q, do, k_bufs, v_bufs, ready, s, j // stages & 1, zeros_s)
        p = gl.exp2(st * qk_scale - lse2[:, None])
        if masked:
            k_pos = kb * BLOCK + (j % NSUB) * KEYS + offs_n
            ok = tile_ok(rows_allowed(qb_rows, kb, local, stride, shift, dense, CAUSAL=CAUSAL), q_pos, k_pos, len_k,
                         CAUSAL=CAUSAL)
            p = gl.where(ok, p, 0.0)
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        ds = p * (dpt - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k, dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
        mbarrier.arrive(empty.index(s), count=1)
    gl.store(DQ + q_row_d.to(gl.int64)[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(dtype),
             mask=io_mask)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "stride_os", "stride_dos", "stride_dqs"])
def _attn_bwd_dq_ws(
    q_desc, do_desc, k_desc, v_desc, O, DO, DQ, LSE, DLSE, DELTA,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
    BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, HAS_DLSE: gl.constexpr,
    STAGES: gl.constexpr,
):
    """dQ (and delta) of one tile of 128 queries (the last first), like ``attention._attn_bwd_dq`` on the
    rule path: a loader warp streams the tile's key tiles through a ring, two compute warpgroups take 64
    query rows each."""
    TILE: gl.constexpr = 2 * ROWS
    h = gl.program_id(1)
    b = gl.program_id(2)
    len_q = seqlen_q
    len_k = seqlen_k
    tile, q_off, exists = _query_tile(len_q, len_k, TILE)
    if exists:
        shift, dense, segs, n_blocks = _query_tile_blocks(
            tile, len_k, h, local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
            TILE=TILE, BLOCK=BLOCK, CAUSAL=CAUSAL)
        steps = n_blocks * (BLOCK // k_desc.block_type.shape[1])
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [2] + do_desc.block_type.shape, do_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        ready, empty, qdo_ready = _barriers(STAGES)
        o_ptr = O + b * stride_ob + h * stride_oh
        do_ptr = DO + b * stride_dob + h * stride_doh
        dq_ptr = DQ + b * stride_dqb + h * stride_dqh
        lse_ptr = LSE + b * stride_lb + h * stride_lh
        dlse_ptr = DLSE + b * stride_lb + h * stride_lh
        delta_ptr = DELTA + b * stride_lb + h * stride_lh
        first0 = tile * TILE
        first1 = tile * TILE + ROWS
        gl.warp_specialize([
            (_dq_compute, (q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty, o_ptr, do_ptr, dq_ptr, lse_ptr,
                           dlse_ptr, delta_ptr, stride_os, stride_dos, stride_dqs, first0, len_q, len_k, q_off,
                           qk_scale, sm_scale, steps, segs, local, stride, shift, dense, 0, BLOCK, HEAD_DIM,
                           CAUSAL, HAS_DLSE)),
            (_dq_compute, (q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty, o_ptr, do_ptr, dq_ptr, lse_ptr,
                           dlse_ptr, delta_ptr, stride_os, stride_dos, stride_dqs, first1, len_q, len_k, q_off,
                           qk_scale, sm_scale, steps, segs, local, stride, shift, dense, 1, BLOCK, HEAD_DIM,
                           CAUSAL, HAS_DLSE)),
            (_dq_loader, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty,
                          b, h, h // heads_per_kv, first0 - q_off, steps, segs, BLOCK)),
        ], [4, 1], [240, 24])


# --------------------------------------------------------------------------- forward, query-major
@gluon.jit
def _load_key_tile(desc, bufs, ready, empty, t, slot0, b, kvh, segs, BLOCK: gl.constexpr, stages: gl.constexpr):
    """Key tile ``t`` of a query tile's blocks (consecutive steps of ``desc``'s tile, wherever their blocks lie)
    into its stage of ``bufs``, once the two compute warpgroups are done with the stage's last tile; ring slots
    ``slot0 + stage``."""
    KEYS: gl.constexpr = desc.block_type.shape[1]
    SUB: gl.constexpr = bufs.type.shape[2] // KEYS  # steps to a tile
    NSUB: gl.constexpr = BLOCK // KEYS  # steps to a pattern block
    s = t % stages
    mbarrier.wait(empty.index(slot0 + s), (t // stages & 1) ^ 1)  # a fresh barrier's phase "1" is complete
    bar = ready.index(slot0 + s)
    mbarrier.expect(bar, SUB * desc.block_type.nbytes)
    for u in gl.static_range(SUB):
        j = t * SUB + u
        kb, _ = _nth_block(j // NSUB, segs)  # past the last block: zeros
        tma.async_copy_global_to_shared(desc, [b, kb * BLOCK + (j % NSUB) * KEYS, kvh, 0], bar,
                                        bufs.index(s).slice(u * KEYS, KEYS, 1))


@gluon.jit
def _fwd_loader(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, b, h, kvh, q_row0, n_tiles,
                segs, BLOCK: gl.constexpr, stages: gl.constexpr):
    """The warpgroups' query rows once, then K and V tile after tile, each through its own ring (K's slots first,
    then V's): a K stage comes free as soon as its scores are done, a V stage one tile later."""
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    _load_query_rows(q_desc, q_bufs, q_ready, b, h, q_row0)
    for t in range(n_tiles):
        _load_key_tile(k_desc, k_bufs, ready, empty, t, 0, b, kvh, segs, BLOCK, stages)
        _load_key_tile(v_desc, v_bufs, ready, empty, t, stages, b, kvh, segs, BLOCK, stages)


@gluon.jit
def _ring_tile(bufs, ready, t, slot0, stages: gl.constexpr):
    """Tile ``t``'s stage of ``bufs`` as ``[BLOCK_N, HEAD_DIM]`` once it has landed (ring slots ``slot0 + stage``)."""
    mbarrier.wait(ready.index(slot0 + t % stages), t // stages & 1)
    return bufs.index(t % stages).reshape([bufs.type.shape[2], bufs.type.shape[4]])


@gluon.jit
def _take_turn(turns, i, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: warpgroup ``WG`` waits for the other's ``i``-th issue of products (warpgroup 0 goes first)."""
    if PINGPONG:
        mbarrier.wait(turns.index(WG), (i & 1) ^ (1 - WG))


@gluon.jit
def _pass_turn(turns, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: warpgroup ``WG``'s products are issued; the other's turn."""
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - WG))


@gluon.jit
def _fwd_mask(st, t, q_pos, segs, len_k, local, stride, shift, dense, BLOCK: gl.constexpr, KEYS: gl.constexpr,
              CAUSAL: gl.constexpr):
    """Scores ``st`` of key tile ``t`` with the keys a row may not see at -inf: each key column's block from the
    segments (a tile may hold several, from different segments), the rule, the sequence's end and causality."""
    BLOCK_N: gl.constexpr = st.type.shape[1]
    SUB: gl.constexpr = BLOCK_N // KEYS
    NSUB: gl.constexpr = BLOCK // KEYS
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, st.type.layout))
    j = t * SUB + offs_n // KEYS  # each key column's step
    kb, _ = _nth_block(j // NSUB, segs)
    k_pos = kb * BLOCK + (j % NSUB) * KEYS + offs_n % KEYS
    ok = rows_allowed((q_pos // BLOCK)[:, None], kb[None, :], local, stride, shift, dense, CAUSAL=CAUSAL)
    return gl.where(keys_ok(ok, q_pos, k_pos, len_k, CAUSAL=CAUSAL), st, float("-inf"))


@gluon.jit
def _tile_masked(t, segs, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, KEYS: gl.constexpr):
    """Whether key tile ``t`` holds a step of a masked segment (b, d, e, or past them); one that spans segments
    a and c only (no window edge between them) is read unmasked."""
    SUB: gl.constexpr = BLOCK_N // KEYS
    NSUB: gl.constexpr = BLOCK // KEYS
    a0, a_step, an, b_lo, bn, c_lo, cn, d_lo, dn, e0, en, stride, n_kb = segs
    lo = (t * SUB) // NSUB  # first and last block of the tile, in segment order
    hi = (t * SUB + SUB - 1) // NSUB
    return ((bn > 0) & (lo < an + bn) & (hi >= an)) | (hi >= an + bn + cn)


@gluon.jit
def _softmax_step(st, m_i, l_i, qk_scale, p_type: gl.constexpr, p_layout: gl.constexpr):
    """The online softmax's update for one tile of (masked) scores: ``p`` (as P @ V's left operand), the factor
    ``alpha`` that brings what was summed before to the new row maxima, and the new ``m_i``, ``l_i`` (base 2,
    scale folded in)."""
    m_new = gl.maximum(m_i, gl.max(st, 1) * qk_scale)  # qk_scale > 0: the max commutes with it
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: p = 0, not NaN
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(st * qk_scale - m_use[:, None])
    # converted at once: 16 bits a value, not 32, live beside the next scores and the previous P (ptxas, sm_90:
    # 8 bytes of spills otherwise)
    return gl.convert_layout(p.to(p_type), p_layout), alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _fwd_compute(q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turns, o_desc, O, stride_os, LSE, b, h, q_first,
                 len_q, len_k, q_off, qk_scale, n_tiles, segs, local, shift, dense, WG: gl.constexpr,
                 BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                 PINGPONG: gl.constexpr):
    """Compute warpgroup ``WG``: the online softmax of its 64 query rows (positions from ``q_first``) over the
    tile's ``n_tiles`` key tiles, then ``out`` and ``lse`` (``O`` and ``LSE`` point at this head's row 0 of the
    sequence): rows all inside the sequence through its Q buffer and TMA, others with masked stores.

    Tile ``t``'s scores are issued with ``P @ V`` of tile ``t - 1`` and waited for alone, so tile ``t``'s softmax
    runs while ``P @ V`` of ``t - 1`` is on the tensor cores (the accumulator is rescaled after it); with
    ``PINGPONG`` the two warpgroups issue their products in turn, so one's softmax overlaps the other's products."""
    dtype: gl.constexpr = k_bufs.dtype
    BLOCK_N: gl.constexpr = k_bufs.type.shape[2]
    KEYS: gl.constexpr = BLOCK if BLOCK < BLOCK_N else BLOCK_N  # keys of one step (a TMA tile)
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    d_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    a_layout: gl.constexpr = _operand_layout(HEAD_DIM)
    d_rows: gl.constexpr = gl.SliceLayout(1, d_layout)
    stride = segs[11]
    q_pos = q_first + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout))
    zeros_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(q_ready, 0)
    q = q_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    # tile 0: its scores alone (an existing query tile reads at least its diagonal block: n_tiles >= 1)
    k = _ring_tile(k_bufs, ready, 0, 0, STAGES)
    _take_turn(turns, 0, WG, PINGPONG)
    st = warpgroup_mma(q, k.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
    _pass_turn(turns, WG, PINGPONG)
    st = warpgroup_mma_wait(num_outstanding=0, deps=(st,))
    mbarrier.arrive(empty.index(0))
    if _tile_masked(0, segs, BLOCK, BLOCK_N, KEYS):
        st = _fwd_mask(st, 0, q_pos, segs, len_k, local, stride, shift, dense, BLOCK, KEYS, CAUSAL)
    p, alpha, m_i, l_i = _softmax_step(st, m_i, l_i, qk_scale, dtype, a_layout)
    for t in range(1, n_tiles):
        k = _ring_tile(k_bufs, ready, t, 0, STAGES)
        v = _ring_tile(v_bufs, ready, t - 1, STAGES, STAGES)
        _take_turn(turns, t, WG, PINGPONG)
        st = warpgroup_mma(q, k.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v, acc, is_async=True)
        _pass_turn(turns, WG, PINGPONG)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))  # the scores; P @ V of tile t - 1 still runs
        mbarrier.arrive(empty.index(t % STAGES))
        if _tile_masked(t, segs, BLOCK, BLOCK_N, KEYS):
            st = _fwd_mask(st, t, q_pos, segs, len_k, local, stride, shift, dense, BLOCK, KEYS, CAUSAL)
        p, alpha, m_i, l_i = _softmax_step(st, m_i, l_i, qk_scale, dtype, a_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(STAGES + (t - 1) % STAGES))
        acc = acc * gl.convert_layout(alpha, d_rows)[:, None]
    v = _ring_tile(v_bufs, ready, n_tiles - 1, STAGES, STAGES)
    _take_turn(turns, n_tiles, WG, PINGPONG)
    acc = warpgroup_mma(p, v, acc, is_async=True)
    _pass_turn(turns, WG, PINGPONG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(STAGES + (n_tiles - 1) % STAGES))
    nonempty = l_i > 0.0
    l_safe = gl.where(nonempty, l_i, 1.0)
    o = (acc / gl.convert_layout(l_safe, d_rows)[:, None]).to(dtype)
    row0 = q_first - q_off  # the sequence's queries sit at positions q_off .. len_k - 1
    if (row0 >= 0) & (row0 + ROWS <= len_q):
        # through this warpgroup's Q buffer (its last scores are done) and TMA, only where the whole box is inside the
        # sequence: a TMA store of a box starting before the first query (end-aligned queries) or running past the
        # last is never issued (H100: the tests that issued them died with an illegal instruction, the only TMA
        # operation of theirs that neither the timing run nor the dQ kernel issues; ws_fwd_bisect.py --old-store)
        q.store(o)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, row0, h, 0], q_bufs.index(WG))
    else:  # the sequence's first or last query tile: the rows inside it, as the dQ kernel stores dQ
        rows = row0 + gl.arange(0, ROWS, d_rows)
        offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, d_layout))
        gl.store(O + rows.to(gl.int64)[:, None] * stride_os + offs_d[None, :], o,
                 mask=((rows >= 0) & (rows < len_q))[:, None] & (offs_d < HEAD_DIM)[None, :])
    gl.store(LSE + (q_pos - q_off), gl.where(nonempty, (m_i + gl.log2(l_safe)) / LOG2E_C, float("-inf")),
             mask=(q_pos >= q_off) & (q_pos < len_k))
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "local", "stride", "stride_os"])
def _attn_fwd_ws(
    q_desc, k_desc, v_desc, o_desc, O, stride_ob, stride_os, stride_oh, LSE, stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
    BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Out and lse (natural log, ``-inf`` for a row that sees no key) of one tile of 128 queries (the last
    first), like ``attention._attn_fwd`` on the rule path: a loader warp streams the key blocks the tile reads
    (:func:`_query_tile_blocks`), ``BLOCK_N`` keys a tile (TMA tiles of the pattern block, or of ``BLOCK_N`` keys
    when that is smaller: ``k_desc``'s rows), through K and V rings of ``STAGES``; two compute
    warpgroups take 64 query rows each (:func:`_fwd_compute`). Tiles holding a masked segment's keys, or keys
    past the sequence's end (zeros), are masked per key."""
    TILE: gl.constexpr = 2 * ROWS
    KEYS: gl.constexpr = k_desc.block_type.shape[1]
    h = gl.program_id(1)
    b = gl.program_id(2)
    len_q = seqlen_q
    len_k = seqlen_k
    tile, q_off, exists = _query_tile(len_q, len_k, TILE)
    if exists:
        shift, dense, segs, n_blocks = _query_tile_blocks(
            tile, len_k, h, local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
            TILE=TILE, BLOCK=BLOCK, CAUSAL=CAUSAL)
        n_tiles = gl.cdiv(n_blocks * (BLOCK // KEYS), BLOCK_N // KEYS)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        kv_shape: gl.constexpr = [STAGES, 1, BLOCK_N, 1, HEAD_DIM]
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, kv_shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, kv_shape, v_desc.layout)
        ready, empty, q_ready = _barriers(2 * STAGES)  # K's ring, then V's
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(turns.index(w), count=1)
        o_ptr = O + b.to(gl.int64) * stride_ob + h * stride_oh
        lse_ptr = LSE + b * stride_lb + h * stride_lh
        first0 = tile * TILE
        first1 = tile * TILE + ROWS
        gl.warp_specialize([
            (_fwd_compute, (q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turns, o_desc, o_ptr, stride_os, lse_ptr, b,
                            h, first0, len_q, len_k, q_off, qk_scale, n_tiles, segs, local, shift, dense, 0, BLOCK,
                            HEAD_DIM, CAUSAL, STAGES, PINGPONG)),
            (_fwd_compute, (q_bufs, k_bufs, v_bufs, q_ready, ready, empty, turns, o_desc, o_ptr, stride_os, lse_ptr, b,
                            h, first1, len_q, len_k, q_off, qk_scale, n_tiles, segs, local, shift, dense, 1, BLOCK,
                            HEAD_DIM, CAUSAL, STAGES, PINGPONG)),
            (_fwd_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, ready, empty, b, h,
                           h // heads_per_kv, first0 - q_off, n_tiles, segs, BLOCK, STAGES)),
        ], [4, 1], [232, 32])  # the loader's unrolled steps (blocks of 16) spilled 20 bytes in 24 registers
