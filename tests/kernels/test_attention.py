"""Triton forward/backward kernels against the float64 reference.

On the CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``), on small shapes;
on a GPU the same tests run at the sizes given by ``S2ATTN_TEST_SCALE`` (default 1).
"""

import os

import pytest
import torch

import s2attn
from s2attn import ops
from s2attn.kernels import launch
from s2attn.kernels.plan import Tiles, plan_overrides, tma_strides, warp_specialised_blocker
from s2attn.patterns import from_mask, local_stride

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or launch.interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = int(os.environ.get("S2ATTN_TEST_SCALE", "1"))
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
QUICK = pytest.mark.quick  # `make test-quick`: one case per feature


@pytest.fixture(autouse=True)
def poison():
    with plan_overrides(poison=True):
        yield


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """‖x - ref‖ / ‖ref‖; a (near-)zero reference, e.g. dq of a query with a single key, is
    compared absolutely against ``floor``."""
    assert torch.isfinite(x).all(), "non-finite values (unwritten output?)"
    return ((x.double() - ref).norm() / ref.norm().clamp_min(floor)).item()


def make_qkv(batch, seq_q, seq_k, heads, kv_heads, dim, dtype, layout="bshd", gen=None):
    def mk(s, h):
        shape = (batch, s, h, dim) if layout == "bshd" else (batch, h, s, dim)
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)

    return mk(seq_q, heads), mk(seq_k, kv_heads), mk(seq_k, kv_heads)


def check(q, k, v, pattern, *, layout="bshd", causal=None, with_lse=False, deterministic=False, scale=None,
          grad_tol=None):
    """Forward (out, lse) and gradients of q, k, v (and of lse) against the fp64 reference."""
    causal = pattern.causal if causal is None else causal
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tol = TOL[q.dtype]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # views stay views: strides reach the kernels
    out, lse = ops.attention(*leaves, pattern, softmax_scale=scale, causal=causal, layout=layout,
                             return_lse=True, deterministic=deterministic)
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = s2attn.reference_attention(*ref_leaves, pattern, softmax_scale=scale, causal=causal,
                                                  layout=layout, return_lse=True)
    assert rel_err(out, ref_out.to(DEVICE)) <= tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite), "empty rows must have lse -inf"
    assert (lse.cpu().double()[finite] - ref_lse[finite]).abs().max() <= 10 * tol
    assert (out.cpu()[~finite.transpose(1, 2) if layout == "bshd" else ~finite] == 0).all()
    torch.manual_seed(1234)  # the same output gradients for the same shapes (determinism tests)
    d_out = torch.randn_like(out)
    if with_lse:
        d_lse = torch.randn_like(lse)
        torch.autograd.backward([out, lse], [d_out, d_lse])
        ref_d_lse = torch.where(finite, d_lse.double().cpu(), 0.0)
        torch.autograd.backward([ref_out, ref_lse], [d_out.double().cpu(), ref_d_lse])
    else:
        out.backward(d_out)
        ref_out.backward(d_out.double().cpu())
    for name, x, r in zip("qkv", leaves, ref_leaves):
        assert rel_err(x.grad, r.grad.to(DEVICE)) <= (grad_tol or tol), f"d{name}"
    return [x.grad for x in leaves]


@pytest.mark.parametrize("block", [pytest.param(16, marks=QUICK), 32, 64, pytest.param(128, marks=QUICK)])
def test_local_stride_blocks(block):
    """Merge-Q (block < query tile), sub-tiled keys (block > key tile), odd length."""
    seq = 3 * block + 7
    pattern = local_stride(4, 1024 * SCALE, block, local_blocks=2, vert_stride=3, num_kv_heads=2)
    check(*make_qkv(1, seq, seq, 4, 2, 32, torch.float32), pattern)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=QUICK)])
def test_half_precision(dtype):
    pattern = local_stride(4, 2048, 32, local_blocks=2, vert_stride=4, num_kv_heads=1)
    check(*make_qkv(1, 233, 233, 4, 1, 64, dtype), pattern)


@pytest.mark.parametrize("dim", [64, pytest.param(80, marks=QUICK), 96, 128, 256])
def test_head_dims(dim):
    pattern = local_stride(2, 512, 64, local_blocks=1, vert_stride=2)
    check(*make_qkv(1, 200, 200, 2, 2, dim, torch.float32), pattern)


