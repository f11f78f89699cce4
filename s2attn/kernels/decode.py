"""Triton decode attention over a per-head paged KV cache.

One new query token per sequence. A program owns (sequence, kv head, split): the query
heads of that kv group form the M dimension of ``tl.dot`` (padded to 16), so each K/V
page is read from memory once for the whole group. The key blocks a token reads are
enumerated in one of two ways, chosen by the ``RULE`` switch:

* ``RULE=True`` (local-stride patterns): in closed form from the sequence length — the
  vertical blocks ``first + t * stride`` below the local window, then the window itself —
  so the step needs no host work and no index tables;
* ``RULE=False`` (explicit block masks): every logical block up to the query's, skipping
  absent pages (page id -1) without reading them, and applying the mask row of each
  query head, which is exact even when the heads of one group read different blocks.

Split-KV: the block list of one (sequence, kv head) is cut into ``num_splits`` contiguous
pieces that run as separate programs, each writing a partial (normalised output, lse);
a second small kernel merges them, so a single long sequence still fills the GPU.
Everything the kernels need arrives as plain tensors and integers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .plan import interpreting
from .rule import LOG2E


@triton.jit
def _attend_piece(q, K, V, kpos, n, present, row_ok, rows, offs_d, d_ok, stride_kn, scale_log2, m_i, l_i, acc,
                  RULE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the keys at positions ``kpos``, rows ``rows`` of one page (``K`` / ``V`` at the page).
    Absent pages are never read (masked loads issue no memory traffic); the token mask is causality inside
    the query's own block."""
    n_ok = (kpos < n) & present
    kv_off = rows[:, None] * stride_kn + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    allowed = n_ok[None, :]
    if not RULE:  # the mask rows of the group's query heads
        allowed = allowed & row_ok[:, None]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, PAGE_TABLE, SEQ_LENS, SLOTS, FIRST, DENSE, BLOCK_MASK, OUT, LSE,
    stride_qb, stride_qh,
    stride_kp, stride_kn, stride_kh,
    stride_ts, stride_th,
    stride_mh, stride_mq,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale_log2, head_dim, local_blocks, vert_stride,
    BLOCK: tl.constexpr, SUB: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr,
    RULE: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    slot = tl.load(SLOTS + b)
    slot64 = tl.maximum(slot, 0).to(tl.int64)
    n = tl.where(slot >= 0, tl.load(SEQ_LENS + slot64), 0)  # tokens in the cache, the query's included
    qb = tl.maximum(n - 1, 0) // BLOCK  # the query's block
    if RULE:
        first = tl.load(FIRST + kvh)
        dense = tl.load(DENSE + kvh) != 0
        lo = tl.where(dense, 0, tl.maximum(qb - local_blocks + 1, 0))
        # vertical blocks first + t * stride below the window (lo - first > -stride, so no negative division)
        n_vert = tl.where(dense, 0, (lo - first + vert_stride - 1) // vert_stride)
        n_blocks = n_vert + qb - lo + 1
    else:
        n_blocks = qb + 1
    n_blocks = tl.where(n > 0, n_blocks, 0)
    per_split = (n_blocks + NUM_SPLITS - 1) // NUM_SPLITS
    it_lo = split * per_split
    it_hi = tl.minimum(it_lo + per_split, n_blocks)

    offs_m = tl.arange(0, M)
    offs_n = tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + offs_m
    m_ok = offs_m < GROUP
    d_ok = offs_d < head_dim
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    table = PAGE_TABLE + slot64 * stride_ts + kvh * stride_th

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    for it in range(it_lo, it_hi):
        if RULE:
            j = tl.where(it < n_vert, first + it * vert_stride, lo + it - n_vert)
        else:
            j = it
        page = tl.load(table + j)
        row_ok = m_ok  # unused by RULE
        if not RULE:
            row_ok = tl.load(BLOCK_MASK + head * stride_mh + qb.to(tl.int64) * stride_mq + j, mask=m_ok, other=0) != 0
        page_off = tl.maximum(page, 0).to(tl.int64) * stride_kp + kvh * stride_kh
        if SUB == BLOCK:
            m_i, l_i, acc = _attend_piece(q, K + page_off, V + page_off, j * BLOCK + offs_n, n, page >= 0, row_ok,
                                          offs_n, offs_d, d_ok, stride_kn, scale_log2, m_i, l_i, acc,
                                          RULE, UPCAST, PRECISION)
        else:  # a page in pieces that fit shared memory; a loop, not unrolled: unrolled, every piece's tiles are live
            for sub in range(0, BLOCK // SUB):
                rows = sub * SUB + offs_n
                m_i, l_i, acc = _attend_piece(q, K + page_off, V + page_off, j * BLOCK + rows, n, page >= 0, row_ok,
                                              rows, offs_d, d_ok, stride_kn, scale_log2, m_i, l_i, acc,
                                              RULE, UPCAST, PRECISION)

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    log2_sum = m_i + tl.log2(tl.where(nonempty, l_i, 1.0))
    lse = tl.where(nonempty, log2_sum * 0.6931471805599453, float("-inf"))  # natural log: * ln 2
    o_ptr = OUT + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b.to(tl.int64) * stride_lb + head * stride_lh + split, lse, mask=m_ok)


@triton.jit
def _merge_splits_kernel(
    PART_OUT, PART_LSE, OUT, LSE,
    stride_pb, stride_ph, stride_ps,
    stride_qb, stride_qh,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    head_dim,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * GROUP + tl.arange(0, GROUP_P2)  # the query heads of one kv head
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    h_ok = head < (tl.program_id(1) + 1) * GROUP
    hs_ok = h_ok[:, None] & (offs_s < NUM_SPLITS)[None, :]
    lse = tl.load(PART_LSE + b * stride_qb + head[:, None] * stride_qh + offs_s[None, :], mask=hs_ok,
                  other=float("-inf"))
    peak = tl.max(lse, 1)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    w = tl.exp(lse - peak[:, None])  # empty splits weigh 0
    total = tl.sum(w, 1)
    part = tl.load(PART_OUT + b * stride_pb + head[:, None, None] * stride_ph + offs_s[None, :, None] * stride_ps
                   + offs_d[None, None, :], mask=hs_ok[:, :, None] & (offs_d < head_dim)[None, None, :], other=0.0)
    safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(part * w[:, :, None], 1) / safe[:, None]
    tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=h_ok[:, None] & (offs_d < head_dim)[None, :])
    tl.store(LSE + b * stride_lb + head * stride_lh, tl.where(total > 0, peak + tl.log(safe), float("-inf")),
             mask=h_ok)


def _padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _page_piece(block: int, head_dim: int, itemsize: int) -> int:
    """Tokens of a page the kernel reads at once: the whole page while its K tile is at most 64 KiB. Compiled for
    sm_90, fp32 pages of 128 x 256 took 276 KiB of shared memory (an H100 has 227); pieces of 64 KiB take at most
    148 KiB (``benchmarks/compile_sm90.py`` compiles the largest pages of each dtype)."""
    return min(block, max(16, (64 << 10) // (head_dim * itemsize)))


def decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    rule: tuple[torch.Tensor, torch.Tensor, int, int] | None,
    block_mask: torch.Tensor | None,
    partial_out: torch.Tensor | None = None,
    partial_lse: torch.Tensor | None = None,
    force_kernel: bool = False,
) -> None:
    """Decode attention for one query token per batch row, into preallocated ``out`` / ``lse``.

    ``q (batch, heads, d)``; ``k_pages, v_pages (pages, block, d)`` (a page per kv head), or
    ``(pages, block, kv_heads, d)`` (a page holds every kv head, as vLLM's cache; any strides but
    the last); ``page_table`` int32 ``(slots, kv_heads, max_blocks)`` (physical page per logical key
    block, -1 absent; a table shared by the kv heads is an ``expand`` with stride 0 over them);
    ``seq_lens`` int32 ``(slots,)`` tokens cached per slot, the query's own included (the query
    sits at position ``seq_lens - 1``); ``slots`` int32 ``(batch,)`` slot of each row, -1 for a
    padding row (output 0, lse -inf). ``out (batch, heads, d)``, ``lse (batch, heads)`` fp32.

    ``rule = (first, dense, local_blocks, vert_stride)`` with int32 ``(kv_heads,)`` tensors selects
    closed-form enumeration (``first``: the smallest key block on the head's vertical stride);
    otherwise ``block_mask`` int8 ``(heads or 1, max_blocks, max_blocks)`` gives each head's rows.
    Split-KV when ``partial_out (batch, heads, splits, d)`` / ``partial_lse (batch, heads, splits)``
    (fp32) are given, with ``splits > 1``. Launches only: no allocation, no host sync. ``force_kernel``:
    launch on any device (``benchmarks/compile_sm90.py`` intercepts the launch and compiles it).
    """
    if not (force_kernel or q.is_cuda or interpreting()):
        raise ValueError(f"decode_attention runs a Triton kernel: q and the cache must be on a CUDA device "
                         f"(or set TRITON_INTERPRET=1 for the slow CPU interpreter), got {q.device}")
    batch, heads, head_dim = q.shape
    block = k_pages.shape[1]
    kv_heads = page_table.shape[1]
    stride_kh = k_pages.stride(2) if k_pages.dim() == 4 else 0  # 3-D: the table names a page per kv head
    group = heads // kv_heads
    splits = 1 if partial_out is None else partial_out.shape[2]
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected the last dimension contiguous, got strides {t.stride()}")
    if k_pages.stride() != v_pages.stride():
        raise ValueError(f"k_pages/v_pages strides differ: {k_pages.stride()} vs {v_pages.stride()}")
    if page_table.stride(-1) != 1:
        raise ValueError(f"page_table: expected the last dimension contiguous, got strides {page_table.stride()}")
    if (rule is None) == (block_mask is None):
        raise ValueError("decode_attention needs exactly one of rule= or block_mask=")
    if rule is not None:
        first, dense, local_blocks, vert_stride = rule
        mask_arg, stride_mh, stride_mq = first, 0, 0  # unused pointer, any tensor
    else:
        first = dense = block_mask
        local_blocks = vert_stride = 1
        mask_arg = block_mask
        stride_mh = 0 if block_mask.shape[0] == 1 else block_mask.stride(0)
        stride_mq = block_mask.stride(1)
    dst_out, dst_lse = (out, lse) if splits == 1 else (partial_out, partial_lse)
    stride_os = 0 if splits == 1 else partial_out.stride(2)
    upcast = interpreting() and q.dtype == torch.bfloat16
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_pages, v_pages, page_table, seq_lens, slots, first, dense, mask_arg, dst_out, dst_lse,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), stride_kh,
        page_table.stride(0), page_table.stride(1),
        stride_mh, stride_mq,
        dst_out.stride(0), dst_out.stride(1), stride_os,
        dst_lse.stride(0), dst_lse.stride(1),
        softmax_scale * LOG2E, head_dim, local_blocks, vert_stride,
        BLOCK=block, SUB=_page_piece(block, _padded(head_dim), k_pages.element_size()), HEAD_DIM=_padded(head_dim), GROUP=group,
        M=max(16, triton.next_power_of_2(group)), RULE=rule is not None, NUM_SPLITS=splits,
        UPCAST=upcast, PRECISION=precision, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, kv_heads)](
            partial_out, partial_lse, out, lse,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1),
            head_dim,
            GROUP=group, GROUP_P2=triton.next_power_of_2(group), NUM_SPLITS=splits,
            SPLITS_P2=triton.next_power_of_2(splits), HEAD_DIM=_padded(head_dim), num_warps=4,
        )


def choose_num_splits(batch: int, kv_heads: int, blocks_read: int, num_sms: int, min_blocks: int = 4) -> int:
    """Splits per (sequence, kv head): enough programs for about two waves on ``num_sms``, but at
    least ``min_blocks`` key blocks per split so the merge stays cheap."""
    want = math.ceil(2 * num_sms / max(1, batch * kv_heads))
    return max(1, min(want, math.ceil(blocks_read / min_blocks), 64))


__all__ = ["decode_attention", "choose_num_splits"]
