"""remap.py: attention over gathered keys through a block map equals the plain reference on the whole sequence.

Each case takes a query range ``[a, e)`` of a full sequence and a packed key layout (context parallelism's
own, for several worlds, or a random superset of the blocks the queries read, with padding), gathers the
keys, and compares output, lse and the gradients of q, k, v (the packed gradients land back on the full
keys through the gather) with the plain reference run on the full sequence with the output cotangent
zero outside ``[a, e)``. Padding rows hold large random values, so a read of one shows.

The kernels' remapped rule path (kernel dtypes: the Triton kernels, the interpreter here, take the map) is
checked against the remapped reference and the table path, forward and gradients, on the same layouts, and
builds no mask or table.
"""

import pytest
import torch

from s2attn import dense, from_mask, local_stride, lowering, patterns, reference_attention
from s2attn import reference
from s2attn import remap as remap_module
from s2attn.integrations.distributed import _plan_for, needed_key_blocks
from s2attn.kernels import plan as kernel_plan
from s2attn.reference import reference_attention_remapped
from s2attn.remap import remap_layout, remapped_attention

TOL = 1e-10  # float64


def _rel(a, b):
    """Relative error; equal infinities (lse of rows that read nothing) count as equal."""
    a, b = a.detach(), b.detach()
    diff = torch.where(a == b, torch.zeros_like(a), a - b)
    return float(diff.norm() / torch.where(b.isfinite(), b, 0).norm().clamp(min=1e-300))