def test_big_blocks_half_precision():
    """Block 256 in bf16 at head dim 128: four key tiles to a block, through TMA on the GPU (an unrolled
    loop over them once needed 410 KB of shared memory)."""
    pattern = local_stride(2, 4096, 256, local_blocks=1, vert_stride=2)
    check(*make_qkv(1, 700, 700, 2, 1, 128, torch.bfloat16), pattern)


def test_wide_head_half_precision():
    pattern = local_stride(2, 512, 64, local_blocks=1, vert_stride=2)
    check(*make_qkv(1, 200, 200, 2, 1, 256, torch.bfloat16), pattern)


@pytest.mark.parametrize("seq_q, seq_k", [(1, 1), (1, 300), pytest.param(77, 300, marks=QUICK), (1000, 1000)])
def test_lengths_end_aligned(seq_q, seq_k):
    """Queries end-aligned to keys (chunked prefill, decode) and odd lengths."""
    pattern = local_stride(2, 1024, 64, local_blocks=2, vert_stride=4)
    check(*make_qkv(1, seq_q, seq_k, 2, 2, 32, torch.float32), pattern)


@QUICK
def test_bidirectional():
    pattern = local_stride(4, 512, 16, local_blocks=2, vert_stride=3, num_kv_heads=2, causal=False)
    check(*make_qkv(1, 150, 150, 4, 2, 32, torch.float32), pattern)


def test_bidirectional_fewer_queries():
    pattern = local_stride(2, 512, 32, local_blocks=1, vert_stride=3, causal=False)
    check(*make_qkv(1, 40, 150, 2, 2, 32, torch.float32), pattern)


def test_dense_heads_homogeneous_offset_and_slices():
    pattern = local_stride(8, 1024, 16, local_blocks=2, vert_stride=4, num_kv_heads=4, num_dense_heads=1,
                           head_offset=1, head_step=3)
    q, k, v = make_qkv(1, 250, 250, 8, 4, 32, torch.float32)
    check(q, k, v, pattern)
    # a head slice (head parallelism) keeps each head's global rule
    check(q[:, :, 2:6], k[:, :, 1:3], v[:, :, 1:3], pattern.heads(2, 6))
    check(q, k, v, local_stride(8, 1024, 16, local_blocks=2, vert_stride=4, homogeneous=True))


def test_bhsd_and_strided_views():
    """bhsd layout, and q/k/v as non-contiguous views of one packed projection."""
    pattern = local_stride(4, 512, 32, local_blocks=2, vert_stride=3, num_kv_heads=2)
    check(*make_qkv(2, 130, 130, 4, 2, 32, torch.float32, layout="bhsd"), pattern, layout="bhsd")
    qkv = torch.randn(2, 130, 4 + 2 + 2, 32, device=DEVICE)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    assert not q.is_contiguous()
    check(q, k, v, pattern)


@QUICK
def test_views_tma_cannot_read():
    """q, k, v as views 4 bytes off 16-byte alignment: every kernel reads them with plain loads, not TMA."""
    pattern = local_stride(4, 512, 32, local_blocks=2, vert_stride=3, num_kv_heads=2)
    qkv = torch.randn(1, 130, 4 + 2 + 2, 33, device=DEVICE)[..., 1:]
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    assert all(tma_strides(x) is None for x in (q, k, v))
    plans = []
    with plan_overrides(observe=plans.append):
        check(q, k, v, pattern)
    assert plans and not any(x.tma for p in plans for x in p.launches)


@QUICK
def test_lse_gradient_and_scale():
    pattern = local_stride(2, 512, 16, local_blocks=2, vert_stride=4)
    check(*make_qkv(1, 100, 100, 2, 2, 32, torch.float32), pattern, with_lse=True, scale=0.3)


