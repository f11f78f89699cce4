"""Launchers for the attention kernels: tile choices, grids, strides. Plain tensors and ints only.

Tensors arrive as 4-D ``(batch, seq, heads, head_dim)`` *views* (any strides, unit stride on
``head_dim``); packed varlen input is a ``(1, total, heads, head_dim)`` view with ``cu_seqlens``.
``rule`` is the 9 ints ``(local, stride, step, offset, heads_per_group, head_base, sparse_groups,
homogeneous, pattern_heads)``; with ``rows``/``cols`` tables given (CSR ``(ptr, index, bits)``),
the table path is used and only ``pattern_heads`` of ``rule`` matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .attention import LOG2E, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd

POISON_OUTPUTS = False  # tests set this: outputs start as NaN so an unwritten element fails
TABLE_BLOCK_M = 64  # query tile of every kernel on the table path (the tables are built for it)
DKDV_CHUNK = 8  # fewest query tiles per dK/dV program on a long column (load balance vs atomics)
DKDV_SPLITS = 4  # aim to cut the longest column into about this many chunks
TILE_OVERRIDES: dict = {}  # kernel name -> Tiles, for tuning runs (benchmarks/profile_bwd.py)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pairs: bool = False  # forward / dQ: unmasked key blocks two at a time (when block_n == pattern block)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tiles(kernel: str, block: int, head_dim: int, table: bool, itemsize: int = 2) -> Tiles:
    """Tile shapes per kernel. Keys are read in tiles of ``min(block, 64)`` so a small pattern block
    wastes nothing; queries in tiles of 64–128 so small pattern blocks merge (Merge-Q). Rows wider
    than 512 bytes (fp32 at head_dim 256) take 32-key tiles, unpipelined, to fit shared memory."""
    if kernel in TILE_OVERRIDES:
        return TILE_OVERRIDES[kernel]
    row_bytes = head_dim * itemsize
    if row_bytes > 512:
        return Tiles(TABLE_BLOCK_M if table else 32, min(block, 32), 4, 1)
    block_n = min(block, 64)
    wide = head_dim > 128
    if table:
        block_m = TABLE_BLOCK_M
    elif kernel == "dkdv":  # dK, dV accumulators stay in registers: short query tiles (H100: 73 -> 51 ms)
        block_m = 32
    else:
        block_m = 64 if (wide or block < 64) else 128
    warps = 8 if block_m * max(head_dim, 64) >= 128 * 128 else 4
    stages = 2 if (wide or (kernel == "dq" and block_m == 128)) else 3
    return Tiles(block_m, block_n, warps, stages)


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


def _seq_args(q, k, cu_q, cu_k):
    varlen = cu_q is not None
    if varlen:
        return True, cu_q.shape[0] - 1, cu_q, cu_k
    dummy = q.new_zeros(1, dtype=torch.int32)
    return False, q.shape[0], dummy, dummy


def _table_args(table, device):
    if table is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return False, (dummy, dummy, dummy)
    return True, table


def forward(q, k, v, *, cu_q, cu_k, max_q, max_k, rule, rows, block, scale, causal):
    """Returns ``out`` (shaped and strided like ``q``) and ``lse`` fp32 ``(batch, heads, seq)``
    (``(heads, total)`` when varlen)."""
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    heads, head_dim = q.shape[2], q.shape[3]
    use_table, table = _table_args(rows, q.device)
    t = tiles("fwd", block, head_dim, use_table, q.element_size())
    out = _new_like(q)
    lse = _new_like(q, (heads, q.shape[1]) if varlen else (batch, heads, q.shape[1]), torch.float32)
    n_tiles = triton.cdiv(max_k, t.block_m)
    grid = (triton.cdiv(max_q, t.block_m) + 1, heads, batch)
    _attn_fwd[grid](
        q, k, v, out, lse, cu_q, cu_k, *table,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        max_q, max_k, heads // k.shape[2], n_tiles, scale * LOG2E, *rule,
        BLOCK=block, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=causal, TABLE=use_table, VARLEN=varlen,
        UPCAST=_upcast(q.dtype), PAIRS=t.pairs, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, lse


def backward(do, q, k, v, out, lse, dlse, *, cu_q, cu_k, max_q, max_k, rule, rows, cols, block, scale, causal,
             has_dense, deterministic):
    """Gradients ``(dq, dk, dv)`` of :func:`forward`; ``dlse`` (or None) is the gradient of ``lse``."""
    varlen, batch, cu_q, cu_k = _seq_args(q, k, cu_q, cu_k)
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    use_table, row_table = _table_args(rows, q.device)
    _, col_table = _table_args(cols, q.device)
    common = dict(BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=causal,
                  TABLE=use_table, VARLEN=varlen, UPCAST=_upcast(q.dtype))
    lse_strides = _lse_strides(lse, varlen)
    delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel

    t = tiles("dq", block, head_dim, use_table, q.element_size())
    dq = _new_like(q)
    _attn_bwd_dq[(triton.cdiv(max_q, t.block_m) + 1, heads, batch)](
        q, k, v, out, do, dq, lse, lse if dlse is None else dlse.contiguous(), delta, cu_q, cu_k, *row_table,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_strides(do, varlen), *_strides(dq, varlen), *lse_strides,
        max_q, max_k, heads // kv_heads, triton.cdiv(max_k, t.block_m), scale * LOG2E, scale, *rule,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, PAIRS=t.pairs, HAS_DLSE=dlse is not None,
        num_warps=t.num_warps, num_stages=t.num_stages, **common,
    )

    t = tiles("dkdv", block, head_dim, use_table, q.element_size())
    q_tiles = triton.cdiv(max_q, t.block_m) + 1
    n_kb = triton.cdiv(max_k, block)
    # a column holds at most q_tiles query tiles: the split count follows from the shapes (no sync)
    chunk = 1 << 30 if deterministic else max(DKDV_CHUNK, triton.cdiv(q_tiles, DKDV_SPLITS))
    splits = triton.cdiv(q_tiles, chunk)
    table_splits, rule_splits = (splits, 1) if use_table else (1, splits)
    # split columns add up in fp32: phase 0 stores the base (or, with split tables, adds onto zeros)
    if table_splits > 1:
        dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (k, v))
    else:
        acc = torch.float32 if rule_splits > 1 else k.dtype
        dk, dv = _new_like(k, k.shape, acc), _new_like(v, v.shape, acc)
    args = (q, k, v, do, dk, dv, lse, delta, cu_q, cu_k, *col_table,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *lse_strides,
            max_q, max_k, heads // kv_heads, n_kb, scale * LOG2E, scale, chunk)
    meta = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, ATOMIC=table_splits > 1, num_warps=t.num_warps,
                num_stages=t.num_stages, **common)
    n_key_tiles = triton.cdiv(max_k, t.block_n)
    _attn_bwd_dkdv[(n_key_tiles, kv_heads * table_splits, batch)](*args, table_splits, *rule, PHASE=0, **meta)
    if rule_splits > 1:
        stride = rule[1]
        long_cols = n_kb if has_dense else triton.cdiv(n_kb, stride)
        grid = (long_cols * (block // t.block_n), heads * (rule_splits - 1), batch)
        _attn_bwd_dkdv[grid](*args, rule_splits, *rule, PHASE=1, **meta)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
