"""The public functions: flash-attn-style block-sparse attention for any :class:`~s2attn.BlockPattern`.

Masking rule (one rule for every entry point): query head ``h`` reads kv head
``h // (heads // kv_heads)``; query token ``t`` may attend key token ``s`` iff
``pattern[h, t // block_size, s // block_size]`` and, when causal, ``s <= t``. Positions are
absolute and queries are aligned to the *end* of the keys: with ``seqlen_q < seqlen_k``
(chunked prefill, decode) query ``i`` sits at position ``seqlen_k - seqlen_q + i``. A query
that may attend no key gets output 0 and log-sum-exp ``-inf`` (never NaN; its gradients are 0).

Every input is validated first (:mod:`s2attn.validation`); then each entry point calls one
private dispatch function, the only place that picks an implementation.
"""

from __future__ import annotations

import torch

from . import ops
from .patterns import BlockPattern
from .reference import resolve_scale
from .validation import check_attention_inputs, check_varlen_inputs

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _autocast(q: object, k: object, v: object) -> tuple:
    """Inside ``torch.autocast``, attention runs in the autocast dtype, as PyTorch SDPA does (a model's
    rotary embedding otherwise hands fp32 queries to an fp32 kernel, many times slower)."""
    xs = (q, k, v)
    if not all(isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) for x in xs):
        return xs  # validation names what is wrong
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) for x in xs)


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
    deterministic: bool = False,
) -> Output:
    """Block-sparse attention over a batch of equal-length sequences.

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)``; with ``layout="bhsd"``, ``(batch, heads, seqlen_q, head_dim)``.
        k, v: ``(batch, seqlen_k, kv_heads, head_dim)`` (or ``bhsd``), ``heads % kv_heads == 0``,
            ``seqlen_q <= seqlen_k <= pattern.max_seq_len``.
        pattern: a :class:`BlockPattern` over ``heads`` query heads (or shared by all heads).
        softmax_scale: multiplies ``q @ k^T`` before the softmax; default ``head_dim ** -0.5``.
        causal: add ``s <= t`` to the pattern's mask; default ``pattern.causal``. ``False`` on a causal
            pattern drops only the token-level ``s <= t``: its block layout (causal blocks) stays.
        layout: ``"bshd"`` (flash-attn's) or ``"bhsd"`` (SDPA's).
        return_lse: also return the natural-log log-sum-exp of the scaled scores of each row.
        deterministic: a backward with bit-identical gradients run to run (no atomics: the long
            key columns of vertical strides are not split across programs, somewhat slower).

    Runs the Triton kernels on CUDA tensors (and under ``TRITON_INTERPRET=1``), else the
    PyTorch reference.

    Dtypes: q, k, v all fp16, bf16 or fp32 (computed in fp32), or fp64 on the CPU (computed in fp64).
    Inside ``torch.autocast``, fp16 / bf16 / fp32 inputs are cast to the autocast dtype first (as
    SDPA does). All tensors on one device.

    Returns:
        ``out`` with the shape and dtype of ``q``; with ``return_lse``, ``(out, lse)`` where ``lse`` is
        ``(batch, heads, seqlen_q)`` in fp32 (fp64 for fp64 inputs), ``-inf`` on rows with no key.
    """
    q, k, v = _autocast(q, k, v)
    check_attention_inputs(q, k, v, pattern, softmax_scale=softmax_scale, causal=causal, layout=layout,
                           return_lse=return_lse)
    scale = float(resolve_scale(softmax_scale, q.shape[-1]))
    causal = pattern.causal if causal is None else causal
    return ops.attention(q, k, v, pattern, softmax_scale=scale, causal=causal, layout=layout, return_lse=return_lse,
                         deterministic=deterministic)


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
    deterministic: bool = False,
) -> Output:
    """Block-sparse attention over packed sequences of different lengths (as ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, heads, head_dim)``: the queries of every sequence, one after another.
        k, v: ``(total_k, kv_heads, head_dim)``, ``heads % kv_heads == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` on q's device, starting at 0, non-decreasing,
            ending at ``total_q`` / ``total_k``: sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i + 1]``.
            Each sequence needs ``seqlen_q <= seqlen_k <= pattern.max_seq_len``.
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence.
        pattern, softmax_scale, causal, deterministic: as in :func:`sparse_attention`. Every sequence starts at
            position 0, and its queries are end-aligned to its own keys.

    Returns:
        ``out (total_q, heads, head_dim)`` like ``q``; with ``return_lse``, ``(out, lse)`` with
        ``lse (heads, total_q)`` in fp32 (fp64 for fp64 inputs).
    """
    q, k, v = _autocast(q, k, v)
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, pattern,
                        softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    scale = float(resolve_scale(softmax_scale, q.shape[-1]))
    causal = pattern.causal if causal is None else causal
    return ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, pattern,
                                softmax_scale=scale, causal=causal, return_lse=return_lse,
                                deterministic=deterministic)
