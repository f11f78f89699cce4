"""Block-sparse attention patterns.

A :class:`BlockPattern` says which key blocks each query block of each head may read.
Query token ``t`` may attend key token ``s`` iff ``pattern[h, t // B, s // B]`` and, when
causal, ``s <= t`` (positions are absolute: with fewer queries than keys the queries sit
at the end of the keys).

Two representations share one interface:

* a *rule* (:func:`local_stride`, :func:`dense`): a closed form, so nothing quadratic is
  ever allocated, even at a million tokens;
* a *mask* (:func:`from_mask`, or the union/intersection of two patterns): an explicit
  boolean tensor ``(heads, q_blocks, k_blocks)``, or 2-D and shared by every head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

BLOCK_SIZES = (16, 32, 64, 128, 256)
MAX_SEQ_LEN = 2**31 - 1  # positions are int32 in the kernels and the cache (cu_seqlens, seq_lens)


@dataclass(frozen=True)
class LocalStrideRule:
    """The paper's local + vertical-stride rule, in closed form.

    For a sparse head with group index ``g`` (its kv-head index, or 0 when homogeneous),
    query block ``i`` reads key block ``j`` iff ``|i - j| < local_blocks`` (``0 <= i - j``
    when causal) or ``(j + g * head_step + head_offset) % vert_stride == 0``. Kv heads
    ``>= num_kv_heads - num_dense_heads`` are dense. ``head_base`` is the global index of
    this pattern's first query head (non-zero after slicing for head parallelism);
    ``heads_per_group = total_query_heads // num_kv_heads``.
    """

    local_blocks: int
    vert_stride: int
    head_step: int
    head_offset: int
    homogeneous: bool
    num_kv_heads: int
    num_dense_heads: int
    heads_per_group: int
    head_base: int = 0

    def group(self, head: torch.Tensor) -> torch.Tensor:
        """Kv-head index of (local) query head indices."""
        return (head + self.head_base) // self.heads_per_group

    def is_dense(self, head: torch.Tensor) -> torch.Tensor:
        return self.group(head) >= self.num_kv_heads - self.num_dense_heads

    def shift(self, head: torch.Tensor) -> torch.Tensor:
        """Per-head vertical shift: key block ``j`` is on the stride iff ``(j + shift) % S == 0``."""
        g = torch.zeros_like(head) if self.homogeneous else self.group(head)
        return g * self.head_step + self.head_offset

    def allows(self, head: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, causal: bool) -> torch.Tensor:
        """The rule itself (broadcasting over ``head``, ``qb``, ``kb``); the one place it lives in PyTorch."""
        diff = qb - kb
        local = (diff >= 0) & (diff < self.local_blocks) if causal else diff.abs() < self.local_blocks
        vertical = (kb + self.shift(head)) % self.vert_stride == 0
        allowed = local | vertical | self.is_dense(head)
        return allowed & (diff >= 0) if causal else allowed

    def uncovered_offsets(self, head: torch.Tensor, n: int, causal: bool) -> list[int]:
        """Offsets ``r`` such that key blocks ``j`` with ``j % vert_stride == r`` lie outside some query
        block's window of ``n`` blocks, yet no head among ``head`` reads them (empty: union complete)."""
        if bool(self.is_dense(head).any()) or n <= self.local_blocks:
            return []
        L, S = self.local_blocks, self.vert_stride
        covered = set((-self.shift(head) % S).tolist())
        # key blocks outside some query block's window: 0 .. n-1-L (the last query block looks back);
        # bidirectional also L .. n-1 (the first query block looks ahead)
        needed = set(range(min(S, n - L)))
        if not causal:
            needed |= {j % S for j in range(L, min(n, L + S))}
        return sorted(needed - covered)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPattern:
    """An immutable block-sparse attention pattern.

    Build one with :func:`local_stride`, :func:`dense` or :func:`from_mask`; combine with
    ``|`` and ``&``; slice heads with :meth:`heads`. ``num_heads`` is ``None`` for a pattern
    shared by all heads.
    """

    def __init__(
        self,
        *,
        block_size: int,
        causal: bool,
        num_heads: int | None,
        max_seq_len: int,
        rule: LocalStrideRule | None = None,
        mask: torch.Tensor | None = None,
    ):
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={block_size!r}: expected one of {BLOCK_SIZES}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"max_seq_len={max_seq_len!r}: expected an int number of tokens in 1..{MAX_SEQ_LEN}")
        if (rule is None) == (mask is None):
            raise ValueError("a BlockPattern needs exactly one of rule= or mask=")
        if mask is not None:
            mask = mask.detach().to(device="cpu", dtype=torch.bool).contiguous()
            if mask.dim() not in (2, 3) or mask.shape[-1] != mask.shape[-2]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)}: expected (heads, blocks, blocks) or (blocks, blocks)"
                )
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            if mask.shape[-1] < cdiv(max_seq_len, block_size):
                raise ValueError(
                    f"mask has {mask.shape[-1]} blocks, too few for max_seq_len={max_seq_len} "
                    f"at block_size={block_size}"
                )
            if num_heads is not None and mask.shape[0] != num_heads:
                raise ValueError(f"mask has {mask.shape[0]} heads, expected num_heads={num_heads}")
        self.block_size = block_size
        self.causal = causal
        self.num_heads = num_heads
        self.max_seq_len = max_seq_len
        self.rule = rule
        self._mask = mask

    # ------------------------------------------------------------------ basics
    @property
    def max_blocks(self) -> int:
        return cdiv(self.max_seq_len, self.block_size)

    @property
    def pattern_heads(self) -> int:
        """Number of distinct head layers: ``num_heads``, or 1 when shared."""
        return 1 if self.num_heads is None else self.num_heads

    def num_blocks(self, seq_len: int) -> int:
        self.check_seq_len(seq_len)
        return cdiv(seq_len, self.block_size)

    def check_seq_len(self, seq_len: int, name: str = "seq_len") -> None:
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"{name}={seq_len} is longer than the pattern's max_seq_len={self.max_seq_len}; "
                f"build the pattern with a larger max_seq_len"
            )

    def check_heads(self, num_heads: int, name: str = "heads") -> None:
        if self.num_heads is not None and self.num_heads != num_heads:
            raise ValueError(f"{name}={num_heads}: the pattern was built for {self.num_heads} heads")

    # ------------------------------------------------------------------ masks
    def allows(self, head: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """Whether query block ``qb`` of ``head`` reads key block ``kb`` (broadcasting, int64 tensors)."""
        if self.rule is not None:
            return self.rule.allows(head, qb, kb, self.causal)
        head = head if self.num_heads is not None else torch.zeros_like(head)
        return self._mask[head, qb, kb]

    def block_mask(self, seq_len: int) -> torch.Tensor:
        """Bool ``(pattern_heads, n, n)`` with ``n = ceil(seq_len / block_size)``, in absolute blocks."""
        n = self.num_blocks(seq_len)
        if self._mask is not None:
            return self._mask[:, :n, :n]
        idx = torch.arange(n)
        heads = torch.arange(self.pattern_heads)
        return self.allows(heads[:, None, None], idx[None, :, None], idx[None, None, :])

    def to_token_mask(self, seq_len_q: int, seq_len_k: int) -> torch.Tensor:
        """Bool ``(pattern_heads, seq_len_q, seq_len_k)``: exactly which keys each query reads.

        Queries are end-aligned: query ``i`` sits at absolute position ``seq_len_k - seq_len_q + i``.
        """
        if seq_len_q > seq_len_k:
            raise ValueError(f"seq_len_q={seq_len_q} > seq_len_k={seq_len_k}: queries must not outnumber keys")
        self.check_seq_len(seq_len_k, "seq_len_k")
        qpos = torch.arange(seq_len_k - seq_len_q, seq_len_k)
        kpos = torch.arange(seq_len_k)
        return self.token_mask_rows(qpos, kpos, self.causal)

    def token_mask_rows(self, qpos: torch.Tensor, kpos: torch.Tensor, causal: bool) -> torch.Tensor:
        """Token mask for absolute query positions ``qpos`` and key positions ``kpos``."""
        B = self.block_size
        heads = torch.arange(self.pattern_heads)[:, None, None]
        allowed = self.allows(heads, (qpos // B)[None, :, None], (kpos // B)[None, None, :])
        if causal:
            allowed = allowed & (kpos[None, None, :] <= qpos[None, :, None])
        return allowed

    # ------------------------------------------------------------------ statistics
    def blocks_per_row(self, seq_len: int) -> torch.Tensor:
        """Int64 ``(pattern_heads, n)``: key blocks read by each query block (closed form for rules)."""
        n = self.num_blocks(seq_len)
        r = self.rule
        if r is None:
            mask = self.block_mask(seq_len)
            return (mask.tril() if self.causal else mask).sum(-1)  # a causal row reads no block past its own
        heads = torch.arange(self.pattern_heads)[:, None]
        i = torch.arange(n)[None, :]
        L, S = r.local_blocks, r.vert_stride
        shift = r.shift(heads) % S
        if self.causal:
            lo, hi = (i - L + 1).clamp(min=0), i  # local key blocks [lo, hi]
            total = i + 1
        else:
            lo, hi = (i - L + 1).clamp(min=0), (i + L - 1).clamp(max=n - 1)
            total = torch.full_like(i, n)
        # vertical key blocks j = S*t - shift outside [lo, hi] and inside [0, total)
        in_range = lambda a, b: _count_congruent(a, b, S, shift)  # noqa: E731  j in [a, b)
        vert = in_range(torch.zeros_like(lo), lo) + in_range(hi + 1, total)
        count = (hi - lo + 1) + vert
        return torch.where(r.is_dense(heads), total, count).expand(self.pattern_heads, n)

    def density(self, seq_len: int) -> float:
        """Fraction of the (causal) blocks that are computed, averaged over heads."""
        n = self.num_blocks(seq_len)
        per_head_total = n * (n + 1) // 2 if self.causal else n * n
        return float(self.blocks_per_row(seq_len).sum()) / (self.pattern_heads * per_head_total)

    def is_union_complete(self, seq_len: int | None = None) -> bool:
        """For every query block, do the heads together cover every key block it could see?"""
        return self.union_gap(seq_len) is None

    def union_gap(self, seq_len: int | None = None) -> tuple[int, int] | None:
        """``(query block, key block)``: a key block the query block may see but no head reads, or ``None``
        when the pattern is union complete at ``seq_len`` (default ``max_seq_len``; closed form for rules)."""
        seq_len = self.max_seq_len if seq_len is None else seq_len
        n = self.num_blocks(seq_len)
        r = self.rule
        if r is not None:
            offsets = r.uncovered_offsets(torch.arange(self.pattern_heads), n, self.causal)
            if not offsets:
                return None
            if offsets[0] < n - r.local_blocks:  # outside the last query block's window
                return n - 1, offsets[0]
            # bidirectional only: ahead of the first query block's window
            return 0, next(j for j in range(r.local_blocks, n) if j % r.vert_stride == offsets[0])
        visible = torch.ones(n, n, dtype=torch.bool)
        if self.causal:
            visible = visible.tril()
        missing = (visible & ~self.block_mask(seq_len).any(0)).nonzero()
        return tuple(missing[0].tolist()) if len(missing) else None

    def is_kv_cache_efficient(self, seq_len: int | None = None) -> bool:
        """Per head, once a key block outside the local window is skipped by a query block,
        is it skipped by every later one? Then its cache entry can be freed at once."""
        if not self.causal:
            return False
        if self.rule is not None:
            return True  # vertical blocks are chosen by absolute index
        seq_len = self.max_seq_len if seq_len is None else seq_len
        mask = self.block_mask(seq_len)
        # a "revival" is a skip followed by a read further down the same key column
        below_diag = torch.ones_like(mask[0]).tril()  # the empty causal triangle is not a skip
        skipped_before = torch.cummax((~mask & below_diag).to(torch.int8), dim=1).values.bool()
        return not bool((mask[:, 1:] & skipped_before[:, :-1] & below_diag[1:]).any())

    def kv_tokens_kept(self, seq_len: int) -> torch.Tensor:
        """Int64 ``(pattern_heads,)``: KV tokens a head must keep once the context is ``seq_len``
        tokens, i.e. those some present or future query of that head will still read."""
        if not self.causal:
            raise ValueError("kv_tokens_kept is defined for causal patterns only")
        B = self.block_size
        cur = (seq_len - 1) // B  # block of the newest token
        kb = torch.arange(cur + 1)
        r = self.rule
        heads = torch.arange(self.pattern_heads)[:, None]
        if r is not None:
            kept = (kb >= cur - r.local_blocks + 1) | ((kb + r.shift(heads)) % r.vert_stride == 0) | r.is_dense(heads)
        else:
            self.check_seq_len(seq_len)
            kept = self._mask[:, cur:, : cur + 1].any(1)
        tokens = torch.full((cur + 1,), B, dtype=torch.int64)
        tokens[-1] = seq_len - cur * B
        return (kept.to(torch.int64) * tokens).sum(-1)

    # ------------------------------------------------------------------ composition
    def _combine(self, other: "BlockPattern", op) -> "BlockPattern":
        if not isinstance(other, BlockPattern):
            return NotImplemented
        if (other.block_size, other.causal) != (self.block_size, self.causal):
            raise ValueError(
                f"cannot combine patterns with block_size/causal {self.block_size}/{self.causal} "
                f"and {other.block_size}/{other.causal}"
            )
        heads = {h for h in (self.num_heads, other.num_heads) if h is not None}
        if len(heads) > 1:
            raise ValueError(f"cannot combine patterns over {self.num_heads} and {other.num_heads} heads")
        seq = min(self.max_seq_len, other.max_seq_len)
        mask = op(self.block_mask(seq), other.block_mask(seq))
        return BlockPattern(block_size=self.block_size, causal=self.causal, num_heads=heads.pop() if heads else None,
                            max_seq_len=seq, mask=mask)

    def __or__(self, other: "BlockPattern") -> "BlockPattern":
        return self._combine(other, torch.logical_or)

    def __and__(self, other: "BlockPattern") -> "BlockPattern":
        return self._combine(other, torch.logical_and)

    def heads(self, start: int, stop: int) -> "BlockPattern":
        """The pattern of query heads ``[start, stop)`` (for head / tensor parallelism)."""
        if self.num_heads is None:
            return self
        if not 0 <= start < stop <= self.num_heads:
            raise ValueError(f"head range [{start}, {stop}) is outside [0, {self.num_heads})")
        common = dict(block_size=self.block_size, causal=self.causal, num_heads=stop - start,
                      max_seq_len=self.max_seq_len)
        if self.rule is not None:
            rule = dataclasses.replace(self.rule, head_base=self.rule.head_base + start)
            return BlockPattern(rule=rule, **common)
        return BlockPattern(mask=self._mask[start:stop], **common)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        heads = "shared" if self.num_heads is None else self.num_heads
        kind = "mask"
        if self.rule is not None:
            r = self.rule
            kind = (f"local_stride(local_blocks={r.local_blocks}, vert_stride={r.vert_stride}, "
                    f"head_step={r.head_step}, head_offset={r.head_offset}, kv_heads={r.num_kv_heads}, "
                    f"dense_heads={r.num_dense_heads}{', homogeneous' if r.homogeneous else ''})")
        seq = min(self.max_seq_len, 16 * self.block_size)
        rows = self.block_mask(seq)[0]
        art = "\n".join("  " + "".join("█" if x else "·" for x in row.tolist()) for row in rows)
        return (f"BlockPattern({kind}, heads={heads}, block_size={self.block_size}, causal={self.causal}, "
                f"max_seq_len={self.max_seq_len}, density@max={self.density(self.max_seq_len):.3f})\n"
                f"  head 0, first {rows.shape[0]} blocks:\n{art}")

    def plot(self, path: str, seq_len: int | None = None, max_heads: int = 8) -> str:
        """Draw the pattern at ``seq_len`` tokens (default ``max_seq_len``) to a PNG: one head per kv-head
        group (up to ``max_heads``, dense groups marked) and how many heads read each block (needs matplotlib;
        :func:`s2attn.plotting.plot_pattern`)."""
        from .plotting import plot_pattern

        return plot_pattern(self, path, seq_len=seq_len, max_heads=max_heads)

    def to_flex_block_mask(self, seq_len: int, device: torch.device | str = "cpu"):
        """This pattern as a FlexAttention ``BlockMask`` for ``seq_len`` queries and keys, so that
        ``flex_attention(q, k, v, block_mask=..., enable_gqa=True)`` on ``bhsd`` tensors computes what
        :func:`s2attn.sparse_attention` does (:func:`s2attn.flex.to_flex_block_mask`)."""
        from .flex import to_flex_block_mask

        return to_flex_block_mask(self, seq_len, device)


def _count_congruent(a: torch.Tensor, b: torch.Tensor, S: int, shift: torch.Tensor) -> torch.Tensor:
    """Number of integers ``j`` in ``[a, b)`` with ``(j + shift) % S == 0`` (0 where ``b <= a``)."""
    upto = lambda x: torch.div(x + shift + S - 1, S, rounding_mode="floor")  # noqa: E731  j in [0, x)
    return (upto(b) - upto(a)).clamp(min=0) * (b > a)


def local_stride(
    num_heads: int,
    max_seq_len: int,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    *,
    num_kv_heads: int | None = None,
    homogeneous: bool = False,
    num_dense_heads: int = 0,
    head_step: int | None = None,
    head_offset: int = 0,
    causal: bool = True,
) -> BlockPattern:
    """The S2 pattern: a local window of ``local_blocks`` blocks plus every ``vert_stride``-th
    key block, the stride's offset rotated across kv-head groups (unless ``homogeneous``).

    ``num_dense_heads`` counts kv-head groups (the last ones) that attend densely.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, val in (("num_heads", num_heads), ("local_blocks", local_blocks), ("vert_stride", vert_stride),
                      ("num_kv_heads", num_kv_heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r}: expected a positive int")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if not 0 <= num_dense_heads <= num_kv_heads:
        raise ValueError(f"num_dense_heads={num_dense_heads}: expected 0..num_kv_heads={num_kv_heads}")
    step = max(1, vert_stride // num_kv_heads) if head_step is None else head_step
    for name, val in (("head_step", step), ("head_offset", head_offset)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name}={val!r}: expected an int >= 0")
    rule = LocalStrideRule(local_blocks=local_blocks, vert_stride=vert_stride, head_step=step,
                           head_offset=head_offset, homogeneous=homogeneous, num_kv_heads=num_kv_heads,
                           num_dense_heads=num_dense_heads, heads_per_group=num_heads // num_kv_heads)
    return BlockPattern(block_size=block_size, causal=causal, num_heads=num_heads, max_seq_len=max_seq_len,
                        rule=rule)


def dense(max_seq_len: int, block_size: int = 64, *, num_heads: int | None = None, causal: bool = True) -> BlockPattern:
    """Every block (then causal, if asked): ordinary attention, as a pattern."""
    heads = 1 if num_heads is None else num_heads
    rule = LocalStrideRule(local_blocks=1, vert_stride=1, head_step=0, head_offset=0, homogeneous=True,
                           num_kv_heads=heads, num_dense_heads=heads, heads_per_group=1)
    return BlockPattern(block_size=block_size, causal=causal, num_heads=num_heads, max_seq_len=max_seq_len,
                        rule=rule)


def from_mask(mask: torch.Tensor, block_size: int, *, causal: bool = True, max_seq_len: int | None = None) -> BlockPattern:
    """A pattern from a square bool block mask ``(heads, blocks, blocks)`` or ``(blocks, blocks)``: entry
    ``[h, i, j]`` lets query block ``i`` of head ``h`` read key block ``j``, both by absolute position (with
    fewer queries than keys, a query's block is that of its end-aligned position). ``causal`` (default
    True) adds ``s <= t`` at token level unless a call overrides it."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool torch.Tensor, got {type(mask).__name__}"
                        f"{'' if not isinstance(mask, torch.Tensor) else ' of dtype ' + str(mask.dtype)}")
    blocks = mask.shape[-1]
    max_seq_len = blocks * block_size if max_seq_len is None else max_seq_len
    num_heads = mask.shape[0] if mask.dim() == 3 else None
    return BlockPattern(block_size=block_size, causal=causal, num_heads=num_heads, max_seq_len=max_seq_len,
                        mask=mask)


__all__ = ["BlockPattern", "LocalStrideRule", "BLOCK_SIZES", "local_stride", "dense", "from_mask"]
