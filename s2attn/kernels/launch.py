"""Launchers for the attention kernels: grids, strides, descriptors; which kernels and tiles is the
:class:`~.plan.LaunchPlan` that :func:`.plan.make_plan` builds per call. Plain tensors and ints only.

Tensors arrive as 4-D ``(batch, seq, heads, head_dim)`` *views* (any strides, unit stride on
``head_dim``); packed varlen input is a ``(1, total, heads, head_dim)`` view with ``cu_seqlens``.
``rule`` is a :class:`.rule.KernelRule` (or its nine ints, as the custom ops pass it), handed to the
kernels field by field, by name; with ``rows``/``cols`` tables given (CSR ``(ptr, index, bits)``),
the table path is used and only ``pattern_heads`` of ``rule`` matters. ``remap`` (a :class:`Remap`, rule path
only, no packed sequences): the keys are packed, and the rule applies through their block map
(``s2attn.remap``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton

from .attention import _attn_bwd_dkdv, _attn_bwd_dkdv_long, _attn_bwd_dq, _attn_fwd
from .plan import GluonDescriptor, LaunchPlan, TensorDescriptor, gl, interpreting, make_plan, tma_strides
from .rule import LOG2E, KernelRule

if GluonDescriptor is not None:
    from .hopper import _attn_bwd_dkdv_long_ws, _attn_bwd_dq_ws, _attn_fwd_ws

WS_MAXNREG = 168  # registers a thread of the warp-specialised kernels (the workers' are set at their launch)


def _new_like(x: torch.Tensor, shape=None, dtype=None, *, poison: bool = False) -> torch.Tensor:
    """An output buffer; ``poison`` (tests): filled with NaN, so an element no kernel writes shows."""
    out = torch.empty_like(x, dtype=dtype) if shape is None else torch.empty(shape, dtype=dtype, device=x.device)
    return out.fill_(float("nan")) if poison else out


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    b, s, h, _ = x.stride()
    return (0 if varlen else b), s, h


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if varlen:  # (heads, total)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride()


@functools.lru_cache
def _placeholder(device: torch.device) -> torch.Tensor:
    """An int32 tensor for pointer arguments a launch does not read (made once per device)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _tma_pair(a: torch.Tensor, b: torch.Tensor, rows: int, block_d: int) -> tuple:
    """TMA descriptors of ``a`` and ``b`` ``(batch, seq, heads, dim)`` in tiles of ``rows`` rows of one head (the
    plan checked that TMA can address them)."""
    return tuple(TensorDescriptor(x, list(x.shape), tma_strides(x), [1, rows, 1, block_d]) for x in (a, b))


