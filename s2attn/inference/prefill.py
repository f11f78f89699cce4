"""Prefill: attention for a batch of new tokens per sequence, then their keys/values into the cache.

The attention itself goes through :func:`s2attn.sparse_attention_varlen` (one packed call for
the whole batch). A first chunk attends to itself. A later chunk (chunked prefill) also reads
the cached keys: they are gathered from the pages into a dense-shaped ``(cached + chunk)`` key
and value sequence per sequence, with freed blocks filled by zeros. No query reads a freed
block — the cache only frees blocks whose last reader has passed — so the result is exact;
the price is ``(cached + chunk) * num_kv_heads * head_dim`` elements of K and of V per
sequence for the duration of the call.
"""

from __future__ import annotations

import torch

from ..api import sparse_attention_varlen
from .cache import SparseKVCache, Step, _current, append


def _with_cached(cache: SparseKVCache, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
    """Packed ``(keys, values)`` of every step sequence: its cached tokens (from the pages, zeros
    where freed) followed by its new ones."""
    keys, values = [], []
    start = 0
    for slot, cached, new in zip(step.slots, step.cached, step.new):
        if cached:
            k_cached, v_cached = cache.gather(layer, slot, cached)
            keys.append(k_cached)
            values.append(v_cached)
        keys.append(k[start : start + new])
        values.append(v[start : start + new])
        start += new
    return torch.cat(keys), torch.cat(values)


def prefill(cache: SparseKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of the current step's new tokens in ``layer``, and their keys/values into the cache.

    Packed like ``flash_attn_varlen_func``: ``q (total_new, num_heads, head_dim)``, ``k, v (total_new,
    num_kv_heads, head_dim)``, sequence ``i`` of ``cache.begin_step(slots, num_new_tokens)`` at rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` (``step.cu_seqlens_q``). New token ``t`` of sequence ``i`` sits
    at absolute position ``cached_i + t`` and reads, through the layer's pattern, the cached keys and the
    new ones up to itself. ``q, k, v`` are in the cache's dtype and on its device (checked before anything
    is computed or written). Returns ``out (total_new, num_heads, head_dim)``.
    """
    step = _current(cache)
    for name, t, heads in (("q", q, cache.num_heads), ("k", k, cache.num_kv_heads), ("v", v, cache.num_kv_heads)):
        cache.check_input(name, t, (step.total_new, heads, cache.head_dim))
    pattern = cache.layer(layer).pattern
    keys, values = _with_cached(cache, layer, step, k, v) if any(step.cached) else (k, v)
    out = sparse_attention_varlen(q, keys, values, step.cu_seqlens_q, step.cu_seqlens_k, step.max_new,
                                  step.max_total, pattern, softmax_scale=softmax_scale)
    append(cache, layer, k, v)
    return out


def prefill_padded(cache: SparseKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   padding_side: str = "right", softmax_scale: float | None = None) -> torch.Tensor:
    """:func:`prefill` for a padded batch: ``q (batch, max_len, num_heads, head_dim)``, ``k, v (batch,
    max_len, num_kv_heads, head_dim)``; row ``i`` holds the ``num_new_tokens[i]`` new tokens of the
    step's ``slots[i]`` at its start (``padding_side="right"``) or end (``"left"``). Returns ``out``
    shaped like ``q``, zero at padding."""
    step = _current(cache)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    # any padded length that holds the longest row; the expected shape names the shortest one
    padded = isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] >= step.max_new
    max_len = q.shape[1] if padded else step.max_new
    for name, t, heads in (("q", q, cache.num_heads), ("k", k, cache.num_kv_heads), ("v", v, cache.num_kv_heads)):
        cache.check_input(name, t, (len(step.slots), max_len, heads, cache.head_dim))
    lens = torch.tensor(step.new, device=q.device)
    idx = torch.arange(max_len, device=q.device)[None, :]
    keep = idx < lens[:, None] if padding_side == "right" else idx >= (max_len - lens)[:, None]
    out = q.new_zeros(q.shape)
    out[keep] = prefill(cache, layer, q[keep], k[keep], v[keep], softmax_scale=softmax_scale)
    return out


__all__ = ["prefill", "prefill_padded"]
