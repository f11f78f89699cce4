"""Drawing a :class:`~s2attn.BlockPattern` to a PNG (matplotlib, imported only when asked for).

The figure reads the same at 32k and at a million tokens: the whole context is shown in at most
``MAX_CELLS`` cells a side, each cell the fraction of its key blocks that its rows' last query
block reads (one query block per row of cells, so the cost is ``heads x MAX_CELLS x blocks``, never
quadratic), and when a cell holds several blocks a second row zooms into the last ``ZOOM_BLOCKS``
blocks at full resolution. Axes are in tokens. One head per kv-head group is drawn (dense groups
included, marked), up to ``max_heads``; the last column counts how many of *all* the heads read each
block, red where none does (the pattern is then not union complete).
"""

from __future__ import annotations

import math
import os
import textwrap

import torch

MAX_CELLS = 256
ZOOM_BLOCKS = 64


def _group_firsts(pattern) -> list[int]:
    """The first query head of each kv-head group of a rule; every head of a mask."""
    heads = torch.arange(pattern.pattern_heads)
    if pattern.rule is None:
        return heads.tolist()
    sizes = torch.unique_consecutive(pattern.rule.group(heads), return_counts=True)[1]
    return (sizes.cumsum(0) - sizes).tolist()


def _alike(pattern) -> list[list[int]]:
    """Heads that read the same blocks, together: by vertical offset (dense heads all alike) for a rule,
    one a head for a mask."""
    heads = torch.arange(pattern.pattern_heads)
    r = pattern.rule
    if r is None:
        return [[h] for h in heads.tolist()]
    classes: dict = {}
    for h, offset, dense in zip(heads.tolist(), (r.shift(heads) % r.vert_stride).tolist(), r.is_dense(heads).tolist()):
        classes.setdefault("dense" if dense else offset, []).append(h)
    return list(classes.values())


def shown_heads(pattern, max_heads: int) -> list[int]:
    """Query heads to draw: the first of each kv-head group (each head of a mask pattern), evenly spaced down
    to ``max_heads``, always keeping the first dense group's."""
    if max_heads < 1:
        raise ValueError(f"max_heads={max_heads!r}: expected a positive int")
    firsts = _group_firsts(pattern)
    r = pattern.rule
    dense = [h for h in firsts if r is not None and bool(r.is_dense(torch.tensor(h)))][:1]
    sparse = [h for h in firsts if h not in dense]
    room = max(0, max_heads - len(dense))
    if len(sparse) > room:
        sparse = [sparse[round(i * (len(sparse) - 1) / max(1, room - 1))] for i in range(room)]
    return sorted(set(sparse + dense))[:max_heads]


