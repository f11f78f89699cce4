"""``SparseAttention``: :func:`s2attn.sparse_attention` with its pattern and options held by an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from .api import sparse_attention
from .coverage import warn_if_incomplete
from .patterns import BlockPattern
from .validation import check_flag, check_layout, check_pattern, check_softmax_scale


class SparseAttention(nn.Module):
    """Block-sparse attention as a layer (no parameters: it maps projected ``q, k, v`` to the output).

    ``forward(q, k, v)`` takes and returns the shapes of :func:`s2attn.sparse_attention` for ``layout``:
    ``q (batch, seqlen_q, heads, head_dim)``, ``k, v (batch, seqlen_k, kv_heads, head_dim)`` for ``"bshd"``.
    """

    def __init__(
        self,
        pattern: BlockPattern,
        *,
        softmax_scale: float | None = None,
        causal: bool | None = None,
        layout: str = "bshd",
    ):
        super().__init__()
        self.pattern = check_pattern(pattern)
        warn_if_incomplete(pattern, "SparseAttention")
        check_softmax_scale(softmax_scale)
        check_flag("causal", causal, allow_none=True)
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.layout = check_layout(layout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sparse_attention(q, k, v, self.pattern, softmax_scale=self.softmax_scale, causal=self.causal,
                                layout=self.layout)

    def extra_repr(self) -> str:
        summary = repr(self.pattern).splitlines()[0]
        return f"{summary}, softmax_scale={self.softmax_scale}, causal={self.causal}, layout={self.layout!r}"
