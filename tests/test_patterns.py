"""BlockPattern semantics, pinned against direct formulas and brute-force counts (DESIGN.md, "Semantics")."""

import itertools

import pytest
import torch

from s2attn import BlockPattern, dense, from_mask, local_stride
from s2attn.patterns import BLOCK_SIZES

pytestmark = pytest.mark.quick  # `make test-quick`


def rule_mask(heads, n, local, stride, *, num_kv_heads=None, homogeneous=False, num_dense_heads=0,
              head_step=None, head_offset=0, causal=True):
    """The local-stride rule of DESIGN.md written out entry by entry: bool (heads, n, n)."""
    kv_heads = heads if num_kv_heads is None else num_kv_heads
    step = max(1, stride // kv_heads) if head_step is None else head_step
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h, i, j in itertools.product(range(heads), range(n), range(n)):
        g = h // (heads // kv_heads)
        if causal and j > i:
            continue
        if g >= kv_heads - num_dense_heads:
            out[h, i, j] = True
            continue
        shift = 0 if homogeneous else g * step
        out[h, i, j] = abs(i - j) < local or (j + shift + head_offset) % stride == 0
    return out


CONFIGS = {
    "hetero": dict(heads=4, local=2, stride=4),
    "homo": dict(heads=4, local=2, stride=4, homogeneous=True),
    "gqa": dict(heads=8, local=3, stride=4, num_kv_heads=2),
    "mqa": dict(heads=4, local=1, stride=3, num_kv_heads=1),
    "dense_heads": dict(heads=6, local=2, stride=5, num_kv_heads=3, num_dense_heads=1),
    "step_offset": dict(heads=4, local=2, stride=6, head_step=2, head_offset=3),
    "zero_step": dict(heads=4, local=2, stride=4, head_step=0, head_offset=1),
    "bidir": dict(heads=4, local=2, stride=4, causal=False),
    "bidir_gqa_dense": dict(heads=6, local=3, stride=4, num_kv_heads=3, num_dense_heads=1, causal=False),
}


def build(cfg, max_seq_len, block_size=16):
    cfg = dict(cfg)
    return local_stride(cfg.pop("heads"), max_seq_len, block_size, cfg.pop("local"), cfg.pop("stride"), **cfg)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [16 * 19 + 5, 16 * 3])
def test_local_stride_matches_formula(name, seq_len):
    cfg = CONFIGS[name]
    p = build(cfg, 16 * 40)
    n = -(-seq_len // 16)
    expected = rule_mask(cfg["heads"], n, cfg["local"], cfg["stride"], **{
        k: v for k, v in cfg.items() if k not in ("heads", "local", "stride")})
    assert torch.equal(p.block_mask(seq_len), expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_token_mask_end_aligned(name):
    p = build(CONFIGS[name], 200)
    sq, sk = 37, 150
    blocks = p.block_mask(sk)
    qpos = torch.arange(sk - sq, sk)
    kpos = torch.arange(sk)
    expected = blocks[:, qpos // 16][:, :, kpos // 16]
    if p.causal:
        expected = expected & (kpos[None, :] <= qpos[:, None])
    assert torch.equal(p.to_token_mask(sq, sk), expected)


def test_gqa_heads_of_a_group_share_rows():
    m = local_stride(8, 640, 16, 2, 4, num_kv_heads=2).block_mask(640)
    assert torch.equal(m[0], m[3]) and torch.equal(m[4], m[7]) and not torch.equal(m[0], m[4])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [1, 16, 16 * 2 + 1, 16 * 23 + 7])
def test_blocks_per_row_and_density_closed_form(name, seq_len):
    p = build(CONFIGS[name], 16 * 40)
    mask = p.block_mask(seq_len)
    assert torch.equal(p.blocks_per_row(seq_len), mask.sum(-1))
    n = mask.shape[-1]
    total = n * (n + 1) // 2 if p.causal else n * n
    assert p.density(seq_len) == pytest.approx(mask.sum().item() / (mask.shape[0] * total))


def test_dense_pattern_is_dense():
    p = dense(1000, 64, num_heads=3)
    assert p.density(1000) == 1.0
    n = 16
    assert torch.equal(p.block_mask(1000), torch.ones(3, n, n, dtype=torch.bool).tril().expand(3, n, n))
    assert torch.equal(dense(1000, 64, causal=False).block_mask(1000), torch.ones(1, n, n, dtype=torch.bool))


# ---------------------------------------------------------------- union completeness
def brute_union_complete(p, seq_len):
    mask = p.block_mask(seq_len)
    visible = torch.ones(mask.shape[-2:], dtype=torch.bool)
    if p.causal:
        visible = visible.tril()
    return bool((mask.any(0) | ~visible).all())


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n].get("causal", True)])
@pytest.mark.parametrize("seq_len", [16, 16 * 3, 16 * 30 + 1])
def test_union_complete_matches_brute_force(name, seq_len):
    p = build(CONFIGS[name], 16 * 40)
    assert p.is_union_complete(seq_len) == brute_union_complete(p, seq_len)


