"""Union completeness explained: which key blocks no head reads, why, and the nearest settings that read them.

Beyond its local window, a sparse head of a local-stride pattern reads the key blocks ``j`` with
``j % vert_stride`` equal to its *offset*. The query heads of one kv-head group share their offset
(they read the same cache pages), so ``G`` sparse kv-head groups cover at most ``G`` of the
``vert_stride`` offsets: the pattern is union complete when ``vert_stride <= G`` and ``head_step``
shares no factor with ``vert_stride`` (or when some kv-head group is dense).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from .patterns import BlockPattern, local_stride


class NotUnionCompleteWarning(UserWarning):
    """A library default built a pattern whose heads together miss key blocks the queries may see."""


def explain(pattern: BlockPattern, seq_len: int | None = None) -> str | None:
    """Why ``pattern`` is not union complete at ``seq_len`` (default its ``max_seq_len``), or ``None`` if it is."""
    gap = pattern.union_gap(seq_len)
    if gap is None:
        return None
    example = f"query block {gap[0]} never sees key block {gap[1]}"
    r = pattern.rule
    if r is None:
        return f"no head reads some key blocks the queries may see (e.g. {example})"
    heads = torch.arange(pattern.pattern_heads)  # none dense: a dense group would read every block
    groups = r.group(heads).unique().numel()
    S = r.vert_stride
    covered = sorted(set((-r.shift(heads) % S).tolist()))
    if r.homogeneous:
        reason = "homogeneous=True gives every head the same offset"
    elif groups < S:
        reason = (f"{groups} sparse kv-head group{'s' * (groups > 1)} cannot cover {S} offsets one each, the query "
                  f"heads of a group sharing its offset")
    else:
        reason = f"head_step={r.head_step} shares the factor {math.gcd(r.head_step, S)} with vert_stride={S}"
    n = pattern.num_blocks(pattern.max_seq_len if seq_len is None else seq_len)
    missing = r.uncovered_offsets(heads, n, pattern.causal)
    return (f"the vertical blocks sit at offsets {_listing(covered)} of every {S} key blocks ({reason}): key blocks "
            f"at offsets {_listing(missing)} beyond the local window are read by no head (e.g. {example})")


def nearest_union_complete(pattern: BlockPattern, seq_len: int | None = None) -> list[tuple[dict, BlockPattern]]:
    """Union-complete local-stride settings close to ``pattern``'s: ``(changed local_stride arguments, pattern)``
    pairs, fewest computed blocks first. Empty for masks, head slices, and where only dense attention is left."""
    r = pattern.rule
    if r is None or r.head_base or pattern.num_heads is None:
        return []
    seq_len = pattern.max_seq_len if seq_len is None else seq_len
    settings = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)
                if f.name not in ("heads_per_group", "head_base")}
    sparse_groups = r.num_kv_heads - r.num_dense_heads
    heterogeneous = {"homogeneous": False} if r.homogeneous else {}
    candidates = [{**heterogeneous, "vert_stride": max(1, min(r.vert_stride, sparse_groups)), "head_step": 1}]
    if r.num_dense_heads == 0 and r.num_kv_heads > 1:
        candidates.append({"num_dense_heads": 1})
    found = []
    for candidate in candidates:
        change = {k: v for k, v in candidate.items() if settings[k] != v}
        s = {**settings, **change}
        alt = local_stride(pattern.num_heads, pattern.max_seq_len, pattern.block_size, s.pop("local_blocks"),
                           s.pop("vert_stride"), causal=pattern.causal, **s)
        if alt.is_union_complete(seq_len) and alt.density(seq_len) < 1:
            found.append((change, alt))
    return sorted(found, key=lambda pair: pair[1].density(seq_len))


def warn_if_incomplete(pattern: BlockPattern, where: str, stacklevel: int = 2) -> None:
    """Warn (:class:`NotUnionCompleteWarning`) when ``pattern`` is not union complete at its ``max_seq_len``,
    unless it was asked for explicitly as ``homogeneous`` (one offset for every head: the ablation)."""
    why = None if pattern.rule is not None and pattern.rule.homogeneous else explain(pattern)
    if why is None:
        return
    nearby = "; ".join(", ".join(f"{k}={v}" for k, v in change.items())
                       for change, _ in nearest_union_complete(pattern))
    warnings.warn(f"{where}: the pattern is not union complete: {why}. Union complete nearby: "
                  f"{nearby or 'nothing short of dense attention'} (README, 'Choosing a pattern')",
                  NotUnionCompleteWarning, stacklevel=stacklevel + 1)


def _listing(values: list[int], shown: int = 8) -> str:
    text = ", ".join(map(str, values[:shown]))
    return f"{{{text}{', ...' if len(values) > shown else ''}}}"


__all__ = ["NotUnionCompleteWarning", "explain", "nearest_union_complete", "warn_if_incomplete"]
