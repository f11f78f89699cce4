"""The public functions: flash-attn-style sparse attention for any BlockPattern."""

from __future__ import annotations

import torch

from .patterns import BlockPattern
from .reference import reference_attention, reference_attention_varlen


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
):
    """Block-sparse attention. ``q (batch, seqlen_q, heads, d)``, ``k, v (batch, seqlen_k, kv_heads, d)``
    (``layout="bhsd"``: heads second). Returns ``out`` like ``q`` and, with ``return_lse``,
    ``lse (batch, heads, seqlen_q)`` fp32."""
    return reference_attention(q, k, v, pattern, softmax_scale=softmax_scale, causal=causal, layout=layout,
                               return_lse=return_lse)


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    pattern: BlockPattern,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    return_lse: bool = False,
):
    """Packed sequences: ``q (total_q, heads, d)``, ``k, v (total_k, kv_heads, d)``, ``cu_seqlens`` int32
    ``(batch + 1,)``. ``lse`` is ``(heads, total_q)``."""
    return reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern, softmax_scale=softmax_scale,
                                      causal=causal, return_lse=return_lse)