def test_union_complete_bidirectional_matches_brute_force():
    patterns = [build(cfg, 16 * 40) for cfg in CONFIGS.values() if not cfg.get("causal", True)]
    patterns.append(local_stride(1, 16 * 40, 16, 4, 16, causal=False, homogeneous=True))  # fails at 5 blocks
    for p in patterns:
        for seq_len in (16, 16 * 3, 16 * 5, 16 * 30 + 1):
            assert p.is_union_complete(seq_len) == brute_union_complete(p, seq_len), (p, seq_len)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [16 * 3, 16 * 5, 16 * 30 + 1])
def test_union_gap_is_a_block_no_head_reads(name, seq_len):
    p = build(CONFIGS[name], 16 * 40)
    gap = p.union_gap(seq_len)
    assert (gap is None) == brute_union_complete(p, seq_len)
    if gap is not None:
        q, k = gap
        assert (k <= q or not p.causal) and not p.block_mask(seq_len)[:, q, k].any()


def test_union_completeness_examples():
    seq = 64 * 512
    assert local_stride(32, seq, 64, 8, 16).is_union_complete()  # 32 heads cover 16 offsets
    assert local_stride(16, seq, 64, 8, 16).is_union_complete()
    assert not local_stride(8, seq, 64, 8, 16).is_union_complete()  # offsets 0,2,..,14 only
    assert not local_stride(32, seq, 64, 8, 16, homogeneous=True).is_union_complete()
    assert local_stride(32, seq, 64, 8, 16, homogeneous=True, num_kv_heads=8, num_dense_heads=1).is_union_complete()
    # every block inside the local window: complete whatever the stride
    assert local_stride(4, 64 * 8, 64, 8, 16, homogeneous=True).is_union_complete()


