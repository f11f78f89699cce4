"""Pure-PyTorch block-sparse attention: the specification every kernel is tested against.

Readable top to bottom, differentiable by autograd, and chunked over queries so the full
``seqlen_q x seqlen_k`` score matrix never exists at once. Inputs in fp16/bf16/fp32 are
computed in fp32; fp64 inputs are computed in fp64 (that is how tests get a ground truth).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .patterns import BlockPattern


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """``softmax_scale``, or when None the default ``head_dim ** -0.5`` (flash-attn's)."""
    return head_dim ** -0.5 if softmax_scale is None else softmax_scale


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    softmax_scale: float,
    causal: bool,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for ``q (b, h, sq, d)``, ``k, v (b, hk, sk, d)`` (already in the compute dtype).

    Returns ``out (b, h, sq, d)`` and ``lse (b, h, sq)``. Queries are end-aligned to the keys;
    a query with no allowed key gets output 0 and lse ``-inf``.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    group = h // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    kpos = torch.arange(sk, device=q.device)
    outs, lses = [], []
    for start in range(0, max(sq, 1), chunk_size):  # no queries: one empty chunk, so autograd still reaches q, k, v
        qpos = torch.arange(sk - sq + start, sk - sq + min(start + chunk_size, sq), device=q.device)
        allowed = pattern.token_mask_rows(qpos.cpu(), kpos.cpu(), causal).to(q.device)  # (hp, c, sk)
        out, lse = _masked_softmax(q[:, :, start : start + len(qpos)], k, v, allowed, softmax_scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _masked_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (b, h, c, d)`` against ``k, v (b, h, sk, d)`` where ``allowed (h or 1, c, sk)``: ``out (b, h, c, d)``
    and ``lse (b, h, c)``; a row with no allowed key gets 0 and ``-inf``."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * softmax_scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True) if k.shape[2] else scores.sum(-1, keepdim=True)  # no keys: amax refuses
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, row_max + torch.log(safe), torch.full_like(safe, float("-inf")))
    return torch.einsum("bhqk,bhkd->bhqd", p, v) / safe, lse.squeeze(-1)


def attend_remapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    key_blocks: torch.Tensor,
    query_start: int,
    softmax_scale: float,
    causal: bool,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys gathered from a longer sequence, ``q (b, h, sq, d)``, ``k, v (b, hk, sk, d)``.

    Key ``s`` of kv head ``g`` is absolute key ``key_blocks[g, s // B] * B + s % B`` (``key_blocks[g, j] < 0``:
    padding, never read); query ``i`` is absolute query ``query_start + i``. The pattern's rule and causality
    apply to these absolute positions, exactly as :func:`attend` applies them on the whole sequence. One kv
    head and ``chunk_size`` queries at a time: nothing ``(heads, sq, sk)`` or ``(heads, n, n)`` is built.
    """
    b, h, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = h // hk
    B = pattern.block_size
    pattern_heads = torch.arange(h) if pattern.num_heads is not None else torch.zeros(h, dtype=torch.long)
    s = torch.arange(sk, device=q.device)
    s_block = s // B  # each packed key's packed block
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs, lses = [], []
    for g in range(hk):
        blocks = key_blocks[g].to("cpu", torch.long)  # the absolute block of each packed key block
        kpos = blocks.to(q.device)[s_block] * B + s % B
        heads = pattern_heads[g * group:(g + 1) * group, None, None]
        k_g, v_g = (x[:, g:g + 1].expand(b, group, sk, x.shape[-1]) for x in (k, v))
        outs_g, lses_g = [], []
        for start in range(0, max(sq, 1), chunk_size):  # no queries: one empty chunk, as in attend
            qpos = torch.arange(query_start + start, query_start + min(start + chunk_size, sq), device=q.device)
            first = (query_start + start) // B
            qb = torch.arange(first, (query_start + start + len(qpos) - 1) // B + 1)
            # the rule per (query block, packed key block), small and on the CPU; spread over tokens on the device
            rule = pattern.allows(heads, qb[None, :, None], blocks.clamp(min=0)[None, None, :]) & (blocks >= 0)
            args = (q[:, g * group:(g + 1) * group, start:start + len(qpos)], k_g, v_g, rule.to(q.device),
                    qpos // B - first, s_block, qpos, kpos, causal, softmax_scale)
            # with gradients, each chunk's scores are recomputed in the backward rather than kept: memory of one
            # chunk, not of the whole (sq, sk), so the reference reaches the lengths the kernels are checked at
            out, lse = checkpoint(_remapped_chunk, *args, use_reentrant=False) if grad else _remapped_chunk(*args)
            outs_g.append(out)
            lses_g.append(lse)
        outs.append(torch.cat(outs_g, 2))
        lses.append(torch.cat(lses_g, 2))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _remapped_chunk(q, k, v, rule, rows, cols, qpos, kpos, causal: bool, softmax_scale: float):
    """One chunk of :func:`attend_remapped`: ``rule (heads, query blocks, packed key blocks)`` spread over the
    tokens (``rows`` / ``cols``: each query's and key's block in it), causality on absolute positions."""
    allowed = rule[:, rows][:, :, cols]
    if causal:
        allowed = allowed & (kpos[None, None, :] <= qpos[None, :, None])
    return _masked_softmax(q, k, v, allowed, softmax_scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention(
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
    """Reference sparse attention. Same arguments and results as :func:`s2attn.sparse_attention`.

    ``layout="bshd"``: ``q (batch, seqlen_q, heads, d)``, ``k, v (batch, seqlen_k, kv_heads, d)``;
    ``layout="bhsd"``: heads before sequence. ``lse`` is ``(batch, heads, seqlen_q)`` in fp32
    (fp64 for fp64 inputs).
    """
    causal = pattern.causal if causal is None else causal
    scale = resolve_scale(softmax_scale, q.shape[-1])
    ct = compute_dtype(q.dtype)
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = attend(q.to(ct), k.to(ct), v.to(ct), pattern, scale, causal)
    out = out.to(q.dtype)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def reference_attention_remapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    key_blocks: torch.Tensor,
    query_start: int,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    return_lse: bool = False,
):
    """Reference attention over a gathered subset of keys (:func:`attend_remapped`): ``q (batch, seqlen_q,
    heads, d)``, ``k, v (batch, seqlen_k, kv_heads, d)``, ``key_blocks (kv_heads, ceil(seqlen_k / block_size))``
    the absolute block of each packed key block (``-1``: padding), ``query_start`` the absolute position of
    query 0. Equal to :func:`reference_attention` on the whole sequence wherever the packed keys hold every
    key a query reads. ``lse`` is ``(batch, heads, seqlen_q)``.
    """
    causal = pattern.causal if causal is None else causal
    scale = resolve_scale(softmax_scale, q.shape[-1])
    ct = compute_dtype(q.dtype)
    out, lse = attend_remapped(*(x.transpose(1, 2).to(ct) for x in (q, k, v)), pattern, key_blocks, query_start,
                               scale, causal)
    out = out.to(q.dtype).transpose(1, 2)
    return (out, lse) if return_lse else out


def reference_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    pattern: BlockPattern,
    *,
    softmax_scale: float | None = None,
    causal: bool | None = None,
    return_lse: bool = False,
):
    """Reference for packed sequences: ``q (total_q, heads, d)``, ``k, v (total_k, kv_heads, d)``,
    sequence ``i`` at rows ``cu_seqlens[i]:cu_seqlens[i+1]``; each sequence is end-aligned on its
    own. ``lse`` is ``(heads, total_q)``.
    """
    causal = pattern.causal if causal is None else causal
    scale = resolve_scale(softmax_scale, q.shape[-1])
    ct = compute_dtype(q.dtype)
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        sl_q = slice(bounds_q[i], bounds_q[i + 1])
        sl_k = slice(bounds_k[i], bounds_k[i + 1])
        qi, ki, vi = (x.transpose(0, 1)[None].to(ct) for x in (q[sl_q], k[sl_k], v[sl_k]))
        out, lse = attend(qi, ki, vi, pattern, scale, causal)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, 0).to(q.dtype)
    lse = torch.cat(lses, 1)
    return (out, lse) if return_lse else out
