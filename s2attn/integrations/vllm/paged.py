"""Sparse attention over vLLM's paged KV cache: the half of the vLLM backend that imports no vLLM.

vLLM's cache, as this module takes it: K and V pools ``(num_pages, page_size, kv_heads, head_dim)``
(views with any strides but the last; one page holds a block of tokens of every kv head), one
block table per request ``(num_reqs, max_pages)`` int32 shared by the kv heads, ``seq_lens``
int32 (tokens cached per request, the step's own included: vLLM writes the new keys first),
and ``query_start_loc`` int32 ``(num_reqs + 1,)`` over the packed queries. Queries are end-aligned:
new token ``i`` of a request with ``q_len`` new tokens sits at position ``seq_len - q_len + i``.
The pattern's ``block_size`` equals the page size, so a pattern block is a page.

* :func:`write_kv` stores the step's keys/values at ``slot_mapping`` (``page * page_size + offset``,
  -1 skipped) with one small Triton kernel (no host work, capturable in a CUDA graph).
* :func:`decode` is one query per request: the Triton decode kernel of :mod:`s2attn.kernels.decode`
  walks, per (request, kv head), only the key blocks of that head's pattern row (local window plus
  its vertical stride, in closed form from ``seq_lens``), maps each through the block table and
  never loads the rest; split-KV over static scratch buffers. No host work depends on the lengths.
* :func:`prefill` (prompts, chunks of prompts, prompts after a cached prefix) gathers each request's
  cached tokens from its pages into one packed sequence (every page of the context: the heads
  together read all of them) and runs :func:`s2attn.sparse_attention_varlen`, whose kernel computes
  only the pattern's blocks. The gather reads the whole context once per layer and step.

Without a GPU and without ``TRITON_INTERPRET=1``, decode goes through the prefill path as well
(:func:`sparse_attention_varlen` then runs the PyTorch reference): that is the CPU fallback and the
reference the decode kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...api import sparse_attention_varlen
from ...inference.decode import _blocks_read
from ...kernels.decode import choose_num_splits, decode_attention
from ...lowering import DecodeForm, decode_form
from ...kernels.launch import interpreting
from ...patterns import BlockPattern


def use_kernel(x: torch.Tensor) -> bool:
    """The Triton decode and store kernels run on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``."""
    return x.is_cuda or interpreting()


# ---------------------------------------------------------------------------------------------- layer plan
@dataclass(frozen=True)
class LayerPlan:
    """One layer's pattern on one tensor-parallel rank, lowered once for the kernels.

    ``pattern`` covers this rank's query heads only, each keeping its *global* index (so its
    vertical offset and dense group are those of the unsliced model); ``kernel`` is what the decode
    kernel takes (:func:`s2attn.lowering.decode_form`)."""

    pattern: BlockPattern
    num_heads: int
    num_kv_heads: int
    kernel: DecodeForm

    @classmethod
    def build(cls, pattern: BlockPattern, num_heads: int, num_kv_heads: int, device: torch.device) -> LayerPlan:
        pattern.check_heads(num_heads, "num_heads")
        return cls(pattern, num_heads, num_kv_heads, decode_form(pattern, num_heads, num_kv_heads, device))

    def blocks_read(self, context: int) -> int:
        """Most key blocks one query at position ``context - 1`` reads (sets the split-KV count)."""
        return _blocks_read(self.pattern, min(context, self.pattern.max_seq_len))


# ---------------------------------------------------------------------------------------------- cache
def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_cache, v_cache)``, each ``(num_pages, page_size, kv_heads, head_size)``, as views of the one
    tensor vLLM binds to a layer. Two layouts (the only difference between the vLLM versions served):

    * 5-D ``(num_pages, 2, page_size, kv_heads, head_size)``: what this backend's ``get_kv_cache_shape``
      asks for (vLLM 0.22);
    * 4-D ``(num_pages, kv_heads, page_size, 2 * head_size)``: vLLM 0.32's logical page view, each cell
      holding a token's key then its value (any physical layout: only strides are used).
    """
    if kv_cache.dim() == 5 and kv_cache.shape[1] == 2 and kv_cache.shape[-1] == head_size:
        return kv_cache[:, 0], kv_cache[:, 1]
    if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_size:
        return kv_cache[..., :head_size].transpose(1, 2), kv_cache[..., head_size:].transpose(1, 2)
    raise ValueError(f"kv_cache of shape {tuple(kv_cache.shape)}: expected (pages, 2, page_size, kv_heads, "
                     f"{head_size}) or (pages, kv_heads, page_size, {2 * head_size})")


