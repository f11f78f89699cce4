"""Head- and context-parallel attention on torch.distributed equal the single-process reference.

Multi-process tests spawn 2 or 4 CPU processes on the gloo backend; every process builds the same
full inputs (same seed), runs the single-process reference on them, and checks its own share.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _gloo import run_workers
from torch.utils._python_dispatch import TorchDispatchMode

from s2attn import dense, from_mask, local_stride, lowering, patterns, remap, sparse_attention
from s2attn.integrations.distributed import (
    _plan_for, context_parallel_attention, context_parallel_comm_bytes, head_parallel_attention, head_range,
    kv_head_range, needed_key_blocks, shard_heads, zigzag_merge, zigzag_ranges, zigzag_split,
)
from s2attn.patterns import BlockPattern

TOL = 1e-10  # float64 throughout


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _full_case(seed: int, batch: int, seq: int, heads: int, kv_heads: int, d: int, pattern, causal=None):
    """Full inputs, output cotangent, and the single-process reference's output, lse and gradients."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, h, d, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(batch, seq, heads, d, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = sparse_attention(*leaves, pattern, causal=causal, return_lse=True)
    (out * dout).sum().backward()
    return (q, k, v), dout, out.detach(), lse.detach(), [x.grad for x in leaves]


# ---------------------------------------------------------------------------- context parallel
def _cp_cases():
    """(name, pattern, batch, seq per 2*world chunks, heads, kv_heads, d, causal override)."""
    rng = torch.Generator().manual_seed(1)
    random_mask = (torch.rand(2, 8, 8, generator=rng) < 0.4) | torch.eye(8, dtype=torch.bool)
    return [
        # causal, heterogeneous, GQA, chunks (25 tokens) and sequence not multiples of the block
        ("local_stride_gqa", local_stride(4, 4096, 16, 2, 3, num_kv_heads=2), 2, 25, 4, 2, 8, None),
        # one dense kv group beside a sparse one, homogeneous vertical offset
        ("dense_group", local_stride(4, 4096, 16, 1, 4, num_kv_heads=2, num_dense_heads=1, homogeneous=True),
         1, 16, 4, 2, 8, None),
        ("explicit_mask", from_mask(random_mask.tril(), 16), 1, 16, 2, 1, 4, None),
        ("bidirectional", local_stride(2, 4096, 16, 2, 3, causal=False), 1, 16, 2, 2, 4, None),
        ("shared_dense", dense(4096, 16), 1, 9, 2, 1, 4, None),
        # small enough for the kernels under the Triton interpreter
        ("small_gqa", local_stride(2, 4096, 16, 1, 2, num_kv_heads=1), 1, 20, 2, 1, 8, None),
    ]


def _cp_worker(rank: int, world: int, names: list[str], dtype: torch.dtype = torch.float64) -> None:
    """Float64 runs the reference path; float32 the kernels (under the interpreter on the CPU)."""
    tol = TOL if dtype == torch.float64 else 1e-4
    for name, pattern, batch, chunk, heads, kv_heads, d, causal in _cp_cases():
        if name not in names:
            continue
        seq = 2 * world * chunk
        full, dout, out_ref, lse_ref, grads_ref = _full_case(7, batch, seq, heads, kv_heads, d, pattern, causal)
        local = [zigzag_split(x, rank, world).to(dtype).requires_grad_() for x in full]
        out, lse = context_parallel_attention(*local, pattern, causal=causal, return_lse=True)
        (out * zigzag_split(dout, rank, world).to(dtype)).sum().backward()
        checks = [("out", out, zigzag_split(out_ref, rank, world)), ("lse", lse, zigzag_split(lse_ref, rank, world, 2))]
        checks += [(f"d{n}", x.grad, zigzag_split(g, rank, world)) for n, x, g in zip("qkv", local, grads_ref)]
        for what, got, want in checks:
            err = _rel(got.double(), want)
            assert err < tol, f"{name}, {dtype}, rank {rank}/{world}: {what} differs by {err:.2e}"


def test_context_parallel_two_ranks():
    run_workers(_cp_worker, 2, [c[0] for c in _cp_cases()])


def test_context_parallel_two_ranks_float32():
    run_workers(_cp_worker, 2, ["small_gqa"], torch.float32)


def test_context_parallel_four_ranks():
    run_workers(_cp_worker, 4, ["local_stride_gqa", "explicit_mask"])


def test_context_parallel_one_rank_without_process_group():
    name, pattern, batch, chunk, heads, kv_heads, d, _ = _cp_cases()[0]
    full, _, out_ref, _, _ = _full_case(3, batch, 2 * chunk, heads, kv_heads, d, pattern)
    out = context_parallel_attention(*full, pattern)
    assert _rel(out, out_ref) < TOL


