"""Decode and prefill with s2attn's per-head paged cache, against dense attention on the full cache.

    python benchmarks/bench_decode.py --out decode.json          # GPU: about 2 minutes on an H100
    python benchmarks/bench_decode.py --smoke --out smoke.json   # CPU, tiny shapes, Triton interpreter

Decode (one layer, one new token per sequence, 32 query / 8 kv heads, d=128, bf16, local 512
tokens, vertical stride 8, block 64: the 8 kv heads' offsets cover all 8, so the pattern is union
complete; README, "Choosing a pattern") at 8k / 32k / 128k tokens of context, batch 1 and 32:

* ``s2attn sparse``: the decode kernel on the sparse cache (pages left after eviction);
* ``s2attn dense pattern``: the same kernel on a dense pattern's cache (every page) — the
  kernel's bandwidth on the full bytes, comparable with the dense baselines;
* ``SDPA default`` / ``SDPA flash``: ``scaled_dot_product_attention`` on contiguous full K/V
  with ``enable_gqa``; ``FlexAttention``: compiled ``flex_attention``, no mask;
* ``..., CUDA graph``: the same call captured and replayed (``do_bench_cudagraph``), i.e. without
  launch overhead, as a served decode step runs; replays do not flush L2, so a working set
  that fits in L2 (small contexts at batch 1) shows more than memory bandwidth. Speed-ups of
  graph rows are against ``SDPA default, CUDA graph``.

Times are ``triton.testing.do_bench`` medians (warm-up 25 ms, rep 100 ms). Bandwidth counts
the K and V bytes each provider must read (for s2attn sparse: the pages the pattern reads),
next to a device-to-device copy measured in the same run (read + write bytes). Prefill at
32k / 128k (batch 1) times :func:`s2attn.inference.prefill` — attention through
``s2attn.sparse_attention_varlen`` plus writing the cache — against dense causal SDPA.
Prints markdown tables last; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import s2attn  # noqa: E402
from s2attn.inference import (  # noqa: E402
    DecodePlan, SparseKVCache, append, kv_blocks_kept, prefill, sequences_that_fit,
)

FULL = dict(heads=32, kv_heads=8, head_dim=128, block=64, local=512, stride=8, dtype=torch.bfloat16,
            contexts=[8192, 32768, 131072], batches=[1, 32], prefill=[32768, 131072], copy_bytes=2**30)
SMOKE = dict(heads=8, kv_heads=2, head_dim=32, block=16, local=32, stride=4, dtype=torch.bfloat16,
             contexts=[256, 512], batches=[1, 2], prefill=[256, 512], copy_bytes=2**24)
PREFILL_SKIP_S = 3.0  # a sparse prefill slower than this at one context is not timed at the next
FLEX_BUDGET_S = 100  # FlexAttention compiles once per shape; no new shapes for it after this much time


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device: torch.device, graph: bool = False) -> float:
    """Median milliseconds: ``do_bench`` (or ``do_bench_cudagraph``, replaying ``fn`` captured in a CUDA
    graph) on a GPU; on the CPU (smoke) one wall-clock run after a warm-up."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timed_ms(lambda: dst.copy_(src), device) * 1e-3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def empty_cache(pattern, cfg: dict, ctx: int, batch: int, device: torch.device) -> SparseKVCache:
    """A one-layer cache with just enough pages for ``batch`` sequences of ``ctx`` tokens."""
    kv = cfg["kv_heads"]
    pages = batch * (int(kv_blocks_kept(pattern, cfg["heads"], kv, ctx).sum()) + kv)
    return SparseKVCache(pattern, num_layers=1, num_heads=cfg["heads"], num_kv_heads=kv, head_dim=cfg["head_dim"],
                         num_pages=pages, max_seqs=batch, dtype=cfg["dtype"], device=device)


def sparse_bytes_read(pattern, cfg: dict, ctx: int, batch: int) -> int:
    """K and V bytes one decode step reads: per kv head, the blocks of its query heads' row."""
    group = cfg["heads"] // cfg["kv_heads"]
    blocks = int(pattern.blocks_per_row(ctx)[::group, -1].sum())
    elem = torch.empty((), dtype=cfg["dtype"]).element_size()
    return batch * blocks * cfg["block"] * cfg["head_dim"] * elem * 2


