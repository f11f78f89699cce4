"""Drawing a :class:`~s2attn.BlockPattern` to a PNG (matplotlib, imported only when asked for).

Only a bounded prefix of the block grid is drawn (at most ``MAX_PLOT_BLOCKS`` blocks a side),
so plotting a million-token pattern costs the same as plotting a short one.
"""

from __future__ import annotations

import math
import os
import textwrap

MAX_PLOT_BLOCKS = 256


def plot_pattern(pattern, path: str | os.PathLike, seq_len: int | None = None, max_heads: int = 16) -> str:
    """Draw the block layout of the first ``max_heads`` heads, and how many heads read each block, to ``path``.

    ``seq_len`` (default ``pattern.max_seq_len``) is the context the figure describes; at most its first
    ``MAX_PLOT_BLOCKS`` query and key blocks are drawn. Returns ``path`` as a string.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("BlockPattern.plot needs matplotlib: pip install 's2attn[plot]'") from e
    if max_heads < 1:
        raise ValueError(f"max_heads={max_heads!r}: expected a positive int")
    seq_len = pattern.max_seq_len if seq_len is None else seq_len
    total_blocks = pattern.num_blocks(seq_len)
    shown = min(total_blocks, MAX_PLOT_BLOCKS)
    masks = pattern.block_mask(min(seq_len, shown * pattern.block_size))  # (pattern_heads, shown, shown)
    heads = min(masks.shape[0], max_heads)
    panels = heads + 1
    cols = math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / cols)

    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for h in range(heads):
        axes[h].imshow(masks[h].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        axes[h].set_title("all heads (shared)" if pattern.num_heads is None else f"head {h}", fontsize=9)
    coverage = masks.sum(0).numpy()
    axes[heads].imshow(coverage, cmap="viridis", vmin=0, vmax=masks.shape[0], interpolation="nearest")
    axes[heads].set_title(f"heads reading each block\n(dark 0, bright all {masks.shape[0]})", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[panels:]:
        ax.set_visible(False)

    partial = pattern.num_heads is not None and heads < pattern.num_heads
    head_note = f", heads 0-{heads - 1} of {pattern.num_heads}" if partial else ""
    title = (f"{repr(pattern).splitlines()[0]}\nrows: query blocks, columns: key blocks; first {shown} of "
             f"{total_blocks} blocks at seq_len={seq_len}{head_note}; density {pattern.density(seq_len):.3f}")
    width = int(2.6 * cols * 14)  # characters of 8-pt text per figure width
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=8)
    fig.savefig(path, dpi=100)
    return str(path)
