"""Differential fuzz: random calls of the public API against a float64 attention written here, apart
from the library (the masking rule restated from DESIGN.md, softmax by hand), values and gradients.

Each case is drawn from ``(seed, index)`` alone, so a failure is one line that reruns it::

    TRITON_INTERPRET=1 python tests/differential.py --seed 0 --only 17

CPU (CI, interpreter): small shapes. ``--gpu``: real sizes (to 40k keys, so the warp-specialised dQ
runs on an H100), head dims to 256, block 256, and decode, ``combine_partitions`` and ``torch.compile``
cases besides the attention calls. ``tests/test_differential.py`` runs the CPU mode in CI.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

import s2attn
from s2attn.inference import DecodePlan, SparseKVCache, append, prefill
from s2attn.kernels.plan import plan_overrides

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
GPU_BUDGET = 2 * 10**8  # scores x heads of the float64 model at once (its autograd keeps a few such tensors)
CPU_BUDGET = 1000  # scores x heads per 64 keys of a pattern block: about a second a case at most, interpreted


@dataclass(frozen=True)
class Case:
    """One call. ``pattern`` is ``("rule", local, stride, head_step, head_offset, homogeneous, dense_groups)``,
    ``("dense",)`` or ``("mask", density, shared)``; ``lens`` one ``(seqlen_q, seqlen_k)`` per sequence."""

    kind: str  # attention | varlen | decode | combine | compile
    lens: tuple
    heads: int
    kv_heads: int
    head_dim: int
    block: int
    dtype: str
    pattern: tuple
    pattern_causal: bool
    causal: bool | None = None  # the call's override; None: the pattern's
    layout: str = "bshd"
    strided: bool = False
    lse: bool = False
    deterministic: bool = False
    generous_max: bool = False  # varlen: max_seqlen_k past the longest sequence (and the pattern)
    seed: int = field(default=0, compare=False)

    @property
    def max_seq_len(self) -> int:
        return max(k for _, k in self.lens) + self.block  # a pattern longer than any sequence


def draw(seed: int, index: int, gpu: bool) -> Case:
    """The ``index``-th case of ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    pick = rng.choice
    kind = rng.choices(["attention", "varlen", "decode", "combine", "compile"],
                       [10, 3, 2, 1, 1 if gpu else 0])[0]
    block = pick([16, 32, 64, 128, 256] if gpu else [16, 16, 32, 64, 64, 128])
    kv_heads = pick([1, 2, 4] if gpu else [1, 2])
    heads = kv_heads * pick([1, 2, 3] if gpu else [1, 2])
    head_dim = pick([32, 64, 64, 80, 128, 128, 256] if gpu else [16, 16, 32, 48, 64])
    dtype = pick(["fp32", "bf16", "bf16", "fp16"])
    max_k = pick([2048, 8192, 40000]) if gpu and kind == "attention" and heads <= 2 else (4096 if gpu else 1100)
    if head_dim == 256 or dtype == "fp32":
        max_k = min(max_k, 8192)
    long_keys = gpu and kind == "attention" and rng.random() < 0.15
    if long_keys:  # where the warp-specialised dQ runs on an H100: past 32k keys, 16-bit, d 64 / 128, block >= 64
        heads, kv_heads, head_dim, dtype, block = pick([1, 2]), 1, pick([64, 128]), pick(["bf16", "fp16"]), \
            pick([64, 128, 256])

    def seqlen_k() -> int:
        if long_keys:
            return rng.randint(32769, 40000)
        return rng.randint(1, max_k) if rng.random() < 0.7 else rng.randint(1, max(1, max_k // 8))

    def seqlen_q(k: int) -> int:
        return rng.choice([k, k, rng.randint(0, k), 1, 0])

    n_seqs = rng.randint(1, 3) if kind in ("varlen", "decode") else rng.randint(1, 2)
    if kind in ("attention", "combine", "compile"):
        k = seqlen_k()
        lens = [(seqlen_q(k), k)] * n_seqs
    elif kind == "varlen":
        lens = [(seqlen_q(k), k) for k in (seqlen_k() for _ in range(n_seqs))]
    else:  # decode: one query over each sequence's keys
        lens = [(1, seqlen_k()) for _ in range(n_seqs)]
    while not gpu and sum((k if kind == "decode" else q) * k for q, k in lens) * heads > CPU_BUDGET * min(block, 64):
        # the interpreter's time goes with the scores (a decode case prefills its keys first)
        lens = [(min(q, k * 3 // 4), max(1, k * 3 // 4)) for q, k in lens]
    while gpu and sum(q * k for q, k in lens) * heads > GPU_BUDGET:  # the float64 model's scores in GPU memory
        lens = [(q // 2, k) for q, k in lens]
    lens = tuple(lens)
    pattern_causal = kind == "decode" or rng.random() < 0.75
    shape = rng.random()
    if shape < 0.6 or long_keys:
        stride = rng.randint(1, 9)
        pattern = ("rule", rng.randint(1, 4), stride, pick([None, None, 0, 1, 2]), pick([0, 0, rng.randint(0, stride)]),
                   rng.random() < 0.2, rng.randint(0, kv_heads) if rng.random() < 0.3 else 0)
    elif shape < 0.7:
        pattern = ("dense",)
    else:
        pattern = ("mask", pick([0.1, 0.4, 0.8]), rng.random() < 0.3)
    attention = kind == "attention"
    return Case(
        kind=kind, lens=lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block=block, dtype=dtype,
        pattern=pattern, pattern_causal=pattern_causal,
        causal=pick([None, None, None, True, False]) if kind in ("attention", "varlen") else None,
        layout=pick(["bshd", "bshd", "bhsd"]) if attention else "bshd",
        strided=attention and rng.random() < 0.3, lse=kind in ("attention", "varlen") and rng.random() < 0.3,
        deterministic=kind in ("attention", "varlen") and rng.random() < 0.2,
        generous_max=kind == "varlen" and rng.random() < 0.5, seed=rng.randrange(2**31))


# ----------------------------------------------------------------------------------- the independent model
def block_rows(case: Case, heads: range, n: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``(len(heads), n, n)``: may query block ``i`` of head ``h`` read key block ``j`` (DESIGN.md)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    rows = []
    for h in heads:
        kind = case.pattern[0]
        if kind == "mask":
            ok = mask[0 if case.pattern[2] else h, :n, :n]
        elif kind == "dense":
            ok = torch.ones(n, n, dtype=torch.bool)
        else:
            _, local, stride, step, offset, homogeneous, dense_groups = case.pattern
            step = max(1, stride // case.kv_heads) if step is None else step
            g = h // (case.heads // case.kv_heads)
            if g >= case.kv_heads - dense_groups:
                ok = torch.ones(n, n, dtype=torch.bool)
            else:
                shift = (0 if homogeneous else g) * step + offset
                near = (i - j < local) if case.pattern_causal else ((i - j).abs() < local)
                ok = near | ((j + shift) % stride == 0)
        if case.pattern_causal and kind != "mask":  # a causal rule reads no block past the diagonal; a mask is
            ok = ok & (j <= i)                      # taken as given (causality at token level only)
        rows.append(ok)
    return torch.stack(rows)


def model_attention(q, k, v, blocks: torch.Tensor, block: int, scale: float, causal: bool):
    """float64 attention of one sequence: ``q (sq, h, d)``, ``k, v (sk, hk, d)``, end-aligned queries;
    returns ``out (sq, h, d)`` and ``lse (h, sq)``, 0 and -inf on rows that read nothing."""
    sq, h, _ = q.shape
    sk = k.shape[0]
    t = torch.arange(sk - sq, sk, device=q.device)[:, None]
    s = torch.arange(sk, device=q.device)[None, :]
    allowed = blocks.to(q.device)[:, t // block, s // block]  # (h, sq, sk)
    if causal:
        allowed = allowed & (s <= t)
    group = h // k.shape[1]
    kk, vv = (x.repeat_interleave(group, 1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    peak = scores.amax(-1, keepdim=True) if sk else scores.sum(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    p = torch.exp(scores - peak)
    total = p.sum(-1, keepdim=True)
    some = total > 0
    total = torch.where(some, total, torch.ones_like(total))
    out = torch.einsum("hqk,khd->qhd", p / total, vv)
    lse = torch.where(some, peak + torch.log(total), -math.inf).squeeze(-1)
    return out, lse


# ----------------------------------------------------------------------------------- building and checking
def make_pattern(case: Case, gen: torch.Generator):
    n = -(-case.max_seq_len // case.block)
    kind = case.pattern[0]
    if kind == "dense":
        return s2attn.dense(case.max_seq_len, case.block, num_heads=case.heads, causal=case.pattern_causal), None
    if kind == "mask":
        rows = 1 if case.pattern[2] else case.heads
        mask = (torch.rand(rows, n, n, generator=gen) < case.pattern[1]) | torch.eye(n, dtype=torch.bool)
        given = mask[0] if case.pattern[2] else mask
        return s2attn.from_mask(given, case.block, causal=case.pattern_causal), mask
    _, local, stride, step, offset, homogeneous, dense_groups = case.pattern
    return s2attn.local_stride(case.heads, case.max_seq_len, case.block, local, stride, num_kv_heads=case.kv_heads,
                               homogeneous=homogeneous, num_dense_heads=dense_groups, head_step=step,
                               head_offset=offset, causal=case.pattern_causal), None


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    if not torch.isfinite(x).all():
        return math.inf
    return ((x.double() - ref.to(x.device)).norm() / ref.norm().clamp_min(floor)).item()


def randn(shape, gen, dtype, device, strided: bool) -> torch.Tensor:
    """Random values; ``strided``: a view with a gap between heads (unit stride on head_dim only)."""
    wide = (*shape[:-2], shape[-2] + 1, shape[-1]) if strided else shape
    x = torch.randn(wide, generator=gen).to(device=device, dtype=dtype)
    return x[..., 1:, :] if strided else x


def _offsets(lens: list[int]) -> list[int]:
    return [sum(lens[:i]) for i in range(len(lens) + 1)]


def _compare(errors: dict, name: str, got, ref, tol: float) -> None:
    err = rel_err(got, ref)
    if not err <= tol:
        errors[name] = err


def _compare_lse(errors: dict, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    got = got.double().to(ref.device)
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        errors["lse finite"] = int((torch.isfinite(got) != finite).sum())
    elif finite.any() and not (got[finite] - ref[finite]).abs().max() <= 10 * tol:
        errors["lse"] = (got[finite] - ref[finite]).abs().max().item()


def run_case(case: Case, device: str) -> dict:
    """Errors above tolerance, by name (empty: the case passed). Inputs are packed ``(total, heads, dim)``;
    the batched calls see them as ``(batch, seqlen, heads, dim)`` views."""
    gen = torch.Generator().manual_seed(case.seed)
    pattern, mask = make_pattern(case, gen)
    dtype, tol = DTYPES[case.dtype], TOL[case.dtype]
    scale = case.head_dim ** -0.5 * (0.5 + torch.rand(1, generator=gen).item())
    causal = case.pattern_causal if case.causal is None else case.causal
    blocks = block_rows(case, range(case.heads), -(-case.max_seq_len // case.block), mask)
    cu_q, cu_k = (_offsets([ls[j] for ls in case.lens]) for j in (0, 1))
    q = randn((cu_q[-1], case.heads, case.head_dim), gen, dtype, device, case.strided).requires_grad_()
    k, v = (randn((cu_k[-1], case.kv_heads, case.head_dim), gen, dtype, device, case.strided).requires_grad_()
            for _ in range(2))
    leaves = (q, k, v)
    model_leaves = [x.detach().double().requires_grad_() for x in leaves]  # on the device: float64 on the GPU
    mq, mk, mv = model_leaves
    model = [model_attention(mq[a:b], mk[c:d], mv[c:d], blocks, case.block, scale, causal)
             for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]
    ref_out = torch.cat([o for o, _ in model])
    ref_lse = torch.cat([lse for _, lse in model], 1)
    errors: dict = {}
    if case.kind == "decode":
        _compare(errors, "decode out", _call_decode(case, pattern, q, k, v, scale), ref_out, tol)
        return errors
    call = {"varlen": _call_varlen, "combine": _call_combined}.get(case.kind, _call_batched)
    out, lse = call(case, pattern, q, k, v, scale)
    _compare(errors, "out", out, ref_out, tol)
    _compare_lse(errors, lse, ref_lse, tol)
    got, ref = ([out, lse], [ref_out, ref_lse]) if case.lse else ([out], [ref_out])
    seeds = torch.Generator().manual_seed(case.seed + 1)
    d_ref = [torch.randn(x.shape, generator=seeds, dtype=torch.float64).to(device) for x in got]
    d_got = [d.to(x.dtype) for d, x in zip(d_ref, got)]
    if case.lse:  # the model's rows with no key (lse -inf) take no lse gradient, as the library's
        d_ref[1] = torch.where(torch.isfinite(ref_lse), d_ref[1], 0.0)
    grads = torch.autograd.grad(got, leaves, d_got, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, model_leaves, d_ref, allow_unused=True)
    for name, x, g, r in zip("qkv", leaves, grads, ref_grads):
        g = torch.zeros_like(x) if g is None else g
        r = torch.zeros(x.shape, dtype=torch.float64, device=x.device) if r is None else r
        _compare(errors, f"d{name}", g, r, tol)
    return errors


def _batched(case: Case, x: torch.Tensor) -> torch.Tensor:
    """Packed rows of equal-length sequences as a ``(batch, seqlen, heads, dim)`` view, or ``bhsd``."""
    x = x.unflatten(0, (len(case.lens), -1))
    return x.transpose(1, 2) if case.layout == "bhsd" else x


def _packed(case: Case, out: torch.Tensor, lse: torch.Tensor):
    """Batched ``out`` and ``lse (batch, heads, seqlen)`` back to packed rows and ``(heads, total)``."""
    out = out.transpose(1, 2) if case.layout == "bhsd" else out
    return out.flatten(0, 1), lse.transpose(0, 1).flatten(1, 2)


def _call_batched(case, pattern, q, k, v, scale):
    attention = torch.compile(s2attn.sparse_attention, fullgraph=True) if case.kind == "compile" else \
        s2attn.sparse_attention
    out, lse = attention(*(_batched(case, x) for x in (q, k, v)), pattern, softmax_scale=scale, causal=case.causal,
                         layout=case.layout, return_lse=True, deterministic=case.deterministic)
    return _packed(case, out, lse)


def _call_varlen(case, pattern, q, k, v, scale):
    cu_q, cu_k = (torch.tensor(_offsets([ls[j] for ls in case.lens]), dtype=torch.int32, device=q.device)
                  for j in (0, 1))
    max_q, max_k = (max(ls[j] for ls in case.lens) for j in (0, 1))
    if case.generous_max:
        max_q, max_k = max_q + case.block, 2 * case.max_seq_len
    return s2attn.sparse_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, pattern, softmax_scale=scale,
                                          causal=case.causal, return_lse=True, deterministic=case.deterministic)


def _call_combined(case, pattern, q, k, v, scale):
    """Attention over the keys in two parts split at a block edge (each through the pattern restricted to
    its key blocks), merged by ``combine_partitions``."""
    full = pattern.block_mask(case.max_seq_len)
    full = full if pattern.num_heads is not None else full[0]
    n, cut = full.shape[-1], case.lens[0][1] // 2 // case.block
    parts = []
    for keep in (torch.arange(n) < cut, torch.arange(n) >= cut):
        part = s2attn.from_mask(full & keep, case.block, causal=case.pattern_causal)
        parts.append(s2attn.sparse_attention(*(_batched(case, x) for x in (q, k, v)), part, softmax_scale=scale,
                                             return_lse=True))
    return _packed(case, *s2attn.combine_partitions(parts))


def _call_decode(case, pattern, q, k, v, scale) -> torch.Tensor:
    """Each sequence's keys but its last prefilled into a cache, then one decode step of its one query."""
    n_blocks = -(-case.max_seq_len // case.block)
    cache = SparseKVCache(pattern, num_layers=1, num_heads=case.heads, num_kv_heads=case.kv_heads,
                          head_dim=case.head_dim, num_pages=len(case.lens) * case.kv_heads * n_blocks,
                          max_seqs=len(case.lens), dtype=q.dtype, device=q.device)
    slots = [cache.add_sequence() for _ in case.lens]
    ends = _offsets([lk for _, lk in case.lens])[1:]
    q, k, v = (x.detach() for x in (q, k, v))
    for slot, (_, lk), end in zip(slots, case.lens, ends):
        if lk > 1:
            with cache.step([slot], lk - 1):
                rows = slice(end - lk, end - 1)
                prefill(cache, 0, torch.randn_like(q[:1]).expand(lk - 1, -1, -1).contiguous(), k[rows], v[rows],
                        softmax_scale=scale)
    last = [e - 1 for e in ends]
    with cache.step(slots, 1):
        append(cache, 0, k[last], v[last])
        plan = DecodePlan(cache, len(slots), softmax_scale=scale)
        plan.set_slots(slots)
        return plan.run(0, q).clone()


# ----------------------------------------------------------------------------------- driver
def run(seed: int, cases: int, gpu: bool, only: int | None = None, progress=None,
        seconds: float = math.inf) -> tuple[int, list[str]]:
    """Run the cases (or as many as ``seconds`` allow); returns (count, one repro line per failure)."""
    device = "cuda" if gpu else "cpu"
    failures = []
    indices = [only] if only is not None else range(cases)
    start, count = time.time(), 0
    with plan_overrides(poison=True):  # unwritten outputs are NaN, never a plausible zero
        for i in indices:
            if time.time() - start > seconds:
                break
            count += 1
            case = draw(seed, i, gpu)
            try:
                errors = run_case(case, device)
            except Exception as e:  # a crash is a failure like a wrong value
                if only is not None:  # a repro: the whole traceback
                    traceback.print_exc()
                errors = {"raised": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if errors:
                failures.append(f"python tests/differential.py --seed {seed} --only {i}{' --gpu' if gpu else ''}  "
                                f"# {errors}  {case}")
            if progress:
                progress(i, case, errors)
    return count, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--only", type=int, default=None, help="run just this case index (a failure's repro)")
    ap.add_argument("--gpu", action="store_true", help="GPU mode: real sizes, decode, combine, torch.compile")
    ap.add_argument("--minutes", type=float, default=math.inf, help="stop starting cases after this long")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    start = time.time()

    def progress(i, case, errors):
        if args.verbose or errors:
            print(f"{i:5d} {'FAIL' if errors else 'ok  '} {time.time() - start:7.1f}s {case.kind} {case.lens} "
                  f"h{case.heads}/{case.kv_heads} d{case.head_dim} B{case.block} {case.dtype} {errors or ''}",
                  flush=True)

    count, failures = run(args.seed, args.cases, args.gpu, args.only, progress, 60 * args.minutes)
    for line in failures:
        print(line)
    print(f"differential fuzz ({'gpu' if args.gpu else 'cpu'}, seed {args.seed}): {count} cases, "
          f"{len(failures)} failures, {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
