"""Context parallelism on several GPUs: exactness, bytes exchanged, time per step on 1 vs N GPUs.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --out "$OUT"
    python benchmarks/bench_distributed.py --smoke          # 2 CPU processes on gloo, tiny sizes

For each sequence length (default 128k and 512k tokens; protocol shape: 32 heads, head_dim 128,
bf16, local 512 tokens, vert_stride 16, heterogeneous, block 64):

* exactness: every rank checks its share of the context-parallel output and of dQ, dK, dV
  (first ``--check-kv-heads`` kv heads) against a single-GPU run of the same heads on the full
  sequence, ``|a - b| / |b|`` (bf16 bound 1e-2);
* bytes of keys+values each rank receives per forward pass, next to an all-gather of the full
  keys/values (the backward pass moves the same amount again);
* time of one forward+backward step: ``sparse_attention`` on one GPU (rank 0, the others wait)
  and ``context_parallel_attention`` on all ranks (slowest rank), median of ``--reps``.

Prints a table and writes ``bench_distributed.json`` and ``.md`` into ``--out`` (default ``$OUT``
or the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from s2attn import local_stride, sparse_attention  # noqa: E402
from s2attn.integrations.distributed import (  # noqa: E402
    context_parallel_attention, context_parallel_comm_bytes, zigzag_split,
)

SMOKE = dict(seqlens=[192, 320], heads=4, kv_heads=2, head_dim=16, block=16, local_blocks=2, vert_stride=4,
             dtype="float32", reps=2, check_kv_heads=1)


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check-kv-heads", type=int, default=1, help="kv heads compared with the single-GPU run")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="2 CPU processes on gloo, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(step, device: torch.device, reps: int, group_wide: bool) -> float:
    """Median seconds of ``step()`` after one warm-up; with ``group_wide`` the slowest rank's time."""
    step()
    times = []
    for _ in range(reps):
        _sync(device)
        if group_wide:
            dist.barrier()
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    if group_wide:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _one_length(args, seq: int, rank: int, world: int, device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype)
    pattern = local_stride(args.heads, seq, args.block, args.local_blocks, args.vert_stride,
                           num_kv_heads=args.kv_heads)
    comm = context_parallel_comm_bytes(pattern, seq, world, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                       element_size=torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device=device).manual_seed(seq)  # same full tensors on every rank
    full = [torch.randn(1, seq, h, args.head_dim, generator=gen, device=device, dtype=dtype)
            for h in (args.heads, args.kv_heads, args.kv_heads)]
    dout = torch.randn(1, seq, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)

    # exactness on a subset of kv heads (and their query heads) against one GPU on the full sequence
    ks = args.check_kv_heads
    hs = ks * args.heads // args.kv_heads
    sub = [x[:, :, :n].clone().requires_grad_() for x, n in zip(full, (hs, ks, ks))]
    ref = sparse_attention(*sub, pattern.heads(0, hs))
    (ref * dout[:, :, :hs]).sum().backward()
    local = [zigzag_split(x, rank, world).requires_grad_() for x in full]
    started = time.perf_counter()
    out = context_parallel_attention(*local, pattern)
    plan_s = time.perf_counter() - started  # first call: plans the exchange and builds packed patterns
    (out * zigzag_split(dout, rank, world)).sum().backward()
    errs = [_rel(out[:, :, :hs], zigzag_split(ref, rank, world))]
    errs += [_rel(x.grad[:, :, :n], zigzag_split(s.grad, rank, world)) for x, s, n in zip(local, sub, (hs, ks, ks))]
    err = torch.tensor([max(errs)], dtype=torch.float64, device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    del ref, sub

    def step(q, k, v, do, attend):
        for x in (q, k, v):
            x.grad = None
        (attend(q, k, v) * do).sum().backward()

    local_do = zigzag_split(dout, rank, world)
    t_cp = _time_step(lambda: step(*local, local_do, lambda q, k, v: context_parallel_attention(q, k, v, pattern)),
                      device, args.reps, group_wide=True)
    del local, out
    t_one = float("nan")
    if rank == 0:
        leaves = [x.requires_grad_() for x in full]
        t_one = _time_step(lambda: step(*leaves, dout, lambda q, k, v: sparse_attention(q, k, v, pattern)),
                           device, args.reps, group_wide=False)
    dist.barrier()
    return {"seqlen": seq, "world": world, "bytes_sparse_max": max(comm["sparse"]), "bytes_sparse": comm["sparse"],
            "bytes_all_gather": comm["all_gather"], "ratio": comm["ratio"], "max_rel_err": float(err),
            "plan_s": plan_s, "step_ms_1": t_one * 1e3, f"step_ms_{world}": t_cp * 1e3,
            "speedup": t_one / t_cp}


def _report(args, rows: list[dict], world: int, device: torch.device) -> None:
    header = (f"| seqlen | MiB/rank sparse | MiB/rank all-gather | ratio | 1 rank ms | {world} ranks ms "
              f"| speedup | max rel err | plan s |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['seqlen']} | {r['bytes_sparse_max'] / 2**20:.4g} | {r['bytes_all_gather'] / 2**20:.4g} "
                     f"| {r['ratio']:.3f} | {r['step_ms_1']:.1f} | {r[f'step_ms_{world}']:.1f} | {r['speedup']:.2f} "
                     f"| {r['max_rel_err']:.1e} | {r['plan_s']:.1f} |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "world": world, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "args": {k: v for k, v in vars(args).items() if k != "out"}}
    title = (f"context parallel, {world} x {name}, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
             f"d {args.head_dim}, block {args.block}, local {args.local_blocks} blocks, stride {args.vert_stride}")
    table = "\n".join([f"# {title}", ""] + lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_distributed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_distributed.md"), "w") as f:
        f.write(table + "\n")


def run(args) -> None:
    """Body of every rank; expects the process group to be initialised."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    rows = [_one_length(args, seq, rank, world, device) for seq in args.seqlens]
    bound = 1e-2 if args.dtype != "float32" else 1e-4
    if rank == 0:
        _report(args, rows, world, device)
        bad = [r["seqlen"] for r in rows if not r["max_rel_err"] <= bound]
        if bad:
            raise SystemExit(f"context parallel result differs from one GPU beyond {bound} at seqlen {bad}")


def _smoke_worker(rank: int, world: int, init_file: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = _args(argv)
    if args.smoke:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_smoke_worker, args=(2, os.path.join(tmp, "rendezvous"), args), nprocs=2,
                               start_method="spawn")
        return
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun --nproc-per-node N (or pass --smoke for a CPU run)")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=timedelta(seconds=600), device_id=torch.device("cuda", local_rank))
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
