"""Decode: one new query token per sequence, attending through the per-head page tables.

:class:`DecodePlan` follows FlashInfer's plan/run split: building the plan does the host work
once (output and split-KV scratch buffers, the number of splits for the longest context,
the per-kv-head rule parameters or the device block mask); :meth:`DecodePlan.run` and
:meth:`DecodePlan.append` only launch device work on static buffers, reading the lengths
from ``cache.seq_lens``, so a decode step can be captured in a CUDA graph and replayed.
The host bookkeeping (``cache.begin_step`` / ``end_step``: reserving and freeing pages) stays
outside the graph; it copies page-table changes to the device, once every ``block_size``
tokens of a sequence. Where ``sparse_attention`` takes the PyTorch reference (off CUDA without
``TRITON_INTERPRET=1``), so does decode: the same results, computed on the host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..kernels.decode import choose_num_splits, decode_attention
from ..lowering import decode_form
from ..patterns import BlockPattern
from ..reference import reference_attention, resolve_scale
from .cache import SparseKVCache, _current


def _blocks_read(pattern: BlockPattern, context: int) -> int:
    """Most key blocks one query at position ``context - 1`` reads, over heads."""
    if pattern.rule is None:
        return pattern.num_blocks(context)
    return int(pattern.blocks_per_row(context)[:, -1].max())


class DecodePlan:
    """Static buffers and launch parameters for decode steps of up to ``batch_size`` sequences.

    Args:
        cache: the :class:`SparseKVCache` to read.
        batch_size: rows of ``q`` in :meth:`run` (pad a smaller batch with slot -1).
        max_context: longest sequence the plan serves (sets the split-KV count);
            default ``cache.max_seq_len``.
        num_splits: override the split-KV count (default: about two waves of programs).
        softmax_scale: default ``head_dim ** -0.5``.

    ``run`` returns a view of the plan's own output buffer, overwritten by the next ``run``.
    """

    def __init__(self, cache: SparseKVCache, batch_size: int, *, max_context: int | None = None,
                 num_splits: int | None = None, softmax_scale: float | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        max_context = cache.max_seq_len if max_context is None else max_context
        if not 1 <= max_context <= cache.max_seq_len:
            raise ValueError(f"max_context={max_context!r}: expected 1..{cache.max_seq_len}")
        self.cache, self.batch_size = cache, batch_size
        self.softmax_scale = resolve_scale(softmax_scale, cache.head_dim)
        dev, H, d = cache.device, cache.num_heads, cache.head_dim
        self._kernel = [decode_form(cache.layer(i).pattern, H, cache.num_kv_heads, dev)
                        for i in range(cache.num_layers)]
        if num_splits is None:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
            blocks = max(_blocks_read(cache.layer(i).pattern, max_context) for i in range(cache.num_layers))
            num_splits = choose_num_splits(batch_size, cache.num_kv_heads, blocks, sms)
        if not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits={num_splits!r}: expected a positive int")
        self.num_splits = num_splits
        self.slots = torch.full((batch_size,), -1, dtype=torch.int32, device=dev)
        self.out = torch.empty(batch_size, H, d, dtype=cache.dtype, device=dev)
        self.lse = torch.empty(batch_size, H, dtype=torch.float32, device=dev)
        split = num_splits > 1
        self._partial_out = torch.empty(batch_size, H, num_splits, d, device=dev) if split else None
        self._partial_lse = torch.empty(batch_size, H, num_splits, device=dev) if split else None

    def set_slots(self, slots: Sequence[int]) -> None:
        """Which sequence each batch row decodes (copied into the static slot buffer; rows past
        ``len(slots)`` become padding). Call outside graph capture, when the batch changes."""
        slots = list(slots)
        if len(slots) > self.batch_size:
            raise ValueError(f"slots: {len(slots)} sequences exceed the plan's batch_size={self.batch_size}")
        for s in slots:
            if s != -1:
                self.cache._check_slot(s)
        padded = slots + [-1] * (self.batch_size - len(slots))
        self.slots.copy_(torch.tensor(padded, dtype=torch.int32))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the decoded token's ``k, v (batch_size, num_kv_heads, head_dim)`` of ``layer`` at
        position ``seq_lens - 1`` of each row's slot (after ``begin_step`` counted it)."""
        _current(self.cache)
        pos = self.cache.seq_lens[self.slots.clamp(min=0).long()] - 1
        self.cache.write(layer, k, v, self.slots, pos)

    def run(self, layer: int, q: torch.Tensor, *, return_lse: bool = False):
        """Attention of ``q (batch_size, num_heads, head_dim)`` — the newest token of each row's
        sequence — over that sequence's cache in ``layer``; call it between ``begin_step`` and
        ``end_step``. Returns ``out (batch_size, num_heads, head_dim)`` and, with ``return_lse``,
        ``lse (batch_size, num_heads)`` fp32. The Triton kernel runs where ``sparse_attention``'s
        would (CUDA, or ``TRITON_INTERPRET=1``); elsewhere the PyTorch reference, exact but slow."""
        _current(self.cache)  # the newest token's blocks may be freed once its step ends
        self.cache.check_input("q", q, (self.batch_size, self.cache.num_heads, self.cache.head_dim))
        k_pages, v_pages, table, pattern = self.cache.layer(layer)
        if ops.use_kernel(q):
            decode_attention(q, k_pages, v_pages, table, self.cache.seq_lens, self.slots, self.out, self.lse,
                             softmax_scale=self.softmax_scale, partial_out=self._partial_out,
                             partial_lse=self._partial_lse, **self._kernel[layer]._asdict())
        else:
            self._reference(layer, q, pattern)
        return (self.out, self.lse) if return_lse else self.out

    def _reference(self, layer: int, q: torch.Tensor, pattern: BlockPattern) -> None:
        """What the kernel computes, by :func:`s2attn.reference_attention` over each row's keys as
        gathered from the pages (host work: not for CUDA graphs)."""
        self.out.zero_()
        self.lse.fill_(float("-inf"))  # padding rows and empty sequences
        lens = self.cache.seq_lens.tolist()
        for row, slot in enumerate(self.slots.tolist()):
            if slot >= 0 and lens[slot] > 0:
                k, v = self.cache.gather(layer, slot, lens[slot])
                out, lse = reference_attention(q[row][None, None], k[None], v[None], pattern,
                                               softmax_scale=self.softmax_scale, return_lse=True)
                self.out[row] = out[0, 0]
                self.lse[row] = lse[0, :, 0]


def decode(cache: SparseKVCache, layer: int, q: torch.Tensor, *, plan: DecodePlan | None = None,
           return_lse: bool = False):
    """Attention of the newest token of each sequence of the current step, in ``layer``.

    ``q (batch, num_heads, head_dim)``, one row per slot of ``cache.begin_step``, in that order; the
    token's own key/value must already be written (:func:`append`). Without ``plan`` one is built
    for the step and reused by its other layers; pass a :class:`DecodePlan` to reuse buffers across
    steps (and capture in a CUDA graph). Returns ``out (batch, num_heads, head_dim)`` (a view of the
    plan's buffer) and, with ``return_lse``, ``lse (batch, num_heads)`` fp32.
    """
    step = _current(cache)
    if plan is None:
        if step.decode_plan is None:
            step.decode_plan = DecodePlan(cache, len(step.slots), max_context=step.max_total)
            step.decode_plan.set_slots(step.slots)
        plan = step.decode_plan
    return plan.run(layer, q, return_lse=return_lse)


__all__ = ["DecodePlan", "decode"]