def _gather(x: torch.Tensor, key_blocks: torch.Tensor, width: int, B: int, poison: torch.Tensor) -> torch.Tensor:
    """Packed keys ``(batch, width, kv_heads, d)`` of the full ``x``: key ``s`` of kv head ``g`` is absolute
    ``key_blocks[g, s // B] * B + s % B``; padding reads ``poison``."""
    s = torch.arange(width)
    kb = key_blocks.long()[:, s // B]  # (kv_heads, width)
    pos = (kb.clamp(min=0) * B + s % B).clamp(max=x.shape[1] - 1)
    packed = torch.stack([x[:, pos[g], g] for g in range(len(kb))], 2)
    return torch.where((kb >= 0).T[None, :, :, None], packed, poison)


def _check(pattern, heads, kv_heads, seq, a, e, key_blocks, width, causal=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, d, batch = pattern.block_size, 8, 2
    q, k, v = (torch.randn(batch, seq, h, d, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(batch, seq, heads, d, generator=g, dtype=torch.float64)
    dout[:, :a] = 0
    dout[:, e:] = 0
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out_ref, lse_ref = reference_attention(*full, pattern, causal=causal, return_lse=True)
    (out_ref * dout).sum().backward()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    poison = 1e3 * torch.randn(batch, width, kv_heads, d, generator=g, dtype=torch.float64)
    k_p, v_p = (_gather(x, key_blocks, width, B, poison) for x in leaves[1:])
    out, lse = remapped_attention(leaves[0][:, a:e], k_p, v_p, pattern, key_blocks, a, causal=causal,
                                  return_lse=True)
    (out * dout[:, a:e]).sum().backward()
    assert _rel(out, out_ref[:, a:e]) < TOL
    assert _rel(lse, lse_ref[:, :, a:e]) < TOL
    for name, x, y in zip("qkv", leaves, full):
        assert _rel(x.grad, y.grad) < TOL, f"d{name}"


PATTERNS = {
    # (pattern, heads, kv_heads); GQA, a dense group, homogeneous with an offset, a mask, shared dense
    "gqa": (local_stride(6, 4096, 16, 2, 3, num_kv_heads=2), 6, 2),
    "dense_group": (local_stride(4, 4096, 16, 1, 4, num_kv_heads=2, num_dense_heads=1), 4, 2),
    "homogeneous": (local_stride(4, 4096, 16, 2, 5, homogeneous=True, head_offset=1), 4, 4),
    "mask": (from_mask(torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(3)) < 0.3, 16), 2, 1),
    "shared_dense": (dense(4096, 16), 2, 1),
    "bidirectional": (local_stride(4, 4096, 16, 2, 3, num_kv_heads=2, causal=False), 4, 2),
}


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_context_parallel_layouts_match_the_reference(name, world):
    """Every chunk of every rank, in context parallelism's packed layout (odd chunk lengths when causal)."""
    pattern, heads, kv_heads = PATTERNS[name]
    seq = 2 * world * (16 * 2 if not pattern.causal else 23)
    for rank in range(world):
        plan = _plan_for(pattern, seq, world, rank, heads, kv_heads, pattern.causal)
        for chunk in plan.chunks:
            e = chunk.a + chunk.rows.stop - chunk.rows.start
            _check(pattern, heads, kv_heads, seq, chunk.a, e, chunk.key_blocks, chunk.width, seed=rank)


@pytest.mark.parametrize("name", ["gqa", "dense_group", "homogeneous", "mask", "bidirectional"])
@pytest.mark.parametrize("a,e", [(0, 7), (37, 101), (80, 160), (250, 333)])
def test_random_supersets_with_padding(name, a, e):
    """A random superset of the blocks each kv head reads (blocks the rule skips are never read), any padding."""
    pattern, heads, kv_heads = PATTERNS[name]
    B, seq = pattern.block_size, 333 if pattern.causal else 336  # non-causal: whole blocks only
    if not pattern.causal:
        a, e = a // B * B, min(-(-e // B) * B, seq)  # non-causal: whole blocks (the queries' keys come last)
    gen = torch.Generator().manual_seed(a + e)
    lo, hi, n = a // B, (e - 1) // B, -(-seq // B)
    j = torch.arange(n)
    own = (j >= lo) & (j <= hi)
    rows = []
    for g in range(kv_heads):
        per = heads // kv_heads
        need = needed_key_blocks(pattern, torch.arange(g * per, (g + 1) * per), lo, hi, seq)
        extra = torch.rand(n, generator=gen) < 0.3
        outside = (need | extra) & ~own & ((j < lo) if pattern.causal else True)
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        rows.append(torch.cat([torch.full((pad,), -1), j[outside], j[own]]))
    n_packed = max(len(r) for r in rows)
    key_blocks = torch.stack([torch.cat([torch.full((n_packed - len(r),), -1), r]) for r in rows]).to(torch.int32)
    width = (n_packed - 1) * B + min(e, seq) - hi * B
    _check(pattern, heads, kv_heads, seq, a, e, key_blocks, width)


def test_causal_override_drops_token_causality_only():
    pattern, heads, kv_heads = PATTERNS["gqa"]
    plan = _plan_for(pattern, 4 * 32, 2, 1, heads, kv_heads, False)  # whole-block chunks, as CP asks then
    for chunk in plan.chunks:
        _check(pattern, heads, kv_heads, 4 * 32, chunk.a, chunk.a + 32, chunk.key_blocks, chunk.width, causal=False)


def test_the_table_path_on_request_equals_the_remap():
    """``via_tables``: the packed mask through the kernels (the interpreter here), for comparison."""
    pattern = local_stride(2, 4096, 16, 1, 2, num_kv_heads=1)
    plan = _plan_for(pattern, 4 * 20, 2, 1, 2, 1, True)
    g = torch.Generator().manual_seed(5)
    for chunk in plan.chunks:
        q = torch.randn(1, 20, 2, 8, generator=g)
        k, v = (torch.randn(1, chunk.width, 1, 8, generator=g) for _ in range(2))
        want = remapped_attention(q.double(), k.double(), v.double(), pattern, chunk.key_blocks, chunk.a)
        got = remapped_attention(q, k, v, pattern, chunk.key_blocks, chunk.a, via_tables=True)
        assert _rel(got.double(), want) < 1e-4


def test_errors_name_the_argument():
    pattern = local_stride(2, 4096, 16, 1, 2)
    q, k = torch.randn(1, 20, 2, 8), torch.randn(1, 48, 2, 8)
    blocks = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="key_blocks: expected"):
        remapped_attention(q, k, k, pattern, blocks[:, :2], 28)
    with pytest.raises(ValueError, match="query_start=29"):
        remapped_attention(q, k, k, pattern, blocks, 29)
    with pytest.raises(ValueError, match="seqlen_q=20 > seqlen_k=16"):
        remapped_attention(q, k[:, :16], k[:, :16], pattern, blocks[:, :1], 0)


# --------------------------------------------------------------------------- the kernels' remapped rule path
RULE_PATTERNS = [name for name in PATTERNS if PATTERNS[name][0].rule is not None]


def _run(fn, q, k, v, dout):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    (out * dout).sum().backward()
    return [out, lse] + [x.grad for x in leaves]


def _compare(pattern, heads, kv_heads, seq, chunk, seed, d=16, check_tables=True):
    """Kernel remap vs the fp64 remapped reference (and vs the table path, fp32) on one chunk."""
    g = torch.Generator().manual_seed(seed)
    sq = chunk.rows.stop - chunk.rows.start
    q = torch.randn(1, sq, heads, d, generator=g)
    k, v = (torch.randn(1, chunk.width, kv_heads, d, generator=g) for _ in range(2))
    dout = torch.randn(1, sq, heads, d, generator=g)
    assert remap_layout(chunk.key_blocks, chunk.a, sq, chunk.width, pattern.block_size) is not None
    seen = []
    with kernel_plan.plan_overrides(observe=seen.append, poison=True):
        got = _run(lambda *x: remapped_attention(*x, pattern, chunk.key_blocks, chunk.a, return_lse=True),
                   q, k, v, dout)
    assert any("remapped rule" in p.call for p in seen), seen
    want = _run(lambda *x: reference_attention_remapped(*x, pattern, chunk.key_blocks, chunk.a, return_lse=True),
                q.double(), k.double(), v.double(), dout.double())
    for name, x, y in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        assert _rel(x.double(), y) < 2e-5, name
    if check_tables:
        tables = _run(lambda *x: remapped_attention(*x, pattern, chunk.key_blocks, chunk.a, return_lse=True,
                                                    via_tables=True), q, k, v, dout)
        for name, x, y in zip(["out", "lse", "dq", "dk", "dv"], got, tables):
            assert _rel(x.double(), y.double()) < 2e-5, f"{name} vs tables"


@pytest.mark.parametrize("name", RULE_PATTERNS)
@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_layouts(name, world):
    """Every chunk of every rank (odd chunk lengths when causal): GQA, a dense group, homogeneous, dense,
    bidirectional; block 16."""
    pattern, heads, kv_heads = PATTERNS[name]
    seq = 2 * world * (16 * 2 if not pattern.causal else 23)
    for rank in range(world):
        plan = _plan_for(pattern, seq, world, rank, heads, kv_heads, pattern.causal)
        for chunk in plan.chunks:
            _compare(pattern, heads, kv_heads, seq, chunk, seed=rank)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sizes(block, causal):
    """Blocks 16 / 32 / 64 (one key tile holding several blocks, one block per tile), GQA with a dense group."""
    pattern = local_stride(4, 1 << 14, block, 2, 3, num_kv_heads=2, num_dense_heads=1, causal=causal)
    world = 2
    seq = 2 * world * (block * 3 if not causal else block * 3 - 5)
    for rank in range(world):
        plan = _plan_for(pattern, seq, world, rank, 4, 2, causal)
        for chunk in plan.chunks:
            _compare(pattern, 4, 2, seq, chunk, seed=rank, check_tables=block == 32)


def test_no_mask_or_table_is_built(monkeypatch):
    """The kernel remap path builds no ``(heads, n, n)`` mask and no CSR tables."""
    def fail(*args, **kwargs):
        raise AssertionError("a mask or table builder was called on the kernel remap path")

    for module, name in ((remap_module, "from_mask"), (patterns, "from_mask"), (lowering, "block_tables"),
                         (lowering, "_tile_bits"), (remap_module, "remapped_mask_pattern")):
        monkeypatch.setattr(module, name, fail)
    pattern, heads, kv_heads = PATTERNS["gqa"]
    plan = _plan_for(pattern, 4 * 23, 2, 1, heads, kv_heads, True)
    for chunk in plan.chunks:
        _compare(pattern, heads, kv_heads, 4 * 23, chunk, seed=1, check_tables=False)


def test_layouts_the_kernels_do_not_take_fall_back():
    """The kernels take a map whose rows are padding, outside blocks (any order), then the queries' own blocks as
    an absolute-contiguous suffix; any other is not theirs (the caller then gets the table path on a GPU, the
    reference elsewhere)."""
    def layout(row, sq=16):
        return remap_layout(torch.tensor([row], dtype=torch.int32), 64 - sq, sq, 64, 16)

    assert layout([0, 2, 1, 3]) == (0, 3)
    assert layout([-1, 2, 0, 3]) == (0, 3)
    assert layout([0, 3, 2, 3]) is None  # an outside block inside the own range
    assert layout([0, -1, 1, 3]) is None  # padding after a block
    assert layout([0, 1, 5, 3], sq=32) is None  # a query's block not in the own suffix


def test_reference_chunks_recompute_their_own_scores():
    """With gradients the remapped reference recomputes each (kv head, query chunk)'s scores in the backward:
    each chunk must recompute with its own block map and query range (several kv heads with different maps,
    many small chunks), giving the gradients of one unchunked pass."""
    pattern = local_stride(4, 1024, 16, 2, 3, num_kv_heads=2)
    plan = _plan_for(pattern, 1024, 2, 1, 4, 2, True)
    chunk = max(plan.chunks, key=lambda c: c.rows.stop - c.rows.start)
    assert not torch.equal(chunk.key_blocks[0], chunk.key_blocks[1])
    g = torch.Generator().manual_seed(0)
    sq = chunk.rows.stop - chunk.rows.start
    q, dout = (torch.randn(1, 4, sq, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 2, chunk.width, 8, generator=g, dtype=torch.float64) for _ in range(2))
    grads = []
    for chunk_size in (40, 10**6):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = reference.attend_remapped(*leaves, pattern, chunk.key_blocks, chunk.a, 8**-0.5, True,
                                           chunk_size=chunk_size)
        (out * dout).sum().backward()
        grads.append([x.grad for x in leaves])
    for name, x, y in zip("qkv", *grads):
        assert _rel(x, y) < TOL, f"d{name}"