@triton.jit
def _store_kv_kernel(
    K, V, K_CACHE, V_CACHE, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cn, stride_ch,
    page_size, kv_heads, head_dim,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    offs_h = tl.arange(0, HEADS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (slot >= 0) & (offs_h[:, None] < kv_heads) & (offs_d[None, :] < head_dim)  # slot -1: a padding token
    page = tl.maximum(slot, 0) // page_size
    dst = page * stride_cp + (tl.maximum(slot, 0) % page_size) * stride_cn + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=ok)
    tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=ok)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store ``key, value (tokens, kv_heads, head_dim)`` at ``slot_mapping (>= tokens,)``; slot -1 is skipped."""
    tokens = min(key.shape[0], slot_mapping.shape[0])
    if tokens == 0:
        return
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache/v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    page_size, kv_heads, head_dim = k_cache.shape[1:]
    if not use_kernel(key):
        slots = slot_mapping[:tokens].long()
        real = (slots >= 0).nonzero().squeeze(1)
        slots = slots[real]
        for src, dst in ((key, k_cache), (value, v_cache)):
            dst[slots // page_size, slots % page_size] = src[real].to(dst.dtype)
        return
    _store_kv_kernel[(tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        page_size, kv_heads, head_dim,
        HEADS=triton.next_power_of_2(kv_heads), HEAD_DIM=triton.next_power_of_2(head_dim), num_warps=1,
    )


# ---------------------------------------------------------------------------------------------- decode
class DecodeBuffers:
    """Static scratch for the decode kernel, allocated once: the row -> request map, the lse output, and
    split-KV partials in one flat buffer viewed per batch size (so a captured graph keeps its pointers).

    The split count depends only on the batch size and the longest context the engine serves, never
    on this step's lengths."""

    def __init__(self, max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int, max_blocks_read: int,
                 device: torch.device, num_sms: int | None = None, num_splits: int | None = None):
        if num_sms is None:  # no SMs to fill on the CPU (the interpreter): one split
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.num_heads, self.head_dim, self.fixed_splits = num_heads, head_dim, num_splits
        self._splits = {b: num_splits or choose_num_splits(b, num_kv_heads, max_blocks_read, num_sms)
                        for b in range(1, max_batch + 1)}
        most = max((b * s for b, s in self._splits.items() if s > 1), default=0)
        self.rows = torch.arange(max_batch, dtype=torch.int32, device=device)
        self.lse = torch.empty(max_batch, num_heads, dtype=torch.float32, device=device)
        self._partial_out = torch.empty(most * num_heads * head_dim, dtype=torch.float32, device=device)
        self._partial_lse = torch.empty(most * num_heads, dtype=torch.float32, device=device)

    def num_splits(self, batch: int) -> int:
        return self._splits[batch]

    def partials(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        splits = self._splits[batch]
        if splits == 1:
            return None, None
        n = batch * splits * self.num_heads
        return (self._partial_out[: n * self.head_dim].view(batch, self.num_heads, splits, self.head_dim),
                self._partial_lse[:n].view(batch, self.num_heads, splits))


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, out: torch.Tensor, plan: LayerPlan, buffers: DecodeBuffers,
           softmax_scale: float) -> None:
    """Decode attention into ``out (batch, heads, head_dim)`` for ``q (batch, heads, head_dim)``, row ``i``
    the newest token of request ``i`` (``seq_lens[i]`` tokens cached, 0 for a padding row: output 0).
    Launches only (the Triton kernel reads the pattern's pages through ``block_table``)."""
    batch = q.shape[0]
    if batch == 0:
        return
    table = block_table[:batch, None, :].expand(-1, plan.num_kv_heads, -1)  # one table for every kv head
    partial_out, partial_lse = buffers.partials(batch)
    decode_attention(q, k_cache, v_cache, table, seq_lens, buffers.rows[:batch], out, buffers.lse[:batch],
                     softmax_scale=softmax_scale, partial_out=partial_out, partial_lse=partial_lse, **plan.kernel._asdict())


# ---------------------------------------------------------------------------------------------- prefill
def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(keys, values) (sum(seq_lens), kv_heads, head_dim)``: each request's cached tokens in order,
    read from its pages (request ``i`` is row ``i`` of ``block_table``)."""
    page_size = k_cache.shape[1]
    keys, values = [], []
    for i, n in enumerate(seq_lens):
        pages = block_table[i, : -(-n // page_size)].long()
        for pool, dst in ((k_cache, keys), (v_cache, values)):
            dst.append(pool[pages].flatten(0, 1)[:n])
    return torch.cat(keys), torch.cat(values)


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
            query_lens: list[int], seq_lens: list[int], pattern: BlockPattern, softmax_scale: float) -> torch.Tensor:
    """Attention of packed new tokens ``q (sum(query_lens), heads, head_dim)`` of requests ``0..n-1`` (rows of
    ``block_table``) over their whole cached context (``seq_lens``, the new tokens included). Returns
    ``out`` shaped like ``q``."""
    keys, values = gather_context(k_cache, v_cache, block_table, seq_lens)
    as_cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(q.device)  # noqa: E731
    return sparse_attention_varlen(q, keys, values, as_cu(query_lens), as_cu(seq_lens), max(query_lens),
                                   max(seq_lens), pattern, softmax_scale=softmax_scale, causal=True)


__all__ = ["DecodeBuffers", "LayerPlan", "decode", "gather_context", "prefill", "split_kv_cache", "use_kernel",
           "write_kv"]