def decode_rows(cfg: dict, ctx: int, batch: int, device: torch.device, flex) -> list[dict]:
    H, kv, d, dt = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    sparse = s2attn.local_stride(H, ctx, cfg["block"], cfg["local"] // cfg["block"], cfg["stride"], num_kv_heads=kv)
    dense = s2attn.dense(ctx, cfg["block"], num_heads=H)
    caches = [empty_cache(p, cfg, ctx, batch, device) for p in (sparse, dense)]
    kd = torch.empty(batch, kv, ctx, d, device=device, dtype=dt)  # the dense baselines' full cache
    vd = torch.empty_like(kd)
    for b in range(batch):  # the same keys/values in all three caches, written by the bookkeeping path
        K, V = (torch.randn(ctx, kv, d, device=device, dtype=dt) for _ in range(2))
        kd[b], vd[b] = K.transpose(0, 1), V.transpose(0, 1)
        for cache in caches:
            slot = cache.add_sequence()
            with cache.step([slot], ctx - 1):
                append(cache, 0, K[:-1], V[:-1])
    del K, V
    # the decode step stays open while timing: the query is the newest token, position ctx - 1
    plans = [DecodePlan(c, batch, max_context=ctx) for c in caches]
    for cache, plan in zip(caches, plans):
        plan.set_slots(list(range(batch)))
        cache.begin_step(list(range(batch)), 1)
        plan.append(0, kd[:, :, -1].contiguous(), vd[:, :, -1].contiguous())
        log(f"    cache {cache.bytes_in_use() / 2**30:.3f} GiB, {plan.num_splits} splits")
    sparse_plan, dense_plan = plans
    q = torch.randn(batch, H, d, device=device, dtype=dt)
    q4 = q[:, :, None, :]
    elem = torch.empty((), dtype=dt).element_size()
    full_bytes = batch * kv * ctx * d * elem * 2
    providers = {
        "s2attn sparse": (lambda: sparse_plan.run(0, q), sparse_bytes_read(sparse, cfg, ctx, batch)),
        "s2attn dense pattern": (lambda: dense_plan.run(0, q), full_bytes),
        "SDPA default": (lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True), full_bytes),
        "SDPA flash": (lambda: _flash(q4, kd, vd), full_bytes),
    }
    if flex is not None:
        providers["FlexAttention"] = (lambda: flex(q4, kd, vd, enable_gqa=True), full_bytes)
    if device.type == "cuda":  # launch overhead removed: what a captured decode step costs
        providers["s2attn sparse, CUDA graph"] = providers["s2attn sparse"]
        providers["SDPA default, CUDA graph"] = providers["SDPA default"]
    # correctness in the same run: our dense-pattern kernel against SDPA, the sparse one against the reference
    check = {"s2attn dense pattern": rel_err(dense_plan.run(0, q), F.scaled_dot_product_attention(
        q4, kd, vd, enable_gqa=True)[:, :, 0])}
    ref = s2attn.reference_attention(q[:1, None], kd[:1].transpose(1, 2), vd[:1].transpose(1, 2), sparse)
    check["s2attn sparse"] = rel_err(sparse_plan.run(0, q)[:1], ref[:, 0])
    rows = []
    for name, (fn, nbytes) in providers.items():
        row = dict(kind="decode", context=ctx, batch=batch, provider=name, bytes_read=nbytes)
        try:
            t0 = time.perf_counter()
            fn()
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0  # FlexAttention: its compile
            row["ms"] = timed_ms(fn, device, graph=name.endswith("CUDA graph"))
            row["bytes_per_s"] = nbytes / (row["ms"] * 1e-3)
        except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if name in check:
            row["rel_err"] = check[name]
        rows.append(row)
        log(f"    {name}: {row.get('ms', row.get('error'))}")
    return rows