# ---------------------------------------------------------------- KV-cache efficiency
def dilated_mask(n, stride, local):
    """A relative-offset dilated pattern: key j for query i iff (i - j) % stride == 0 (plus a local window)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((i - j) % stride == 0) | ((i - j) < local)


def test_rule_patterns_are_kv_cache_efficient():
    assert local_stride(8, 4096, 64, 4, 8).is_kv_cache_efficient()
    assert local_stride(8, 4096, 64, 4, 8, homogeneous=True).is_kv_cache_efficient()
    assert not local_stride(8, 4096, 64, 4, 8, causal=False).is_kv_cache_efficient()


def test_relative_dilated_pattern_is_not_kv_cache_efficient():
    p = from_mask(dilated_mask(32, 4, 2).tril(), 16)
    assert not p.is_kv_cache_efficient()


@pytest.mark.parametrize("source", ["local_stride", "dense"])
def test_mask_of_an_efficient_pattern_is_kv_cache_efficient(source):
    rule = local_stride(4, 16 * 20, 16, 2, 4) if source == "local_stride" else dense(16 * 20, 16)
    assert from_mask(rule.block_mask(16 * 20), 16).is_kv_cache_efficient()


# ---------------------------------------------------------------- KV tokens kept
def brute_kv_tokens_kept(p, seq_len):
    """Tokens ``s < seq_len`` that a query at position ``>= seq_len - 1`` (up to max_seq_len) will read."""
    horizon = p.max_seq_len
    tm = p.to_token_mask(horizon - (seq_len - 1), horizon)
    return tm[:, :, :seq_len].any(1).sum(-1)


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n].get("causal", True)])
@pytest.mark.parametrize("seq_len", [1, 16, 16 * 7 + 3, 16 * 13])
def test_kv_tokens_kept_brute_force(name, seq_len):
    p = build(CONFIGS[name], 16 * 16)
    assert torch.equal(p.kv_tokens_kept(seq_len), brute_kv_tokens_kept(p, seq_len))


def test_kv_tokens_kept_mask_pattern_brute_force():
    mask = torch.rand(3, 12, 12) < 0.4
    p = from_mask(mask, 16)
    for seq_len in (1, 17, 16 * 6 + 9, 16 * 12):
        assert torch.equal(p.kv_tokens_kept(seq_len), brute_kv_tokens_kept(p, seq_len))


def test_kv_tokens_kept_is_about_window_plus_stride():
    seq = 64 * 2048
    kept = local_stride(32, seq, 64, 8, 16).kv_tokens_kept(seq)
    assert kept.shape == (32,)
    assert (kept <= 512 + seq // 16 + 64).all() and (kept >= 512 + seq // 16 - 64 * 2).all()


# ---------------------------------------------------------------- composition and slicing
def test_union_and_intersection():
    a = local_stride(4, 320, 16, 2, 4)
    b = local_stride(4, 320, 16, 1, 3, head_offset=1)
    assert torch.equal((a | b).block_mask(320), a.block_mask(320) | b.block_mask(320))
    assert torch.equal((a & b).block_mask(320), a.block_mask(320) & b.block_mask(320))
    shared = dense(160, 16)
    assert torch.equal((a & shared).block_mask(160), a.block_mask(160))  # shared broadcasts over heads
    with pytest.raises(ValueError, match="block_size"):
        _ = a | local_stride(4, 320, 32, 2, 4)
    with pytest.raises(ValueError, match="heads"):
        _ = a | local_stride(8, 320, 16, 2, 4)


@pytest.mark.parametrize("kind", ["rule_gqa", "rule_dense_heads", "mask"])
def test_head_slice_equals_slice_of_full(kind):
    if kind == "rule_gqa":
        p = local_stride(8, 400, 16, 2, 4, num_kv_heads=4)
    elif kind == "rule_dense_heads":
        p = local_stride(8, 400, 16, 2, 4, num_kv_heads=4, num_dense_heads=1)
    else:
        p = from_mask(torch.rand(8, 25, 25) < 0.5, 16)
    full = p.block_mask(400)
    for start, stop in [(0, 8), (2, 6), (5, 8), (3, 4)]:
        part = p.heads(start, stop)
        assert part.num_heads == stop - start
        assert torch.equal(part.block_mask(400), full[start:stop])
        assert torch.equal(part.to_token_mask(50, 333), p.to_token_mask(50, 333)[start:stop])
    assert torch.equal(p.heads(2, 6).heads(1, 3).block_mask(400), full[3:5])
    with pytest.raises(ValueError, match="head range"):
        p.heads(4, 9)


# ---------------------------------------------------------------- construction errors, display
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="block_size=48"):
        local_stride(4, 1024, 48, 2, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        local_stride(6, 1024, 64, 2, 4, num_kv_heads=4)
    with pytest.raises(ValueError, match="vert_stride"):
        local_stride(4, 1024, 64, 2, 0)
    with pytest.raises(TypeError, match="bool"):
        from_mask(torch.ones(4, 4), 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        local_stride(4, 1024, 64, 2, 4).block_mask(2048)
    for name in ("head_step", "head_offset"):  # negative shifts are refused alike
        with pytest.raises(ValueError, match=f"{name}=-1: expected an int >= 0"):
            local_stride(4, 1024, 64, 2, 4, **{name: -1})
    with pytest.raises(ValueError, match=r"mask shape \(2, 3, 5\): expected \(heads, blocks, blocks\)"):
        from_mask(torch.ones(2, 3, 5, dtype=torch.bool), 16)  # square only, as the README says
    assert BLOCK_SIZES == (16, 32, 64, 128, 256)


def test_bools_and_oversized_lengths_are_refused_up_front():
    """A bool is not a count (it used to reach a bool subtraction), and a length past int32 positions is
    refused before anything sized by it (``repr`` alone used to allocate 137 GB at 2**40 tokens)."""
    with pytest.raises(ValueError, match="local_blocks=True: expected a positive int"):
        local_stride(4, 256, 16, True, 4)
    with pytest.raises(ValueError, match="vert_stride=False"):
        local_stride(4, 256, 16, 2, False)
    for build in (lambda n: local_stride(4, n, 64, 4, 4), lambda n: dense(n, 64),
                  lambda n: from_mask(torch.ones(4, 4, dtype=torch.bool), 16, max_seq_len=n)):
        for n in (2**40, 0, True, 100.0):
            message = rf"max_seq_len={n!r}: expected an int number of tokens in 1\.\.2147483647"
            with pytest.raises(ValueError, match=message):
                build(n)
    assert local_stride(4, 2**31 - 1, 64, 4, 4).max_seq_len == 2**31 - 1


@pytest.mark.parametrize("causal", [True, False])
def test_mask_density_counts_the_blocks_a_query_can_read(causal):
    """A causal mask's blocks above the diagonal are never computed: an all-ones causal mask has density
    1 (it read 2n / (n + 1), 1.88 at n = 16); random masks against a direct count."""
    n = 16
    assert from_mask(torch.ones(n, n, dtype=torch.bool), 16, causal=causal).density(n * 16) == 1.0
    mask = torch.rand(3, n, n) < 0.4
    p = from_mask(mask, 16, causal=causal)
    counted = mask.tril() if causal else mask
    assert torch.equal(p.blocks_per_row(n * 16), counted.sum(-1))
    assert p.density(n * 16) == pytest.approx(counted.sum().item() / (3 * (n * (n + 1) // 2 if causal else n * n)))


def test_shared_2d_mask_pattern():
    mask = dilated_mask(10, 3, 2).tril()
    p = from_mask(mask, 32)
    assert p.num_heads is None and p.pattern_heads == 1
    p.check_heads(7)  # shared by any number of heads
    assert torch.equal(p.block_mask(320)[0], mask)


def test_repr_is_readable():
    text = repr(local_stride(32, 1 << 20, 64, 8, 16))
    assert text.startswith("BlockPattern(local_stride(local_blocks=8, vert_stride=16")
    assert "heads=32" in text and "block_size=64" in text and "█" in text
    assert len(text.splitlines()) == 2 + 16  # header, caption, 16 rows of blocks
    assert "mask" in repr(from_mask(torch.eye(4, dtype=torch.bool), 16))


def test_million_token_rule_is_closed_form():
    p = local_stride(32, 1 << 20, 64, 8, 16)
    assert isinstance(p, BlockPattern) and p.rule is not None
    assert p.blocks_per_row(1 << 20).shape == (32, 1 << 14)
    assert 0.06 < p.density(1 << 20) < 0.07
    assert p.is_union_complete() and p.is_kv_cache_efficient()