def _cp_bhsd_worker(rank: int, world: int) -> None:
    pattern = local_stride(4, 4096, 16, 2, 3, num_kv_heads=2)
    full, _, out_ref, _, _ = _full_case(5, 1, 4 * world * 16, 4, 2, 8, pattern)
    local = [zigzag_split(x, rank, world).transpose(1, 2) for x in full]
    out = context_parallel_attention(*local, pattern, layout="bhsd")
    assert _rel(out.transpose(1, 2), zigzag_split(out_ref, rank, world)) < TOL


def test_context_parallel_bhsd_layout():
    run_workers(_cp_bhsd_worker, 2)


# ---------------------------------------------------------------------------- head parallel
def _hp_worker(rank: int, world: int, kv_heads: int) -> None:
    heads = 8
    for pattern in (local_stride(heads, 4096, 16, 2, 3, num_kv_heads=kv_heads), dense(4096, 16)):
        full, dout, out_ref, lse_ref, grads_ref = _full_case(11, 2, 45, heads, kv_heads, 8, pattern)
        hs, he = head_range(heads, rank, world)
        ks, ke = kv_head_range(heads, kv_heads, rank, world)
        q, k, v = (x[:, :, a:b].clone().requires_grad_() for x, (a, b) in zip(full, [(hs, he), (ks, ke), (ks, ke)]))
        out, lse = head_parallel_attention(q, k, v, pattern, return_lse=True)
        (out * dout[:, :, hs:he]).sum().backward()
        assert _rel(out, out_ref[:, :, hs:he]) < TOL
        assert _rel(lse, lse_ref[:, hs:he]) < TOL
        assert _rel(q.grad, grads_ref[0][:, :, hs:he]) < TOL
        if ke - ks == kv_heads // world:  # kv heads split: this rank's kv grads are the whole of them
            for x, g in zip((k, v), grads_ref[1:]):
                assert _rel(x.grad, g[:, :, ks:ke]) < TOL
        else:  # replicated kv head: its gradient is the sum over the ranks that share it
            for x, g in zip((k, v), grads_ref[1:]):
                total = torch.zeros_like(g)
                total[:, :, ks:ke] = x.grad
                dist.all_reduce(total)
                assert _rel(total, g) < TOL


@pytest.mark.parametrize("world,kv_heads", [(2, 4), (4, 2)])
def test_head_parallel(world, kv_heads):
    run_workers(_hp_worker, world, kv_heads)


def _tp_cp_worker(rank: int, world: int) -> None:
    """A 2 x 2 mesh: heads split over tensor-parallel pairs, the sequence over context-parallel pairs."""
    tp, cp = 2, 2
    tp_rank, cp_rank = rank % tp, rank // tp
    tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]
    cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]
    heads, kv_heads = 8, 4
    pattern = local_stride(heads, 4096, 16, 2, 3, num_kv_heads=kv_heads)
    full, dout, out_ref, _, grads_ref = _full_case(13, 1, 4 * cp * 12, heads, kv_heads, 8, pattern)
    hs, he = head_range(heads, tp_rank, tp)
    ks, ke = kv_head_range(heads, kv_heads, tp_rank, tp)
    ranges = [(hs, he), (ks, ke), (ks, ke)]
    local = [zigzag_split(x[:, :, a:b], cp_rank, cp).requires_grad_() for x, (a, b) in zip(full, ranges)]
    out = context_parallel_attention(*local, shard_heads(pattern, tp_rank, tp), cp_groups[tp_rank])
    (out * zigzag_split(dout[:, :, hs:he], cp_rank, cp)).sum().backward()
    assert tp_groups[cp_rank] is not None
    assert _rel(out, zigzag_split(out_ref[:, :, hs:he], cp_rank, cp)) < TOL
    for x, g, (a, b) in zip(local, grads_ref, ranges):
        assert _rel(x.grad, zigzag_split(g[:, :, a:b], cp_rank, cp)) < TOL


def test_tensor_and_context_parallel_mesh():
    run_workers(_tp_cp_worker, 4)


# ---------------------------------------------------------------------------- single-process pieces
def test_zigzag_split_merge_roundtrip():
    x = torch.arange(2 * 3 * 24).reshape(2, 24, 3)
    parts = [zigzag_split(x, r, 3) for r in range(3)]
    assert torch.equal(parts[0], torch.cat([x[:, 0:4], x[:, 20:24]], 1))
    assert zigzag_ranges(24, 0, 3) == [(0, 4), (20, 24)]
    assert zigzag_ranges(24, 2, 3) == [(8, 12), (12, 16)]
    assert torch.equal(zigzag_merge(parts), x)
    with pytest.raises(ValueError, match="multiple of 2 \\* world"):
        zigzag_split(x, 0, 5)


