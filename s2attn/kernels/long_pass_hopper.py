"""The long pass of the dK/dV backward, warp-specialised for Hopper GPUs (Gluon).

Same work and same output as :func:`s2attn.kernels.attention._attn_bwd_dkdv_long` (fp32 partial sums
of the long columns' full query tiles), with the roles split across warps instead of every warp doing
everything in lockstep:

* one *loader* warp streams the query tiles (Q and dO) through TMA into a ring of shared-memory
  stages, and signals each one ready on an mbarrier;
* two *compute* warpgroups each own 64 rows of the 128-key tile (their own K and V rows in shared
  memory, their own dK and dV accumulators in registers). They share the ring but nothing else, so
  neither waits for the other: while one computes ``exp2`` and dS, the other's products keep the
  tensor cores busy. Each releases a stage by arriving on its ``empty`` barrier (count 2).

A warpgroup skips the query tiles before its own column opens (causal), so no tile is masked except
for rows past the sequence's end. The Triton kernel stays the reference (and the path everywhere else:
other GPUs, the CPU interpreter, packed sequences, small pattern blocks, fp32).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .attention import _first_congruent, _head_rule, _long_open

ROWS = gl.constexpr(64)  # key rows per compute warpgroup (one wgmma M)


@gluon.jit
def _opens(kb, q_tile_lo, BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, OPEN_ALIGN: gl.constexpr,
           CAUSAL: gl.constexpr):
    """First query tile of long column ``kb``'s full tiles (see ``attention._long_open``)."""
    if CAUSAL:
        return gl.maximum(_long_open(kb, BLOCK, OPEN_ALIGN) // BLOCK_M, q_tile_lo)
    else:
        return q_tile_lo


@gluon.jit
def _loader(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, ready, empty, kv_ready,
            b, h, kvh, row0, row1, lo, hi, q_off, BLOCK_M: gl.constexpr):
    stages: gl.constexpr = q_bufs.type.shape[0]
    mbarrier.expect(kv_ready, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    tma.async_copy_global_to_shared(k_desc, [b, row0, kvh, 0], kv_ready, k_bufs.index(0))
    tma.async_copy_global_to_shared(v_desc, [b, row0, kvh, 0], kv_ready, v_bufs.index(0))
    tma.async_copy_global_to_shared(k_desc, [b, row1, kvh, 0], kv_ready, k_bufs.index(1))
    tma.async_copy_global_to_shared(v_desc, [b, row1, kvh, 0], kv_ready, v_bufs.index(1))
    for i in range(hi - lo):
        s = i % stages
        mbarrier.wait(empty.index(s), (i // stages & 1) ^ 1)  # a fresh barrier's phase "1" is complete
        bar = ready.index(s)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        row = (lo + i) * BLOCK_M - q_off  # negative or past the end: TMA reads zeros there
        tma.async_copy_global_to_shared(q_desc, [b, row, h, 0], bar, q_bufs.index(s))
        tma.async_copy_global_to_shared(do_desc, [b, row, h, 0], bar, do_bufs.index(s))


@gluon.jit
def _compute(q_bufs, do_bufs, k_bufs, v_bufs, ready, empty, kv_ready, PART_K, PART_V, lse_ptr, delta_ptr,
             part_row, key0, len_k, len_q, q_off, lo, hi, open_lo, qk_scale,
             WG: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, ATOMIC: gl.constexpr):
    """Compute warpgroup ``WG``: dK and dV of its 64 key rows (from ``key0``) over query tiles
    ``open_lo..hi-1`` of ``lo..hi-1``, added (or stored) at row ``part_row`` of the partial sums."""
    stages: gl.constexpr = q_bufs.type.shape[0]
    dtype: gl.constexpr = q_bufs.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    zeros_s = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
    k = k_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    v = v_bufs.index(WG).reshape([ROWS, HEAD_DIM])
    offs_m = gl.arange(0, BLOCK_M, col_layout)
    n = hi - lo
    n_skip = gl.minimum(gl.maximum(open_lo - lo, 0), n)
    for i in range(n_skip):  # tiles before this warpgroup's column opens: pass the stage on
        mbarrier.wait(ready.index(i % stages), i // stages & 1)
        mbarrier.arrive(empty.index(i % stages), count=1)
    mbarrier.wait(kv_ready, 0)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, d_layout)
    for i in range(n_skip, n):
        s = i % stages
        q_row = (lo + i) * BLOCK_M + offs_m - q_off
        row_ok = (q_row >= 0) & (q_row < len_q)
        lse = gl.load(lse_ptr + q_row, mask=row_ok, other=float("inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = gl.load(delta_ptr + q_row, mask=row_ok, other=0.0)
        mbarrier.wait(ready.index(s), i // stages & 1)
        q = q_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        do = do_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        st = warpgroup_mma(k, q.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v, do.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
        pt = gl.exp2(st * qk_scale - lse2[None, :])
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        dst = pt * (dpt - delta[None, :])
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), a_layout), q, dk, is_async=True)
        # waiting here, not after the next tile's first products: releasing the stage a tile later starved
        # the loader (H100, 128k: long pass 41-42 ms against 34-35)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
        mbarrier.arrive(empty.index(s), count=1)
    offs_r = gl.arange(0, ROWS, gl.SliceLayout(1, d_layout))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, d_layout))
    ok = ((key0 + offs_r) < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = (part_row + offs_r).to(gl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    if ATOMIC:
        if n_skip < n:
            gl.atomic_add(PART_K + ptrs, dk, mask=ok, sem="relaxed")
            gl.atomic_add(PART_V + ptrs, dv, mask=ok, sem="relaxed")
    else:  # every row once, zeros included (a column with no full tile here still reads its sums)
        gl.store(PART_K + ptrs, dk, mask=ok)
        gl.store(PART_V + ptrs, dv, mask=ok)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])  # worker partitions take values, not Python ints
def _attn_bwd_dkdv_long_ws(
    q_desc, do_desc, k_desc, v_desc, LSE, DELTA, PART_K, PART_V, ORDER,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_per_kv, n_heads, qk_scale, chunk, n_splits, part_cols,
    local, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous,
    BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, COLS: gl.constexpr, HEAD_DIM: gl.constexpr,
    CAUSAL: gl.constexpr, ATOMIC: gl.constexpr, OPEN_ALIGN: gl.constexpr, STAGES: gl.constexpr,
):
    """Program ``slot rank x heads + head``: the ``split``-th chunk of query tiles of one 128-key tile
    (``COLS`` columns of ``BLOCK >= 64`` keys, or half a 128-key block) of one head, as in the Triton
    long pass; batch ``program_id(2)``."""
    h = gl.program_id(0) % n_heads
    slot = gl.load(ORDER + gl.program_id(0) // n_heads)
    tile = slot // n_splits
    split = slot % n_splits
    b = gl.program_id(2)
    len_q = seqlen_q
    len_k = seqlen_k
    TILE_ROWS: gl.constexpr = 2 * ROWS
    COL_ROWS: gl.constexpr = TILE_ROWS // COLS  # rows of one column in the tile
    NSUB: gl.constexpr = BLOCK // COL_ROWS
    group = tile // NSUB
    shift, dense = _head_rule(h, stride, step, offset, heads_per_group, head_base, sparse_groups, homogeneous)
    first = _first_congruent(0, stride, shift)
    # the two warpgroups' columns and first rows
    c0 = group * COLS
    c1 = group * COLS + ROWS // COL_ROWS
    kb0 = gl.where(dense, c0, first + c0 * stride)
    kb1 = gl.where(dense, c1, first + c1 * stride)
    in0 = (tile % NSUB) * COL_ROWS
    in1 = (tile % NSUB) * COL_ROWS + ROWS % COL_ROWS
    if kb0 * BLOCK < len_k:
        q_off = len_k - len_q
        q_tile_lo = q_off // BLOCK_M
        q_tile_hi = (len_k - 1) // BLOCK_M
        open0 = _opens(kb0, q_tile_lo, BLOCK, BLOCK_M, OPEN_ALIGN, CAUSAL)
        open1 = _opens(kb1, q_tile_lo, BLOCK, BLOCK_M, OPEN_ALIGN, CAUSAL)
        lo = gl.minimum(open0, open1) + split * chunk
        hi = gl.minimum(lo + chunk, q_tile_hi + 1)
        if kb1 * BLOCK >= len_k:
            open1 = hi  # no second column: its warpgroup only keeps the ring turning
        kvh = h // heads_per_kv
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        mbarrier.init(kv_ready, count=1)
        lse_ptr = LSE + b * stride_lb + h * stride_lh
        delta_ptr = DELTA + b * stride_lb + h * stride_lh
        base = b * part_cols
        part0 = ((base + c0).to(gl.int64) * n_heads + h) * BLOCK + in0
        part1 = ((base + c1).to(gl.int64) * n_heads + h) * BLOCK + in1
        key0 = kb0 * BLOCK + in0
        key1 = kb1 * BLOCK + in1
        gl.warp_specialize([
            (_compute, (q_bufs, do_bufs, k_bufs, v_bufs, ready, empty, kv_ready, PART_K, PART_V, lse_ptr, delta_ptr,
                        part0, key0, len_k, len_q, q_off, lo, hi, open0, qk_scale, 0, BLOCK_M, HEAD_DIM, ATOMIC)),
            (_compute, (q_bufs, do_bufs, k_bufs, v_bufs, ready, empty, kv_ready, PART_K, PART_V, lse_ptr, delta_ptr,
                        part1, key1, len_k, len_q, q_off, lo, hi, open1, qk_scale, 1, BLOCK_M, HEAD_DIM, ATOMIC)),
            (_loader, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, ready, empty, kv_ready,
                       b, h, kvh, key0, key1, lo, hi, q_off, BLOCK_M)),
        ], [4, 1], [240, 24])