def _flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def prefill_rows(cfg: dict, device: torch.device) -> list[dict]:
    H, kv, d, dt = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    rows, skip = [], None
    for ctx in cfg["prefill"]:
        pattern = s2attn.local_stride(H, ctx, cfg["block"], cfg["local"] // cfg["block"], cfg["stride"],
                                      num_kv_heads=kv)
        q = torch.randn(ctx, H, d, device=device, dtype=dt)
        k, v = torch.randn(ctx, kv, d, device=device, dtype=dt), torch.randn(ctx, kv, d, device=device, dtype=dt)
        pages = int(kv_blocks_kept(pattern, H, kv, ctx).sum()) + kv
        cache = SparseKVCache(pattern, num_layers=1, num_heads=H, num_kv_heads=kv, head_dim=d, num_pages=pages,
                              max_seqs=1, dtype=dt, device=device)

        def ours():
            slot = cache.add_sequence()
            with cache.step([slot], ctx):
                prefill(cache, 0, q, k, v)
            cache.remove_sequence(slot)

        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        providers = {
            "s2attn prefill": ours,
            "SDPA default": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
            "SDPA flash": lambda: _flash_causal(qt, kt, vt),
        }
        for name, fn in providers.items():
            row = dict(kind="prefill", context=ctx, batch=1, provider=name)
            if name == "s2attn prefill" and skip:
                row["error"] = skip
            else:
                try:
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    once = time.perf_counter() - t0
                    row["ms"] = timed_ms(fn, device) if once < PREFILL_SKIP_S else once * 1e3
                    if name == "s2attn prefill" and once >= PREFILL_SKIP_S:
                        skip = f"skipped: {once:.1f} s at {ctx} tokens (attention not on the Triton kernel yet?)"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rows.append(row)
            log(f"  prefill {ctx} {name}: {row.get('ms', row.get('error'))}")
        del q, k, v, qt, kt, vt, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _flash_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def capacity(cfg: dict) -> dict:
    """128k-token sequences whose KV cache fits in 80 GiB for a 7B-shaped model (32 layers, ``cfg``'s heads,
    head dim and pattern in every layer), with and without 14 GB of weights."""
    pattern = s2attn.local_stride(cfg["heads"], 131072, cfg["block"], cfg["local"] // cfg["block"], cfg["stride"],
                                  num_kv_heads=cfg["kv_heads"])
    shape = dict(num_layers=32, num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                 dtype=cfg["dtype"])
    return {"kv_only": sequences_that_fit(80 * 2**30, 131072, pattern, **shape),
            "after_bf16_weights": sequences_that_fit(80 * 2**30 - 14 * 10**9, 131072, pattern, **shape)}


def tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(result: dict) -> str:
    copy = result["copy_bytes_per_s"]
    lines = [f"Device: {result['device']}; torch {result['torch']}, Triton {result['triton']}; {result['date']}.",
             f"Copy bandwidth (read + write): {copy / 1e12:.2f} TB/s.", "",
             "| context | batch | provider | ms | MB read | TB/s | % of copy | vs SDPA default | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["context"], r["batch"], r["provider"].endswith("CUDA graph")): r.get("ms") for r in result["rows"]
            if r["kind"] == "decode" and r["provider"].startswith("SDPA default")}
    for r in (r for r in result["rows"] if r["kind"] == "decode"):
        ctx = tokens(r["context"])
        if "ms" not in r:
            lines.append(f"| {ctx} | {r['batch']} | {r['provider']} | {r['error']} | | | | | |")
            continue
        b = base.get((r["context"], r["batch"], r["provider"].endswith("CUDA graph")))
        speed = f"{b / r['ms']:.1f}x" if b else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"| {ctx} | {r['batch']} | {r['provider']} | {r['ms']:.3f} | {r['bytes_read'] / 1e6:.1f} | "
                     f"{r['bytes_per_s'] / 1e12:.2f} | {100 * r['bytes_per_s'] / copy:.0f}% | {speed} | {err} |")
    cap = result.get("capacity_7b_128k_80gib")
    if cap:
        lines += ["", "128k-token sequences in 80 GiB, 7B shape (32 layers, 32 query / 8 kv heads, d=128, bf16): "
                  f"s2attn {cap['kv_only']['sparse']} vs dense {cap['kv_only']['dense']} (KV only); "
                  f"{cap['after_bf16_weights']['sparse']} vs {cap['after_bf16_weights']['dense']} "
                  "beside 14 GB of bf16 weights."]
    lines += ["", "| prefill context | provider | ms |", "|---|---|---|"]
    for r in (r for r in result["rows"] if r["kind"] == "prefill"):
        lines.append(f"| {tokens(r['context'])} | {r['provider']} | "
                     f"{format(r['ms'], '.2f') if 'ms' in r else r['error']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU + Triton interpreter without a GPU)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    ap.add_argument("--no-prefill", action="store_true")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_decode: no GPU; run with --smoke for a CPU check")
    torch.manual_seed(0)
    flex = None
    if not args.no_flex and device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    start = time.time()
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
                  torch=torch.__version__, triton=triton.__version__,
                  date=datetime.date.today().isoformat(), config={k: str(v) for k, v in cfg.items()},
                  copy_bytes_per_s=copy_bandwidth(cfg["copy_bytes"], device), rows=[])
    for ctx in cfg["contexts"]:
        for batch in cfg["batches"]:
            log(f"decode context {ctx}, batch {batch} ({time.time() - start:.0f} s)")
            if flex is not None and time.time() - start > FLEX_BUDGET_S:
                log(f"    FlexAttention skipped from here on: {FLEX_BUDGET_S} s budget spent (compiles)")
                flex = None
            result["rows"] += decode_rows(cfg, ctx, batch, device, flex)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_prefill:
        result["rows"] += prefill_rows(cfg, device)
    result["capacity_7b_128k_80gib"] = capacity(FULL)
    result["seconds"] = time.time() - start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
