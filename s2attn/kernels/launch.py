"""Launchers for the attention kernels: tile choices, grids, strides. Plain tensors and ints only.

Tensors arrive as 4-D ``(batch, seq, heads, head_dim)`` *views* (any strides, unit stride on
``head_dim``); packed varlen input is a ``(1, total, heads, head_dim)`` view with ``cu_seqlens``.
``rule`` is a :class:`.rule.KernelRule` (or its nine ints, as the custom ops pass it), handed to the
kernels field by field, by name; with ``rows``/``cols`` tables given (CSR ``(ptr, index, bits)``),
the table path is used and only ``pattern_heads`` of ``rule`` matters.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.3: plain loads everywhere
    TensorDescriptor = None

from .attention import _attn_bwd_dkdv, _attn_bwd_dkdv_long, _attn_bwd_dq, _attn_fwd
from .rule import LOG2E, KernelRule

try:  # the warp-specialised kernels for Hopper, in Gluon as of Triton 3.6 (its API moves between releases)
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 6):
        raise ImportError("the Gluon kernels are written for, and tested with, Triton 3.6")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .hopper import _attn_bwd_dkdv_long_ws, _attn_bwd_dq_ws
except ImportError:  # the Triton kernels everywhere
    GluonDescriptor = None

POISON_OUTPUTS = False  # tests set this: outputs start as NaN so an unwritten element fails
TABLE_BLOCK_M = 64  # query tile of every kernel on the table path (the tables are built for it)
DKDV_CHUNK = 8  # fewest query tiles per dK/dV program on a long column (load balance vs atomics)
DKDV_SPLITS = 4  # aim to cut the longest column into about this many chunks (H100, 8k-64k: 2 or 8 no better)
TILE_OVERRIDES: dict = {}  # kernel name -> Tiles, for tuning runs (benchmarks/profile_bwd.py)
USE_TMA = {"fwd": True, "dq": True, "dkdv": True}  # kernels that read tiles through TMA where they can (_descriptors)
WARP_SPECIALISED = {"dq": True, "dkdv_long": True}  # Gluon kernels on Hopper where they apply (_hopper_descriptors)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pairs: bool = False  # forward / dQ: unmasked key blocks two at a time (when block_n == pattern block)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tiles(kernel: str, block: int, head_dim: int, table: bool, itemsize: int = 2, seqlen: int = 0) -> Tiles:
    """Tile shapes per kernel. The forward and dQ read keys in tiles of ``min(block, 64)`` so a small
    pattern block wastes nothing; the dK/dV kernels set small blocks side by side in 64-key tiles
    (the long pass: 64 or 128 keys) and mask per key row; queries in tiles of 32–128, so small pattern
    blocks merge (Merge-Q). Rows wider than 512 bytes (fp32 at head_dim 256) take 32-key tiles,
    unpipelined, to fit shared memory. The two dK/dV kernels may take different query tiles: a long
    column's full tiles start at a multiple of both (``OPEN_ALIGN``). ``seqlen`` is the number of keys."""
    if kernel in TILE_OVERRIDES:
        return TILE_OVERRIDES[kernel]
    row_bytes = head_dim * itemsize
    if row_bytes > 512:
        return Tiles(TABLE_BLOCK_M if table else 32, min(block, 32), 4, 1)
    if kernel == "fwd" and not table and row_bytes <= 256 and block >= 64:
        # 64-query tiles, keys through TMA three deep, two programs per SM (H100, 32k: 2.12 -> 1.65 ms, 128k:
        # 20.3 -> 18.5 against 128-query tiles reading key blocks in pairs with plain loads)
        return Tiles(64, 64, 4, 3)
    if kernel == "dq" and not table and row_bytes <= 256 and block >= 64:
        if seqlen <= 32768:
            # 64-query tiles in <= 96 KiB of shared memory, two programs per SM (H100: 8k 0.40 -> 0.34 ms,
            # 32k 2.50 -> 2.19 ms)
            return Tiles(64, 64, 4, 2)
        return Tiles(128, 64, 8, 3)  # 128-query tiles, three single blocks deep (128k: 26.1 -> 23.9 ms)
    if kernel == "dkdv_long" and row_bytes <= 256:
        # columns side by side in 128-key tiles past 8k keys, 64-key tiles up to it (H100, block 64, launched
        # most work first: 128k 40.3 vs 45.3 ms, 32k 2.42-2.53 vs 2.75-2.88, 16k 0.67 vs 0.70, 8k 0.22 vs 0.18)
        block_n = 128 if seqlen > 8192 else 64
    elif kernel == "dkdv" and not table and block < 64:
        block_n = 64  # consecutive small blocks in one key tile, each query tile loaded once for all of them
    else:
        block_n = min(block, 64)
    wide = head_dim > 128
    if table:
        block_m = TABLE_BLOCK_M
    elif kernel.startswith("dkdv"):  # dK, dV accumulators stay in registers: short query tiles (H100: 73 -> 51 ms)
        block_m = 32
    else:
        block_m = 64 if (wide or block < 64) else 128
    warps = 8 if max(block_m, block_n) * max(head_dim, 64) >= 128 * 128 else 4
    stages = 2 if (wide or (kernel == "dq" and block_m == 128)) else 3
    # blocks under 64 keys: unmasked ones two at a time (block 16, 128k: forward 29.4 -> 24.2 ms); a
    # doubled key tile of 512-byte rows (fp32 d128, bf16 d256) would not fit in shared memory
    pairs = kernel in ("fwd", "dq") and not table and row_bytes <= 256
    return Tiles(block_m, block_n, warps, stages, pairs)