@pytest.mark.parametrize("causal", [True, False])
def test_needed_key_blocks_closed_form_matches_mask(causal):
    seq = 16 * 37
    for pattern in (local_stride(8, seq, 16, 3, 5, num_kv_heads=4, causal=causal),
                    local_stride(8, seq, 16, 2, 4, num_kv_heads=2, num_dense_heads=1, causal=causal),
                    local_stride(6, seq, 16, 1, 3, homogeneous=True, head_offset=1, causal=causal).heads(2, 5)):
        as_mask = from_mask(pattern.block_mask(seq), 16, causal=causal)
        heads = pattern.num_heads
        for first, last in [(0, 0), (3, 9), (20, 36), (36, 36)]:
            for group in (torch.arange(heads), torch.tensor([1]), torch.arange(1, heads - 1)):
                want = needed_key_blocks(as_mask, group, first, last, seq)
                assert torch.equal(needed_key_blocks(pattern, group, first, last, seq), want)


def test_comm_bytes_match_a_brute_force_count_and_beat_all_gather():
    heads, kv_heads, d, world, seq = 4, 2, 8, 2, 16 * 64
    pattern = local_stride(heads, seq, 16, 2, 8, num_kv_heads=kv_heads)
    got = context_parallel_comm_bytes(pattern, seq, world, num_kv_heads=kv_heads, head_dim=d, element_size=4)
    mask = pattern.to_token_mask(seq, seq)  # (heads, seq, seq)
    per_kv = mask.reshape(kv_heads, heads // kv_heads, seq, seq).any(1)
    row = 2 * d * 4
    for r in range(world):
        mine = torch.zeros(seq, dtype=torch.bool)
        for a, e in zigzag_ranges(seq, r, world):
            mine[a:e] = True
        needed = per_kv[:, mine].any(1) & ~mine  # (kv_heads, seq): keys read from other ranks
        assert got["sparse"][r] == int(needed.sum()) * row
    assert got["all_gather"] == (world - 1) * (seq // world) * kv_heads * row
    assert got["ratio"] < 0.3


def test_errors_name_the_problem():
    pattern = local_stride(2, 4096, 16, 2, 3, causal=False)
    q = torch.randn(1, 24, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of block_size=16"):
        context_parallel_attention(q, q, q, pattern)  # chunks of 12 tokens, non-causal
    with pytest.raises(ValueError, match="multiple of 2 \\* world"):
        context_parallel_attention(q[:, :23], q[:, :23], q[:, :23], local_stride(2, 4096, 16, 2, 3))
    with pytest.raises(ValueError, match="kv heads"):
        head_parallel_attention(q, q[:, :, :1], q[:, :, :1], local_stride(2, 4096, 16, 2, 3))
    with pytest.raises(ValueError, match="one to divide the other"):
        kv_head_range(12, 3, 0, 2)


# ---------------------------------------------------------------------------- nothing quadratic
class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def test_planning_is_linear_in_the_blocks():
    """Every rank's plan, at 320 blocks on 4 ranks: no tensor past ``2 * kv_heads * (blocks + 2 * world)``
    elements (a packed ``(heads, n, n)`` mask would have ``heads * n * n``)."""
    heads, kv_heads, world, seq = 8, 4, 4, 16 * 320
    pattern = local_stride(heads, seq, 16, 3, 4, num_kv_heads=kv_heads)
    with _LargestTensor() as largest:
        for rank in range(world):
            _plan_for(pattern, seq, world, rank, heads, kv_heads, True)
    assert 0 < largest.numel <= 2 * kv_heads * (320 + 2 * world)


def _refuse(*args, **kwargs):
    raise AssertionError("context parallelism built a (heads, n, n) mask or its index tables")


def _no_mask_worker(rank: int, world: int) -> None:
    """Planning and attention (forward and backward) of a rule pattern with the mask and table builders
    made to fail; the single-process reference runs before they are."""
    pattern = local_stride(4, 4096, 16, 2, 3, num_kv_heads=2)
    full, dout, out_ref, _, grads_ref = _full_case(17, 1, 2 * world * 25, 4, 2, 8, pattern)
    for owner, name in [(patterns, "from_mask"), (remap, "from_mask"), (BlockPattern, "block_mask"),
                        (BlockPattern, "to_token_mask"), (lowering, "block_tables")]:
        setattr(owner, name, _refuse)  # a forked worker: the test process keeps the originals
    local = [zigzag_split(x, rank, world).requires_grad_() for x in full]
    out = context_parallel_attention(*local, pattern)
    (out * zigzag_split(dout, rank, world)).sum().backward()
    assert _rel(out, zigzag_split(out_ref, rank, world)) < TOL
    for x, g in zip(local, grads_ref):
        assert _rel(x.grad, zigzag_split(g, rank, world)) < TOL


def test_context_parallel_builds_no_mask_and_no_tables():
    run_workers(_no_mask_worker, 2)