def _grids(pattern, shown: list[int], qb: torch.Tensor, kb: torch.Tensor, per_cell: int):
    """For query blocks ``qb`` (one per row of cells) and key blocks ``kb`` grouped ``per_cell`` to a column:
    the fraction of each cell's key blocks each shown head reads, and the fewest heads (of all) reading
    a block of the cell; NaN where the cell holds no key block the query may see."""
    cols = -(-len(kb) // per_cell)
    cells = lambda x: torch.nn.functional.pad(x, (0, cols * per_cell - len(kb))).view(len(qb), cols, per_cell)  # noqa: E731
    visible = kb[None, :] <= qb[:, None] if pattern.causal else torch.ones(len(qb), len(kb), dtype=torch.bool)
    seen = cells(visible).sum(-1)
    count = torch.zeros(len(qb), cols, per_cell, dtype=torch.int32)
    fraction = {}
    for alike in _alike(pattern):  # heads that read alike at once: never more than one (rows x blocks) mask
        read = cells(pattern.allows(torch.tensor(alike[0]), qb[:, None], kb[None, :]) & visible)
        count.add_(read, alpha=len(alike))
        drawn = [h for h in alike if h in shown]
        if drawn:
            frac = torch.where(seen > 0, read.sum(-1) / seen.clamp(min=1), math.nan)
            fraction.update((h, frac) for h in drawn)
    fewest = torch.where(cells(visible), count, torch.iinfo(torch.int32).max).amin(-1).double()
    return [fraction[h] for h in shown], torch.where(seen > 0, fewest, math.nan)


def _token_axis(axis, start: int, stop: int) -> None:
    """Ticks at a power-of-two number of tokens, about four per axis, labelled 0, 8k, 512k, 1M."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    axis.set_major_locator(MultipleLocator(2 ** max(0, int(math.log2(max(1, (stop - start) / 4))))))
    axis.set_major_formatter(FuncFormatter(lambda x, _: tokens(int(x))))


def tokens(n: int) -> str:
    """``n`` tokens, short: 512, 8k, 1M, 1.5M."""
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def plot_pattern(pattern, path: str | os.PathLike, seq_len: int | None = None, max_heads: int = 8) -> str:
    """Draw ``pattern`` at a context of ``seq_len`` tokens (default its ``max_seq_len``) to ``path``: see
    the module docstring for what is drawn. Returns ``path`` as a string."""
    try:
        import matplotlib
        from matplotlib.colors import PowerNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("BlockPattern.plot needs matplotlib: pip install 's2attn[plot]'") from e
    from .coverage import explain

    seq_len = pattern.max_seq_len if seq_len is None else seq_len
    shown = shown_heads(pattern, max_heads)
    B, n = pattern.block_size, pattern.num_blocks(seq_len)
    per_cell = -(-n // MAX_CELLS)
    cells = -(-n // per_cell)
    blocks = torch.arange(n, dtype=torch.int32)  # int32: half the memory traffic of int64 in the (rows x blocks) grids
    last_of_row = blocks[(torch.arange(1, cells + 1) * per_cell).clamp(max=n) - 1]
    views = [(_grids(pattern, shown, last_of_row, blocks, per_cell), 0, cells * per_cell,
              f"whole context, a cell = {per_cell} x {per_cell} blocks")]
    if per_cell > 1:
        zoom = blocks[-ZOOM_BLOCKS:]
        views.append((_grids(pattern, shown, zoom, zoom, 1), int(zoom[0]), n, f"last {len(zoom)} blocks, one a cell"))

    hidden = "0.9"  # cells with no key block the query may see (causal): grey, apart from blocks not read (white)
    blues = matplotlib.colormaps["Blues"].with_extremes(bad=hidden)
    coverage = matplotlib.colormaps["viridis"].with_extremes(under="red", bad=hidden)
    heads_total = pattern.pattern_heads
    fig = Figure(figsize=(2.3 * (len(shown) + 1) + 1.2, 2.5 * len(views) + 1.3), layout="constrained")
    axes = fig.subplots(len(views), len(shown) + 1, squeeze=False)
    for row, ((fractions, fewest), start, stop, caption) in zip(axes, views):
        extent = (start * B, stop * B, stop * B, start * B)  # tokens: keys left to right, queries top down
        for ax, h, frac in zip(row, shown, fractions):
            head_img = ax.imshow(frac.numpy(), cmap=blues, norm=PowerNorm(0.5, vmin=0, vmax=1), extent=extent,
                                 interpolation="nearest")
            ax.set_title(_head_title(pattern, h), fontsize=9)
        union_img = row[-1].imshow(fewest.numpy(), cmap=coverage, vmin=1, vmax=max(2, heads_total),
                                   extent=extent, interpolation="nearest")
        row[-1].set_title(f"heads reading (of {heads_total}),\nfewest in cell", fontsize=9)
        row[0].set_ylabel(f"query tokens\n({caption})", fontsize=8)
        for ax in row:
            for axis in (ax.xaxis, ax.yaxis):
                _token_axis(axis, start * B, stop * B)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("key tokens", fontsize=8)
        fig.colorbar(head_img, ax=list(row[:-1]), shrink=0.8, label="fraction of key blocks read")
        bar = fig.colorbar(union_img, ax=row[-1], shrink=0.8, extend="min", label="heads (red: none)")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()

    why = explain(pattern, seq_len)
    title = (f"{repr(pattern).splitlines()[0]}\n{seq_len:,} tokens = {n:,} blocks of {B}; density "
             f"{pattern.density(seq_len):.3f}; union complete: {'yes' if why is None else 'no, ' + why}")
    width = int((2.3 * (len(shown) + 1) + 1.2) * 15)  # characters of 8-pt text per figure width
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=8)
    fig.savefig(path, dpi=100)
    return str(path)


def _head_title(pattern, h: int) -> str:
    if pattern.num_heads is None:
        return "every head (shared)"
    r = pattern.rule
    if r is None:
        return f"head {h}"
    head = torch.tensor(h)
    group = int(r.group(head))
    return f"head {h}, kv head {group}" + (" (dense)" if bool(r.is_dense(head)) else "")
