"""Merging attention computed over disjoint key sets, by log-sum-exp."""

from __future__ import annotations

from typing import Sequence

import torch


def combine_partitions(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[(out_i, lse_i), ...]`` computed over disjoint key sets into ``(out, lse)``.

    ``out_i`` is ``(..., seqlen, heads, d)`` (``bshd``) and ``lse_i`` ``(..., heads, seqlen)``,
    as returned by ``sparse_attention(..., return_lse=True)``. Differentiable in every input.
    A row empty in every part stays output 0, lse ``-inf``.
    """
    if len(parts) == 0:
        raise ValueError("combine_partitions: expected at least one (out, lse) pair, got none")
    outs = [o for o, _ in parts]
    lses = [lse for _, lse in parts]
    for i, (o, lse) in enumerate(parts):
        if o.shape != outs[0].shape or lse.shape != lses[0].shape:
            raise ValueError(f"part {i}: shapes {tuple(o.shape)}/{tuple(lse.shape)} differ from part 0's "
                             f"{tuple(outs[0].shape)}/{tuple(lses[0].shape)}")
        if lse.shape != o.shape[:-3] + (o.shape[-2], o.shape[-3]):
            raise ValueError(f"part {i}: lse shape {tuple(lse.shape)} does not match out shape {tuple(o.shape)}; "
                             f"expected lse (..., heads, seqlen) for out (..., seqlen, heads, d)")
    compute = torch.promote_types(lses[0].dtype, torch.float32)  # fp64 parts stay fp64
    stacked = torch.stack(lses).to(compute)
    peak = stacked.amax(0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(stacked - peak)  # (parts, ..., heads, seqlen); empty parts weigh 0
    total = weights.sum(0)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, peak + torch.log(safe), torch.full_like(safe, float("-inf")))
    w = (weights / safe).transpose(-1, -2).unsqueeze(-1)  # (parts, ..., seqlen, heads, 1)
    out = sum(w[i] * outs[i].to(compute) for i in range(len(parts)))
    return out.to(outs[0].dtype), lse