def _new_like(x: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    out = torch.empty_like(x, dtype=dtype) if shape is None else torch.empty(shape, dtype=dtype, device=x.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


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


@functools.lru_cache
def _has_tma(device: torch.device) -> bool:
    """TMA descriptors: Triton 3.3+, and a Hopper or newer GPU (or the interpreter / an offline compile)."""
    return TensorDescriptor is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_strides(x: torch.Tensor):
    """The strides a TMA descriptor of ``x`` takes, or None where TMA cannot address it: an empty tensor (no
    queries), base or strides not 16-byte aligned (a view may not be)."""
    if x.numel() == 0:
        return None
    strides = list(x.stride())
    for i in range(x.dim() - 2, -1, -1):  # a size-1 dim's stride is arbitrary: give it one TMA accepts
        if x.shape[i] == 1:
            strides[i] = strides[i + 1] * x.shape[i + 1]
    if x.data_ptr() % 16 or any(s == 0 or s * x.element_size() % 16 for s in strides[:-1]):
        return None
    return strides


def _row_tiles(x: torch.Tensor, block_m: int, block_d: int):
    """A TMA descriptor of ``x`` ``(batch, seq, heads, dim)`` in tiles of ``block_m`` rows of one head, or
    None where TMA cannot read it: see :func:`_has_tma` and :func:`_tma_strides`."""
    strides = _tma_strides(x) if _has_tma(x.device) else None
    return None if strides is None else TensorDescriptor(x, list(x.shape), strides, [1, block_m, 1, block_d])


def _descriptors(kernel: str, a: torch.Tensor, b: torch.Tensor, t: Tiles, block_d: int, varlen: bool) -> tuple:
    """``a`` and ``b`` as TMA descriptors for ``kernel``'s tiles (keys for the forward and dQ, queries for
    the short-column kernel), or the tensors themselves (plain loads). Fewer registers (dQ 252 -> 186 at 32k)
    and faster on the H100: dQ 2.19 -> 2.12 ms at 32k and 23.2-23.9 -> 22.5-22.8 at 128k, short columns 1.52
    -> 1.45 and 6.4 -> 6.0-6.1. Not in a kernel that also reads key-block pairs (plain loads): the forward
    past 8k lost (32k 2.09 -> 2.25 ms, 128k 21.2 -> 23.2); nor in the long pass (128k 38.8 -> 44.8). Nor for
    packed sequences: a tile overhanging a sequence's end (or start) would read the neighbour's rows, not
    the zeros TMA gives past the tensor's, and P = 0 times a NaN there is NaN."""
    if t.pairs or varlen or not USE_TMA[kernel] or a.element_size() > 2:  # fp32: TMA tiles overflow shared memory
        return a, b
    rows = t.block_m if kernel == "dkdv" else t.block_n
    descs = (_row_tiles(a, rows, block_d), _row_tiles(b, rows, block_d))
    return (a, b) if None in descs else descs


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


# the warp-specialised kernels (Gluon, Hopper): tiles of 64 rows a warpgroup (two compute warpgroups and a loader
# warp, 12 warps in 64K registers: 240 a compute thread, 24 a loader); 2 stages (H100, 128k: 3 stages no faster,
# long pass 34.2-35.9 ms against 34.2-35.4, dQ 22.4-22.6 against 22.4-22.5)
WS_TILES = Tiles(64, 128, 12, 2)
WS_DQ_STAGES = 2
WS_DQ_FROM = 32768
WS_MAXNREG = 168


@functools.lru_cache
def _is_hopper(device: torch.device) -> bool:
    """An sm_90 GPU: ``wgmma``, which the warp-specialised kernels are written in (Blackwell has not got it)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def _hopper_descriptors(q, k, v, do, lse, block: int, varlen: bool):
    """TMA descriptors ``(q, do, k, v)`` for the warp-specialised kernels (64 rows a tile; k and v in tiles of a
    block under 64), or None where the Triton ones run instead: no Gluon of Triton 3.6, not an sm_90 GPU,
    packed sequences (a TMA tile would read the neighbour's rows), fp32, head dims other than 64 and 128, or
    tensors TMA cannot address (alignment)."""
    if not (GluonDescriptor is not None and not varlen and q.element_size() == 2 and q.shape[-1] in (64, 128)
            and lse.stride(-1) == 1 and _is_hopper(q.device)):
        return None
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs = []
    for x, rows in ((q, 64), (do, 64), (k, min(block, 64)), (v, min(block, 64))):
        strides = _tma_strides(x)
        if strides is None:
            return None
        tile = [1, rows, 1, x.shape[-1]]
        descs.append(GluonDescriptor(x, list(x.shape), strides, tile,
                                     gl.NVMMASharedLayout.get_default_for(tile, dtype)))
    return descs


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


def _seq_args(q, k, cu_q, cu_k):
    varlen = cu_q is not None
    if varlen:
        return True, cu_q.shape[0] - 1, cu_q, cu_k
    return False, q.shape[0], _placeholder(q.device), _placeholder(q.device)


def _table_args(table, device):
    if table is None:
        return False, (_placeholder(device),) * 3
    return True, table


def _column_chunks(max_q: int, block_m: int, deterministic: bool) -> tuple[int, int]:
    """Query tiles per program on one key column, and how many programs (about ``DKDV_SPLITS``): a column
    holds at most ``cdiv(max_q, block_m) + 1`` tiles, so the split follows from the shapes (no sync)."""
    q_tiles = triton.cdiv(max_q, block_m) + 1
    chunk = 1 << 30 if deterministic else max(DKDV_CHUNK, triton.cdiv(q_tiles, DKDV_SPLITS))
    return chunk, triton.cdiv(q_tiles, chunk)


def forward(q, k, v, *, cu_q, cu_k, max_q, max_k, rule, rows, block, scale, causal):
    """Returns ``out`` (shaped and strided like ``q``) and ``lse`` fp32 ``(batch, heads, seq)``
    (``(heads, total)`` when varlen)."""
    rule = KernelRule(*rule)
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    heads, head_dim = q.shape[2], q.shape[3]
    use_table, table = _table_args(rows, q.device)
    t = tiles("fwd", block, head_dim, use_table, q.element_size(), max_k)
    out = _new_like(q)
    lse = _new_like(q, (heads, q.shape[1]) if varlen else (batch, heads, q.shape[1]), torch.float32)
    n_tiles = triton.cdiv(max_k, t.block_m)
    grid = (triton.cdiv(max_q, t.block_m) + 1, heads, batch)
    block_d = triton.next_power_of_2(head_dim)
    descs = _descriptors("fwd", k, v, t, block_d, varlen)
    _attn_fwd[grid](
        q, k, v, out, lse, cu_q, cu_k, *table, *descs,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        max_q, max_k, heads // k.shape[2], n_tiles, scale * LOG2E, **rule._asdict(),
        BLOCK=block, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CAUSAL=causal, TABLE=use_table, VARLEN=varlen,
        UPCAST=_upcast(q.dtype), PAIRS=t.pairs, TMA=descs[0] is not k, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out, lse


def backward(do, q, k, v, out, lse, dlse, *, cu_q, cu_k, max_q, max_k, rule, rows, cols, block, scale, causal,
             has_dense, deterministic):
    """Gradients ``(dq, dk, dv)`` of :func:`forward`; ``dlse`` (or None) is the gradient of ``lse``."""
    rule = KernelRule(*rule)
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    use_table, row_table = _table_args(rows, q.device)
    _, col_table = _table_args(cols, q.device)
    block_d = triton.next_power_of_2(head_dim)
    common = dict(BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen,
                  UPCAST=_upcast(q.dtype))
    hopper = None if use_table else _hopper_descriptors(q, k, v, do, lse, block, varlen)
    ws_long = hopper is not None and WARP_SPECIALISED["dkdv_long"]
    lead = (max_k - max_q) % 4  # the long pass's lse / delta tiles start this many entries before a row
    if ws_long:  # the Gluon long pass reads lse and delta rows through TMA; dQ reads dlse with lse's strides
        lse = _tma_rows(lse, lead)
        dlse = None if dlse is None else _tma_rows(dlse, lead)
        delta = _tma_rows(lse, lead, copy=False)
    else:
        dlse = None if dlse is None else dlse.contiguous()
        delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
    lse_strides = _lse_strides(lse, varlen)
    dq = _new_like(q)
    dlse = lse if dlse is None else dlse
    if hopper and WARP_SPECIALISED["dq"] and max_k > WS_DQ_FROM and block >= 64:
        _attn_bwd_dq_ws[(triton.cdiv(max_q, 128) + 1, heads, batch)](
            *hopper, out, do, dq, lse, dlse, delta, *_strides(out, varlen), *_strides(do, varlen),
            *_strides(dq, varlen), *lse_strides[:2], max_q, max_k, heads // kv_heads, scale * LOG2E, scale,
            **rule.closed_form(),
            BLOCK=block, HEAD_DIM=head_dim, CAUSAL=causal, HAS_DLSE=dlse is not lse, STAGES=WS_DQ_STAGES,
            num_warps=4, maxnreg=WS_MAXNREG,
        )
    else:
        t = tiles("dq", block, head_dim, use_table, q.element_size(), max_k)
        descs = _descriptors("dq", k, v, t, block_d, varlen)
        _attn_bwd_dq[(triton.cdiv(max_q, t.block_m) + 1, heads, batch)](
            q, k, v, out, do, dq, lse, dlse, delta, cu_q, cu_k, *row_table, *descs,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_strides(do, varlen), *_strides(dq, varlen), *lse_strides,
            max_q, max_k, heads // kv_heads, triton.cdiv(max_k, t.block_m), scale * LOG2E, scale, **rule._asdict(),
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, TABLE=use_table, PAIRS=t.pairs, HAS_DLSE=dlse is not lse,
            TMA=descs[0] is not k, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        )

    t = tiles("dkdv", block, head_dim, use_table, q.element_size())
    n_kb = triton.cdiv(max_k, block)
    seq = (q, k, v, do)
    strides = [s for x in seq for s in _strides(x, varlen)]
    # long columns (rule path): their full query tiles first, as fp32 partial sums per query head
    part_stride = 1 if has_dense else rule.stride
    part_cols = triton.cdiv(n_kb, part_stride)
    if use_table:  # table columns are split across programs instead
        chunk, table_splits = _column_chunks(max_q, t.block_m, deterministic)
        parts, open_align = row_table[:2], t.block_m
    else:
        table_splits = 1
        lt = WS_TILES if ws_long else tiles("dkdv_long", block, head_dim, False, q.element_size(), max_k)
        open_align = max(lt.block_m, t.block_m)  # where a long column's two passes meet (powers of two)
        chunk, splits = _column_chunks(max_q, lt.block_m, deterministic)
        part_rows = k.shape[1] // (block * part_stride) + 2 * batch if varlen else batch * part_cols
        shape = (part_rows, heads, block, block_d)
        parts = [torch.zeros(shape, dtype=torch.float32, device=q.device) if splits > 1
                 else _new_like(q, shape, torch.float32) for _ in range(2)]  # atomics add onto zeros
        cols = max(1, lt.block_n // block)
        n_sub = max(1, block // lt.block_n)
        order = _long_order(triton.cdiv(part_cols, cols) * n_sub, n_sub, splits, chunk, cols * part_stride, block,
                            lt.block_m, open_align, triton.cdiv(max_k, lt.block_m),
                            None if varlen else (max_k - max_q) // lt.block_m, causal, heads, q.device)
        grid = (order.numel(), 1, batch)
        scalars = (max_q, max_k, heads // kv_heads, heads, scale * LOG2E, chunk, splits, part_cols)
        if ws_long:
            _attn_bwd_dkdv_long_ws[grid](
                *hopper, *_row_descriptors(lead, lse, delta), *parts, order, *scalars, **rule.closed_form(), BLOCK=block,
                BLOCK_M=lt.block_m, COLS=cols, HEAD_DIM=head_dim, CAUSAL=causal, ATOMIC=splits > 1,
                OPEN_ALIGN=open_align, STAGES=lt.num_stages, num_warps=4, maxnreg=WS_MAXNREG,
            )
        else:
            _attn_bwd_dkdv_long[grid](
                *seq, lse, delta, *parts, order, cu_q, cu_k, *strides, *lse_strides, *scalars, part_stride, **rule.closed_form(),
                BLOCK_M=lt.block_m, BLOCK_N=lt.block_n, COLS=cols, ATOMIC=splits > 1, OPEN_ALIGN=open_align,
                num_warps=lt.num_warps, num_stages=lt.num_stages, **common,
            )
    atomic = table_splits > 1  # split table columns add up in fp32
    if atomic:
        dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (k, v))
    else:
        dk, dv = _new_like(k), _new_like(v)
    descs = _descriptors("dkdv", q, do, t, block_d, varlen)
    _attn_bwd_dkdv[(triton.cdiv(max_k, t.block_n), kv_heads * table_splits, batch)](
        *seq, dk, dv, lse, delta, *parts, cu_q, cu_k, *col_table, *descs,
        *strides, *_strides(dk, varlen), *_strides(dv, varlen), *lse_strides,
        max_q, max_k, heads // kv_heads, heads, n_kb, scale * LOG2E, scale, chunk, table_splits, part_cols,
        part_stride, **rule._asdict(), BLOCK_M=t.block_m, BLOCK_N=t.block_n, TABLE=use_table, ATOMIC=atomic,
        OPEN_ALIGN=open_align, TMA=descs[0] is not q, num_warps=t.num_warps, num_stages=t.num_stages, **common,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
