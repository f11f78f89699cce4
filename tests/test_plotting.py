"""Pattern plots: which heads are drawn, what the cells hold, and PNGs at 1M tokens, for masks and shared patterns."""

import math

import pytest
import torch

from s2attn import dense, from_mask, local_stride
from s2attn.plotting import _grids, shown_heads, tokens

pytestmark = pytest.mark.quick  # `make test-quick`


def test_one_head_per_kv_group_dense_group_kept():
    p = local_stride(32, 1 << 15, 64, 8, 8, num_kv_heads=8, num_dense_heads=1)
    assert shown_heads(p, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert shown_heads(p, 3) == [0, 24, 28]  # 28: the dense group's
    assert shown_heads(from_mask(torch.ones(5, 4, 4, dtype=torch.bool), 16), 2) == [0, 4]
    assert shown_heads(dense(100, 16), 8) == [0]


@pytest.mark.parametrize("stride, complete", [(8, True), (16, False)])
def test_cells_at_a_million_tokens(stride, complete):
    """At 1M tokens (16,384 blocks) a cell holds 64 x 64 blocks: a sparse head reads about 1 / stride of a
    cell's key blocks, and the union shows 0 heads where the pattern is not union complete."""
    p = local_stride(32, 1 << 20, 64, 8, stride, num_kv_heads=8)
    n, per_cell = 1 << 14, 64
    blocks = torch.arange(n, dtype=torch.int32)
    rows = blocks[per_cell - 1 :: per_cell]
    fractions, fewest = _grids(p, [0, 4], rows, blocks, per_cell)
    assert fewest.shape == (256, 256) and fractions[0].shape == (256, 256)
    assert math.isnan(fewest[0, 1]) and math.isnan(fractions[0][0, 1])  # causal: nothing to see above
    far = fractions[0][255, :200]
    assert torch.allclose(far, torch.full_like(far, 1 / stride), atol=1 / 64)
    assert (fewest[255, :200] >= 4).all() if complete else (fewest[255, :200] == 0).all()
    zoom = blocks[-8:]  # one block a cell: the local window is read by every head
    fractions, fewest = _grids(p, [0], zoom, zoom, 1)
    assert (fewest.diagonal() == 32).all() and (fractions[0].diagonal() == 1).all()


def test_token_labels():
    assert [tokens(n) for n in (0, 512, 8192, 1536, 1 << 20, 3 << 19)] == ["0", "512", "8k", "1.5k", "1M", "1.5M"]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    for p, name in [(local_stride(8, 1 << 16, 64, 8, 16, num_kv_heads=4), "gqa.png"),  # 1M: tests/apps/test_cli.py
                    (from_mask(torch.rand(3, 9, 9) < 0.5, 16), "mask.png"),
                    (dense(100, 16), "shared.png"),
                    (local_stride(4, 1024, 16, 2, 4, causal=False, homogeneous=True), "bidirectional.png")]:
        out = tmp_path / name
        assert p.plot(out, max_heads=4) == str(out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