@QUICK
def test_mask_pattern_tables_with_empty_rows():
    """An arbitrary per-head mask through the index tables; some query blocks read nothing."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 12, 12, generator=gen) < 0.4
    mask[:, 4] = False  # an empty query block: output 0, lse -inf
    mask[1, :, 0] = True  # a long column
    for causal in (True, False):
        pattern = from_mask(mask.tril() if causal else mask, 16, causal=causal)
        check(*make_qkv(1, 181, 181, 3, 3, 32, torch.float32, gen=gen), pattern)
    shared = from_mask(torch.rand(12, 12, generator=gen) < 0.5, 32)
    check(*make_qkv(1, 300, 300, 4, 2, 32, torch.float32, gen=gen), shared)


# ---------------------------------------------------------------- found by the differential fuzz (tests/differential.py)
@pytest.mark.parametrize("seq_q", [1, 70])
def test_table_columns_with_fewer_queries_than_keys(seq_q):
    """A mask pattern's columns list absolute query tiles from tile 0; with fewer queries than keys (and past
    512 keys, so a column is split across programs) the splits must start at the first query's tile, not at
    tile 0 (dK and dV were all zero at one query over 513 keys)."""
    pattern = from_mask(torch.ones(1, 9, 9, dtype=torch.bool), 64, causal=False)
    check(*make_qkv(1, seq_q, 513, 1, 1, 16, torch.float32), pattern)
    check(*make_qkv(1, seq_q, 513, 2, 1, 16, torch.float32), pattern, causal=True)


def test_table_columns_varlen_and_causal_rule_called_bidirectionally():
    """The same through packed sequences (one query over 513 keys beside a full sequence), and a causal
    rule called with ``causal=False`` (which takes the table path)."""
    pattern = local_stride(2, 640, 64, local_blocks=2, vert_stride=3)
    check(*make_qkv(1, 3, 600, 2, 2, 16, torch.float32), pattern, causal=False)
    lens_q, lens_k = [1, 130], [513, 130]
    cu_q, cu_k = (torch.tensor([0] + n, device=DEVICE).cumsum(0).to(torch.int32) for n in (lens_q, lens_k))
    mask = from_mask(torch.ones(9, 9, dtype=torch.bool), 64, causal=False)
    q = torch.randn(sum(lens_q), 2, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 1, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 513, mask, softmax_scale=0.25, causal=False,
                               return_lse=False)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = s2attn.reference_attention_varlen(*leaves, cu_q.cpu(), cu_k.cpu(), mask, softmax_scale=0.25)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    ref.backward(d_out.double().cpu())
    assert rel_err(out, ref.to(DEVICE)) <= 1e-4
    for name, x, r in zip("qkv", (q, k, v), leaves):
        assert rel_err(x.grad, r.grad.to(DEVICE)) <= 1e-4, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_queries(dtype):
    """No queries (a batch of 2): empty out and lse, zero dK / dV, no TMA descriptor of an empty tensor."""
    pattern = local_stride(2, 256, 16, local_blocks=2, vert_stride=4)
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 0, 40, 2, 2, 16, dtype))
    out, lse = ops.attention(q, k, v, pattern, softmax_scale=0.25, causal=True, layout="bshd", return_lse=True)
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and (k.grad == 0).all() and (v.grad == 0).all()


def test_varlen_generous_max_seqlen_on_both_paths():
    """``max_seqlen_k`` past the pattern's length is accepted alike on the rule and the mask path."""
    rule = local_stride(2, 128, 16, local_blocks=2, vert_stride=3)
    for pattern in (rule, from_mask(rule.block_mask(128), 16)):
        cu = torch.tensor([0, 50, 120], dtype=torch.int32, device=DEVICE)
        q, k, v = (torch.randn(120, 2, 16, device=DEVICE) for _ in range(3))
        out = s2attn.sparse_attention_varlen(q, k, v, cu, cu, 4096, 4096, pattern)
        ref = s2attn.reference_attention_varlen(q.double().cpu(), k.double().cpu(), v.double().cpu(), cu.cpu(),
                                                cu.cpu(), pattern)
        assert rel_err(out, ref.to(DEVICE)) <= 1e-4