@functools.lru_cache(maxsize=64)
def _long_order(n_tiles: int, n_sub: int, splits: int, chunk: int, col_blocks: int, block: int, block_m: int,
                open_align: int, q_tiles: int, q_tile_lo: int | None, causal: bool, heads: int,
                device: torch.device) -> torch.Tensor:
    """The long pass's programs, each ``(tile * splits + split) * heads + head``: one key tile's share of the
    query tiles ``q_tile_lo + split * chunk`` onwards (``chunk`` of them) for one head.

    Programs that run side by side should read the same Q and dO tiles, so that the L2 cache serves them
    (launched head after head, a split of every head at a time, they streamed different heads' queries: H100,
    64k keys, L2 hits 10%, DRAM 50% busy). So: split by split, the last queries (the most work) first; in a
    split, head by head; in a head, the most work first, so each split ends on short programs. A causal column
    opens past its own block: a late key tile has nothing to do in an early split. The work is estimated with
    no head shift (columns ``col_blocks`` apart), an upper bound (a shift only moves columns later), so slots
    it finds empty are left out, unless the first query tile is not known (``q_tile_lo`` None: packed
    sequences, each with its own) or there is one split (it stores every column's sums, zeros included)."""
    lo = q_tile_lo or 0

    def work(tile: int, split: int) -> int:
        first_kb = tile // n_sub * col_blocks
        opens = -(-(first_kb + 1) * block // open_align) * open_align // block_m if causal else 0
        return max(0, min(lo + (split + 1) * chunk, q_tiles) - max(lo + split * chunk, opens))

    codes = []
    for split in reversed(range(splits)):
        todo = [t for t in range(n_tiles) if q_tile_lo is None or splits == 1 or work(t, split) > 0]
        todo.sort(key=lambda t: -work(t, split))
        codes += [(t * splits + split) * heads + h for h in range(heads) for t in todo]
    return torch.tensor(codes, dtype=torch.int32, device=device)


def _gluon_descriptors(rows: int, *xs: torch.Tensor) -> list:
    """Gluon TMA descriptors of 16-bit ``(batch, seq, heads, dim)`` tensors in tiles of ``rows`` rows of one head
    (where they apply: :func:`.plan.warp_specialised_blocker`)."""
    descs = []
    for x in xs:
        tile = [1, rows, 1, x.shape[-1]]
        layout = gl.NVMMASharedLayout.get_default_for(tile, gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16)
        descs.append(GluonDescriptor(x, list(x.shape), tma_strides(x), tile, layout))
    return descs


def _hopper_descriptors(q, k, v, do, block: int) -> list:
    """TMA descriptors ``(q, do, k, v)`` for the warp-specialised backward kernels: 64 rows a tile; k and v in tiles
    of a block under 64."""
    return _gluon_descriptors(64, q, do) + _gluon_descriptors(min(block, 64), k, v)


def _tma_rows(x: torch.Tensor, lead: int, copy: bool = True) -> torch.Tensor:
    """``x``, fp32 ``(batch, heads, seq)``, or with ``copy=False`` an empty tensor strided the same way, whose rows
    TMA can read in tiles starting ``lead`` entries before a multiple of 4 (TMA starts a tile on a 16-byte
    boundary: H100, an illegal instruction otherwise): rows 16 bytes apart and entry ``-lead`` of each aligned.
    ``x`` itself where that holds, else a buffer with ``lead`` zeros before each row, padded to a multiple of 4."""
    n = x.shape[-1]
    if lead == 0 and x.is_contiguous() and n % 4 == 0 and x.data_ptr() % 16 == 0:
        return x if copy else torch.empty_like(x)
    buf = torch.empty(*x.shape[:-1], -(-(lead + n) // 4) * 4, dtype=torch.float32, device=x.device)
    buf[..., :lead] = 0
    rows = buf[..., lead:lead + n]
    return rows.copy_(x) if copy else rows


def _row_descriptors(lead: int, *xs: torch.Tensor) -> list:
    """Gluon TMA descriptors of ``(batch, heads, seq)`` fp32 tensors from :func:`_tma_rows`, as ``(batch x heads,
    lead + seq)`` from ``lead`` entries before each row, in tiles of one row's 64 entries (past the end: 0)."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    descs = []
    for x in xs:
        shape = [x.shape[0] * x.shape[1], lead + x.shape[2]]
        rows = torch.as_strided(x, shape, [x.stride(1), 1], x.storage_offset() - lead)
        descs.append(GluonDescriptor(rows, shape, [x.stride(1), 1], [1, 64], layout))
    return descs


class Remap(NamedTuple):
    """Packed keys (``s2attn.remap``): ``key_map`` int32 ``(kv_heads, n_packed)`` on the device, packed -> absolute
    key block (-1: padding, first); absolute query block = packed + ``q_shift``; packed blocks from ``own_first`` on
    are the queries' own (absolute = packed + ``q_shift``), the ones before them outside blocks."""

    key_map: torch.Tensor
    q_shift: int
    own_first: int


def _remap_args(remap: Optional[Remap], device, own_first: bool = True) -> dict:
    """The kernels' ``KEY_MAP, stride_map, q_shift, own_first`` by name (placeholders without a remap)."""
    if remap is None:
        args = dict(KEY_MAP=_placeholder(device), stride_map=0, q_shift=0, own_first=0)
    else:
        args = dict(KEY_MAP=remap.key_map, stride_map=remap.key_map.stride(0), q_shift=remap.q_shift,
                    own_first=remap.own_first)
    if not own_first:
        del args["own_first"]
    return args


def _seq_args(q, k, cu_q, cu_k):
    varlen = cu_q is not None
    if varlen:
        return True, cu_q.shape[0] - 1, cu_q, cu_k
    return False, q.shape[0], _placeholder(q.device), _placeholder(q.device)


def _table_args(table, device):
    if table is None:
        return False, (_placeholder(device),) * 3
    return True, table


def forward(q, k, v, *, cu_q, cu_k, max_q, max_k, rule, rows, block, scale, causal, remap: Optional[Remap] = None):
    """Returns ``out`` (shaped and strided like ``q``) and ``lse`` fp32 ``(batch, heads, seq)``
    (``(heads, total)`` when varlen)."""
    rule = KernelRule(*rule)
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    heads, head_dim = q.shape[2], q.shape[3]
    use_table, table = _table_args(rows, q.device)
    plan = make_plan("forward", q, k, v, block=block, max_q=max_q, max_k=max_k, varlen=varlen, table=use_table,
                     remap=remap is not None)
    t = plan.fwd.tiles
    out = _new_like(q, poison=plan.poison)
    lse = _new_like(q, (heads, q.shape[1]) if varlen else (batch, heads, q.shape[1]), torch.float32,
                    poison=plan.poison)
    grid = (triton.cdiv(max_q, t.block_m) + 1, heads, batch)
    if plan.fwd.warp_specialised:  # K and V in TMA tiles of a block, up to a whole key tile
        _attn_fwd_ws[grid](
            *_gluon_descriptors(64, q), *_gluon_descriptors(min(block, t.block_n), k, v), *_gluon_descriptors(64, out),
            out, *out.stride()[:3], lse, *lse.stride()[:2], max_q, max_k, heads // k.shape[2], scale * LOG2E,
            **rule.closed_form(), BLOCK=block, BLOCK_N=t.block_n, HEAD_DIM=head_dim, CAUSAL=causal,
            STAGES=t.num_stages,
            PINGPONG=plan.fwd.pingpong, num_warps=t.num_warps, maxnreg=WS_MAXNREG,
        )
        return out, lse
    n_tiles = triton.cdiv(max_k, t.block_m)
    block_d = triton.next_power_of_2(head_dim)
    descs = _tma_pair(k, v, t.block_n, block_d) if plan.fwd.tma else (k, v)
    _attn_fwd[grid](
        q, k, v, out, lse, cu_q, cu_k, *table, *descs,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        max_q, max_k, heads // k.shape[2], n_tiles, scale * LOG2E, **rule._asdict(),
        **_remap_args(remap, q.device), BLOCK=block, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CAUSAL=causal, TABLE=use_table, VARLEN=varlen,
        UPCAST=_upcast(q.dtype), PAIRS=t.pairs, TMA=plan.fwd.tma, REMAP=remap is not None, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out, lse


class _Backward(NamedTuple):
    """What the backward's launches share."""

    do: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    table: bool
    row_table: tuple
    col_table: tuple
    rule: KernelRule
    plan: LaunchPlan
    hopper: Optional[list]  # the warp-specialised kernels' descriptors, where one runs
    varlen: bool
    batch: int
    max_q: int
    max_k: int
    block: int
    scale: float
    causal: bool
    remap: Optional[Remap]

    @property
    def block_d(self) -> int:
        return triton.next_power_of_2(self.q.shape[3])

    def common(self) -> dict:
        return dict(BLOCK=self.block, HEAD_DIM=self.q.shape[3], BLOCK_D=self.block_d, CAUSAL=self.causal,
                    VARLEN=self.varlen, UPCAST=_upcast(self.q.dtype))

    def strides(self, *xs: torch.Tensor) -> list[int]:
        return [s for x in xs for s in _strides(x, self.varlen)]


def backward(do, q, k, v, out, lse, dlse, *, cu_q, cu_k, max_q, max_k, rule, rows, cols, block, scale, causal,
             has_dense, deterministic, remap: Optional[Remap] = None):
    """Gradients ``(dq, dk, dv)`` of :func:`forward`; ``dlse`` (or None) is the gradient of ``lse``. The plan,
    then dQ (and delta), the long columns' pass (rule path) and dK/dV."""
    rule = KernelRule(*rule)
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    use_table, row_table = _table_args(rows, q.device)
    _, col_table = _table_args(cols, q.device)
    plan = make_plan("backward", q, k, v, do=do, lse=lse, block=block, max_q=max_q, max_k=max_k, varlen=varlen,
                     table=use_table, deterministic=deterministic, remap=remap is not None)
    ws_long = plan.dkdv_long is not None and plan.dkdv_long.warp_specialised
    hopper = _hopper_descriptors(q, k, v, do, block) if ws_long or plan.dq.warp_specialised else None
    a = _Backward(do, q, k, v, out, cu_q, cu_k, use_table, row_table, col_table, rule, plan, hopper, varlen, batch,
                  max_q, max_k, block, scale, causal, remap)
    lead = (max_k - max_q) % 4  # the long pass's lse / delta tiles start this many entries before a row
    if ws_long:  # the Gluon long pass reads lse and delta rows through TMA; dQ reads dlse with lse's strides
        lse = _tma_rows(lse, lead)
        dlse = None if dlse is None else _tma_rows(dlse, lead)
        delta = _tma_rows(lse, lead, copy=False)
    else:
        dlse = None if dlse is None else dlse.contiguous()
        delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
    dq = _run_dq(a, lse, lse if dlse is None else dlse, delta)
    part_stride = 1 if has_dense else rule.stride  # long columns (rule path): every block of a dense head
    if use_table or remap is not None:  # no long pass: the PART pointers are not read
        parts = row_table[:2] if use_table else (_placeholder(q.device),) * 2
    else:
        parts = _run_long(a, lse, delta, lead, part_stride)
    dk, dv = _run_dkdv(a, lse, delta, parts, part_stride)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _run_dq(a: _Backward, lse, dlse, delta) -> torch.Tensor:
    """dQ, and delta = rowsum(dO * O) - dlse for the dK/dV kernels (``dlse`` is ``lse`` where there is none)."""
    heads, kv_heads, head_dim = a.q.shape[2], a.k.shape[2], a.q.shape[3]
    lse_strides = _lse_strides(lse, a.varlen)
    dq = _new_like(a.q, poison=a.plan.poison)
    launch, t = a.plan.dq, a.plan.dq.tiles
    grid = (triton.cdiv(a.max_q, t.block_m) + 1, heads, a.batch)
    if launch.warp_specialised:
        _attn_bwd_dq_ws[grid](
            *a.hopper, a.out, a.do, dq, lse, dlse, delta, *a.strides(a.out, a.do, dq), *lse_strides[:2],
            a.max_q, a.max_k, heads // kv_heads, a.scale * LOG2E, a.scale, **a.rule.closed_form(),
            BLOCK=a.block, HEAD_DIM=head_dim, CAUSAL=a.causal, HAS_DLSE=dlse is not lse, STAGES=t.num_stages,
            num_warps=t.num_warps, maxnreg=WS_MAXNREG,
        )
    else:
        descs = _tma_pair(a.k, a.v, t.block_n, a.block_d) if launch.tma else (a.k, a.v)
        _attn_bwd_dq[grid](
            a.q, a.k, a.v, a.out, a.do, dq, lse, dlse, delta, a.cu_q, a.cu_k, *a.row_table, *descs,
            *a.strides(a.q, a.k, a.v, a.out, a.do, dq), *lse_strides,
            a.max_q, a.max_k, heads // kv_heads, triton.cdiv(a.max_k, t.block_m), a.scale * LOG2E, a.scale,
            **a.rule._asdict(), **_remap_args(a.remap, a.q.device), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            TABLE=a.table, PAIRS=t.pairs,
            HAS_DLSE=dlse is not lse, TMA=launch.tma, REMAP=a.remap is not None, num_warps=t.num_warps,
            num_stages=t.num_stages, **a.common(),
        )
    return dq


def _run_long(a: _Backward, lse, delta, lead: int, part_stride: int) -> list[torch.Tensor]:
    """The long columns' full query tiles (rule path), as fp32 partial sums of dK and dV per query head: one
    column in ``part_stride`` blocks (each ``stride`` blocks, or every block with dense heads)."""
    heads, kv_heads, head_dim = a.q.shape[2], a.k.shape[2], a.q.shape[3]
    launch, lt, chunk = a.plan.dkdv_long, a.plan.dkdv_long.tiles, a.plan.chunk
    part_cols = triton.cdiv(triton.cdiv(a.max_k, a.block), part_stride)
    part_rows = a.k.shape[1] // (a.block * part_stride) + 2 * a.batch if a.varlen else a.batch * part_cols
    shape = (part_rows, heads, a.block, a.block_d)
    parts = [torch.zeros(shape, dtype=torch.float32, device=a.q.device) if launch.atomic
             else _new_like(a.q, shape, torch.float32, poison=a.plan.poison) for _ in range(2)]  # atomics: on zeros
    cols = max(1, lt.block_n // a.block)
    n_sub = max(1, a.block // lt.block_n)
    order = _long_order(triton.cdiv(part_cols, cols) * n_sub, n_sub, launch.splits, chunk, cols * part_stride,
                        a.block, lt.block_m, a.plan.open_align, triton.cdiv(a.max_k, lt.block_m),
                        None if a.varlen else (a.max_k - a.max_q) // lt.block_m, a.causal, heads, a.q.device)
    grid = (order.numel(), 1, a.batch)
    scalars = (a.max_q, a.max_k, heads // kv_heads, heads, a.scale * LOG2E, chunk, launch.splits, part_cols)
    if launch.warp_specialised:
        _attn_bwd_dkdv_long_ws[grid](
            *a.hopper, *_row_descriptors(lead, lse, delta), *parts, order, *scalars, **a.rule.closed_form(),
            BLOCK=a.block, BLOCK_M=lt.block_m, COLS=cols, HEAD_DIM=head_dim, CAUSAL=a.causal, ATOMIC=launch.atomic,
            OPEN_ALIGN=a.plan.open_align, STAGES=lt.num_stages, num_warps=4, maxnreg=WS_MAXNREG,
        )
    else:
        _attn_bwd_dkdv_long[grid](
            a.q, a.k, a.v, a.do, lse, delta, *parts, order, a.cu_q, a.cu_k, *a.strides(a.q, a.k, a.v, a.do),
            *_lse_strides(lse, a.varlen), *scalars, part_stride, **a.rule.closed_form(), BLOCK_M=lt.block_m,
            BLOCK_N=lt.block_n, COLS=cols, ATOMIC=launch.atomic, OPEN_ALIGN=a.plan.open_align,
            num_warps=lt.num_warps, num_stages=lt.num_stages, **a.common(),
        )
    return parts


def _run_dkdv(a: _Backward, lse, delta, parts, part_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dK and dV of every key tile: a short column's query tiles, a long column's diagonal ones plus its partial
    sums (rule path), or a table column's entries, split across programs that add up in fp32."""
    heads, kv_heads = a.q.shape[2], a.k.shape[2]
    launch, t = a.plan.dkdv, a.plan.dkdv.tiles
    n_kb = triton.cdiv(a.max_k, a.block)
    if launch.atomic:
        dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (a.k, a.v))
    else:
        dk, dv = _new_like(a.k, poison=a.plan.poison), _new_like(a.v, poison=a.plan.poison)
    descs = _tma_pair(a.q, a.do, t.block_m, a.block_d) if launch.tma else (a.q, a.do)
    _attn_bwd_dkdv[(triton.cdiv(a.max_k, t.block_n), kv_heads * launch.splits, a.batch)](
        a.q, a.k, a.v, a.do, dk, dv, lse, delta, *parts, a.cu_q, a.cu_k, *a.col_table, *descs,
        *a.strides(a.q, a.k, a.v, a.do, dk, dv), *_lse_strides(lse, a.varlen),
        a.max_q, a.max_k, heads // kv_heads, heads, n_kb, a.scale * LOG2E, a.scale, a.plan.chunk, launch.splits,
        triton.cdiv(n_kb, part_stride), part_stride, **a.rule._asdict(),
        **_remap_args(a.remap, a.q.device, own_first=False), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        TABLE=a.table, ATOMIC=launch.atomic, OPEN_ALIGN=a.plan.open_align, TMA=launch.tma,
        REMAP=a.remap is not None, num_warps=t.num_warps,
        num_stages=t.num_stages, **a.common(),
    )
    return dk, dv