@QUICK
def test_varlen_packed():
    pattern = local_stride(4, 1024, 16, local_blocks=2, vert_stride=3, num_kv_heads=2)
    lens_q, lens_k = [1, 100, 37, 64], [50, 100, 90, 64]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), 4, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 32, device=DEVICE, requires_grad=True)
    out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), pattern, softmax_scale=0.2,
                                    causal=True, return_lse=True)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = s2attn.reference_attention_varlen(*leaves, cu_q.cpu(), cu_k.cpu(), pattern, softmax_scale=0.2,
                                                     return_lse=True)
    assert rel_err(out, ref.to(DEVICE)) <= 1e-4
    assert (lse.double().cpu() - ref_lse).abs().max() <= 1e-4
    d_out = torch.randn_like(out)
    out.backward(d_out)
    ref.backward(d_out.double().cpu())
    for x, r in zip((q, k, v), leaves):
        assert rel_err(x.grad, r.grad.to(DEVICE)) <= 1e-4


@pytest.mark.parametrize("block", [32, 64])
def test_varlen_neighbour_nan_stays_out(block):
    """TMA tiles of a packed sequence overhang into its neighbours (keys past the end; query rows before
    the start or past the end): NaN everywhere in the middle sequence leaves the others' outputs and
    gradients as they were."""
    pattern = local_stride(2, 1024, block, local_blocks=2, vert_stride=3)
    lens_q, lens_k = [70, 90, 45], [70, 90, 60]  # the last sequence's queries start 15 keys in
    cu_q, cu_k = (torch.tensor([0] + n, device=DEVICE).cumsum(0).to(torch.int32) for n in (lens_q, lens_k))
    q, g = (torch.randn(sum(lens_q), 2, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(sum(lens_k), 2, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))

    def run(q, k, v, g):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ops.attention_varlen(*leaves, cu_q, cu_k, 90, 90, pattern, softmax_scale=0.2, causal=True,
                                   return_lse=False)
        out.backward(g)
        return [out] + [x.grad for x in leaves]

    clean = run(q, k, v, g)
    poisoned = [x.clone() for x in (q, k, v, g)]
    for x, cu in zip(poisoned, (cu_q, cu_k, cu_k, cu_q)):
        x[cu[1]:cu[2]] = float("nan")
    for name, a, b, cu in zip(("out", "dq", "dk", "dv"), clean, run(*poisoned), (cu_q, cu_q, cu_k, cu_k)):
        for lo, hi in ((0, cu[1]), (cu[2], cu[3])):
            assert torch.isfinite(b[lo:hi]).all(), name
            assert rel_err(b[lo:hi], a[lo:hi].double()) <= 1e-2, name


def test_deterministic_backward_is_bit_identical():
    pattern = local_stride(4, 4096, 16, local_blocks=2, vert_stride=3, num_kv_heads=2)
    q, k, v = make_qkv(1, 600, 600, 4, 2, 32, torch.float32)
    first = check(q, k, v, pattern, deterministic=True)
    second = check(q, k, v, pattern, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("as_mask", [pytest.param(False, marks=QUICK), True])
def test_split_columns_match_unsplit(as_mask):
    """Long vertical columns split across programs (atomics) equal the single-program result,
    for the closed-form rule (the long pass) and for its mask twin through the tables (split columns)."""
    pattern = local_stride(2, 389, 16, local_blocks=1, vert_stride=4, num_dense_heads=1)
    if as_mask:
        pattern = from_mask(pattern.block_mask(389), 16)
    q, k, v = make_qkv(1, 389, 389, 2, 2, 32, torch.float32)
    plans = []
    with plan_overrides(dkdv_chunk=1, dkdv_splits=64, observe=plans.append):
        split = check(q, k, v, pattern)
        single = check(q, k, v, pattern, deterministic=True)
    split_plan, single_plan = (p for p in plans if p.dkdv is not None)
    split_pass = split_plan.dkdv if as_mask else split_plan.dkdv_long
    assert split_pass.atomic and not single_plan.dkdv.atomic and not single_plan.launches[1].atomic
    for a, b in zip(split, single):
        assert rel_err(a, b.double()) <= 1e-5


@pytest.mark.parametrize("block, causal", [pytest.param(16, True, marks=QUICK), (16, False), (64, True), (64, False)])
def test_key_block_pairs(block, causal):
    """Forward and dQ reading unmasked key blocks two at a time (the forward's default past 32k keys):
    vertical ones stride apart, window ones adjacent, dense heads' consecutive ones, odd ones left over."""
    seq = 21 * block + 5
    pattern = local_stride(4, 4096, block, local_blocks=2, vert_stride=2, num_kv_heads=2, num_dense_heads=1,
                           causal=causal)
    with plan_overrides(tiles={kernel: Tiles(64, block, 4, 1, pairs=True) for kernel in ("fwd", "dq")}):
        check(*make_qkv(1, seq, seq, 4, 2, 32, torch.float32), pattern)


@pytest.mark.parametrize("block_n", [32, 128])
def test_long_column_tiles(block_n):
    """The dK/dV long pass with two columns to a key tile (block_n 128), and with each block cut into
    two key tiles (block_n 32); a dense head, and kv heads shared by query heads of different
    vertical offsets (the pattern's groups are single heads)."""
    pattern = local_stride(4, 4096, 64, local_blocks=2, vert_stride=3, num_dense_heads=1)
    with plan_overrides(tiles={"dkdv_long": Tiles(32, block_n, 4, 1)}):
        check(*make_qkv(1, 1100, 1100, 4, 2, 32, torch.float32), pattern)


@QUICK
def test_long_pass_order():
    """The long pass's launch order: split by split (the last queries first), head by head, the most work
    first within a head; slots with nothing to do left out, unless the first query tile is not known."""
    tiles, splits, heads = 8, 3, 2  # key tile t's columns open at query tile 8t + 2 of 64; splits of 22 tiles
    order = launch._long_order(tiles, 1, splits, 22, 4, 64, 32, 32, 64, 0, True, heads, torch.device("cpu"))
    decoded = [(code // heads // splits, code // heads % splits, code % heads) for code in order.tolist()]
    by_tile = {  # split 2 (tiles 44-63): 20 tiles for key tiles 0-5, 14, 6; split 1: 22 x3, 18, 10, 2; split 0
        2: [0, 1, 2, 3, 4, 5, 6, 7], 1: [0, 1, 2, 3, 4, 5], 0: [0, 1, 2]}  # 20, 12, 4 (key tiles 3+ open later)
    expected = [(t, split, h) for split in (2, 1, 0) for h in range(heads) for t in by_tile[split]]
    assert decoded == expected
    packed = launch._long_order(tiles, 1, splits, 22, 4, 64, 32, 32, 64, None, True, heads, torch.device("cpu"))
    assert sorted(packed.tolist()) == list(range(tiles * splits * heads))


@QUICK
@pytest.mark.parametrize("n, lead", [(8, 0), (7, 0), (9, 3), (8, 2)])
def test_tma_rows(n, lead):
    """lse / delta as the Gluon long pass reads them through TMA: the same values, ``lead`` zeros before each
    row, rows 16 bytes apart and each starting ``lead`` entries after a 16-byte boundary; the empty twin strided
    alike; a tensor that already is so, itself."""
    x = torch.randn(2, 3, n)
    y = launch._tma_rows(x, lead)
    assert torch.equal(y, x)
    assert y.stride(1) % 4 == 0 and y.stride(0) == 3 * y.stride(1) and (y.storage_offset() - lead) % 4 == 0
    before = torch.as_strided(y, (2, 3, lead), (y.stride(0), y.stride(1), 1), y.storage_offset() - lead)
    assert not before.any()
    assert launch._tma_rows(x, lead, copy=False).stride() == y.stride()
    assert (launch._tma_rows(x, lead) is x) == (lead == 0 and n % 4 == 0)


@pytest.mark.parametrize("long_m, short_m", [(32, 64), (64, 32)])
@pytest.mark.parametrize("block", [16, 32])
def test_long_pass_own_query_tile(long_m, short_m, block):
    """The two dK/dV passes on query tiles of different sizes: a long column's full tiles start at a
    multiple of both, so no (query, key) pair is counted twice or missed, also where a tile of the
    bigger size holds several pattern blocks; fewer queries than keys (end-aligned)."""
    pattern = local_stride(2, 4096, block, local_blocks=2, vert_stride=3, num_dense_heads=1)
    with plan_overrides(tiles={"dkdv_long": Tiles(long_m, 64, 4, 1), "dkdv": Tiles(short_m, block, 4, 1)}):
        check(*make_qkv(1, 397, 421, 2, 2, 32, torch.float32), pattern)


WARP_SPECIALISED = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
                    and launch.GluonDescriptor is not None)


@QUICK
@pytest.mark.skipif(launch.GluonDescriptor is None, reason="needs Gluon (Triton >= 3.5)")
def test_warp_specialised_only_where_they_apply():
    """The Gluon kernels' dispatch (whatever the device, as if it were an H100): 16-bit tensors TMA can
    address, head dims 64 and 128, any pattern block (K and V in tiles of the block under 64); not fp32,
    other head dims, packed sequences, mask tables, views off 16-byte alignment, no queries, or a GPU without
    ``wgmma``."""

    def tensors(dtype=torch.bfloat16, dim=128, offset=0, queries=256):
        qkv = torch.zeros(1, 256, 3, dim + offset, dtype=dtype)[..., offset:]
        q, k, v = (x.unsqueeze(2) for x in qkv.unbind(2))
        return q[:, :queries], k, v, q[:, :queries], torch.zeros(1, 1, queries)

    def blocker(varlen=False, table=False, **case):
        return warp_specialised_blocker(*tensors(**case), varlen, table)

    with plan_overrides(hopper=True):
        assert blocker() == "" and blocker(dtype=torch.float16, dim=64) == ""
        q, k, v, do, _ = tensors()
        assert [d.block_shape[1] for d in launch._hopper_descriptors(q, k, v, do, 16)] == [64, 64, 16, 16]
        for case in (dict(dtype=torch.float32), dict(dim=96), dict(dim=256), dict(varlen=True), dict(table=True),
                     dict(offset=4), dict(queries=0)):
            assert blocker(**case), case
        with plan_overrides(hopper=False):
            assert blocker() == "not an sm_90 GPU"


@pytest.mark.skipif(not WARP_SPECIALISED, reason="the warp-specialised kernels need Gluon and an sm_90 GPU")
@pytest.mark.parametrize("block, dim, dtype", [(16, 128, torch.bfloat16), (32, 64, torch.float16),
                                               (64, 128, torch.bfloat16), (128, 64, torch.float16),
                                               (128, 128, torch.bfloat16), (256, 128, torch.bfloat16)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_warp_specialised_kernels(block, dim, dtype, causal, deterministic):
    """The Gluon dQ and long pass (Hopper) against the reference and against the Triton kernels: four or
    two columns to a warpgroup, opening one after another (blocks 16, 32), two long columns to a 128-key
    tile (64), half a block a warpgroup (128), two tiles to a block (256); two or four key tiles to a block
    in dQ (which takes blocks of 64 and more); head dims 128 and 64; batch 2, GQA, a dense head, fewer queries
    than keys (end-aligned, odd: lse / delta rows read through TMA from a padded layout), a last column cut
    short; split columns (atomics) and deterministic (stores, and the lse gradient)."""
    pattern = local_stride(4, 8192, block, local_blocks=2, vert_stride=3, num_kv_heads=2, num_dense_heads=1,
                           causal=causal)
    q, k, v = make_qkv(2, 2900 - block // 2 - 3, 2900, 4, 2, dim, dtype)
    plans = []
    with plan_overrides(ws_dq_from=0, observe=plans.append):  # dQ's Gluon kernel runs past 32k keys by default
        ws = check(q, k, v, pattern, deterministic=deterministic, with_lse=deterministic)
        if deterministic:  # stores, no atomics: bit-identical run to run
            for a, b in zip(ws, check(q, k, v, pattern, deterministic=True, with_lse=True)):
                assert torch.equal(a, b)
    backward = [p for p in plans if p.dkdv is not None]
    assert backward and all(p.dkdv_long.warp_specialised and p.dq.warp_specialised == (block >= 64)
                            for p in backward), "the warp-specialised kernels did not run"
    with plan_overrides(warp_specialised={"dq": False, "dkdv_long": False}):
        triton_grads = check(q, k, v, pattern, deterministic=deterministic, with_lse=deterministic)
    for a, b in zip(ws, triton_grads):
        assert rel_err(a, b.double()) <= 4e-3


def _forward(q, k, v, pattern, **settings):
    """Out and lse of the forward alone, under ``plan_overrides(**settings)``, and the kernels it ran."""
    plans = []
    with plan_overrides(observe=plans.append, **settings):
        out, lse = ops.attention(q, k, v, pattern, softmax_scale=q.shape[-1] ** -0.5, causal=pattern.causal,
                                 layout="bshd", return_lse=True)
    return out, lse, [p.fwd.kernel for p in plans]


@pytest.mark.skipif(not WARP_SPECIALISED, reason="the warp-specialised kernels need Gluon and an sm_90 GPU")
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dim, dtype", [(128, torch.bfloat16), (64, torch.float16)])
@pytest.mark.parametrize("causal", [True, False])
def test_warp_specialised_forward(block, dim, dtype, causal):
    """The Gluon forward (Hopper; off unless asked for) against the reference (out, lse, and the gradients of the
    backward that reads its lse) and against the Triton forward: 128-key tiles of eight, four or two pattern blocks
    (16, 32, 64: from different segments, masked per key) or of one block or half of one (128, 256); head dims 128
    and 64; causal and bidirectional; batch 2, GQA, a dense head, fewer queries than keys and both lengths odd (a
    query tile that starts before the first query, a last key block cut short)."""
    pattern = local_stride(4, 8192, block, local_blocks=2, vert_stride=3, num_kv_heads=2, num_dense_heads=1,
                           causal=causal)
    q, k, v = make_qkv(2, 2900 - block // 2 - 3, 2900, 4, 2, dim, dtype)
    with plan_overrides(warp_specialised={"fwd": True}):
        check(q, k, v, pattern, with_lse=True)
    out, lse, kernels = _forward(q, k, v, pattern, warp_specialised={"fwd": True})
    assert kernels == ["_attn_fwd_ws"]
    triton_out, triton_lse, kernels = _forward(q, k, v, pattern)
    assert kernels == ["_attn_fwd"]
    assert rel_err(out, triton_out.double()) <= 4e-3
    assert torch.equal(torch.isinf(lse), torch.isinf(triton_lse))
    finite = torch.isfinite(lse)
    assert (lse[finite] - triton_lse[finite]).abs().max() <= 1e-3


@pytest.mark.skipif(not WARP_SPECIALISED, reason="the warp-specialised kernels need Gluon and an sm_90 GPU")
@pytest.mark.parametrize("settings", [dict(ws_fwd_pingpong=False), dict(ws_fwd_tiles=Tiles(128, 128, 4, 3)),
                                      dict(ws_fwd_tiles=Tiles(128, 64, 4, 2))])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_warp_specialised_forward_settings(settings, block):
    """The Gluon forward's tuning settings (warpgroups not taking turns, 3 stages, 64-key tiles) give the
    same values; a longer sequence (many vertical blocks a tile), end-aligned queries, one sequence."""
    pattern = local_stride(4, 4099 * SCALE, block, local_blocks=3, vert_stride=4, num_kv_heads=2, num_dense_heads=1)
    q, k, v = make_qkv(1, 3001, 4099 * SCALE, 4, 2, 128, torch.bfloat16)
    out, lse, kernels = _forward(q, k, v, pattern, warp_specialised={"fwd": True}, **settings)
    assert kernels == ["_attn_fwd_ws"]
    ref_out, ref_lse = s2attn.reference_attention(*(x.double().cpu() for x in (q, k, v)), pattern,
                                                  softmax_scale=128**-0.5, causal=True, layout="bshd",
                                                  return_lse=True)
    assert rel_err(out, ref_out.to(DEVICE)) <= TOL[torch.bfloat16]
    assert (lse.cpu().double() - ref_lse).abs().max() <= 10 * TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype, grad_tol", [pytest.param(torch.float16, None, marks=QUICK), (torch.bfloat16, 0.3)])
def test_large_scores_stay_finite(dtype, grad_tol):
    """Scores around 1e3-1e4 (large activations): the online softmax neither overflows nor NaNs,
    and the forward matches. The softmax is nearly one-hot, so dQ/dK rest on the cancellation
    dp - delta with delta = rowsum(dO * O) from the stored O (as in FlashAttention): bf16's
    rounding of O (~4e-3) then shows in the gradients (~15% here), fp16's does not."""
    pattern = local_stride(2, 512, 32, local_blocks=2, vert_stride=3)
    q, k, v = make_qkv(1, 160, 160, 2, 2, 64, dtype)
    check(q * 12, k * 12, v, pattern, scale=1.0, grad_tol=grad_tol)
