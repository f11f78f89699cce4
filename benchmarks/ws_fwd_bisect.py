"""Where the Gluon forward (``hopper._attn_fwd_ws``) breaks: a ladder of shapes, each rung adding one feature of the
GPU tests to the last, each run in its own process (an illegal instruction poisons the CUDA context), one line a
rung: ok, or WRONG with its errors, or CRASH / HANG with the error's last line.

    python benchmarks/ws_fwd_bisect.py                # every rung (sm_90 GPU)
    python benchmarks/ws_fwd_bisect.py --old-store    # and the out-store rungs again with the first version's
                                                      # store (TMA for every box, even one outside the sequence)
    python benchmarks/ws_fwd_bisect.py --only 6,7     # some rungs

Values against the fp64 reference (CPU) where the shape is small, and against the Triton forward everywhere; the
last rung is the profile's shape (32k keys, 32 heads, block 64), whose timings (2026-12-08) checked no values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, shape): each rung the one before with one thing changed (the side rungs, marked "side", change it back)
BASE = dict(batch=1, sq=1024, sk=1024, heads=4, kv=4, dense=0, dim=128, half="bf16", causal=True, block=64,
            local=2, stride=3, settings="")
TEST = dict(BASE, kv=2, dense=1, batch=2, sq=2900 - 35, sk=2900)  # the GPU test's shape at block 64


def _rungs() -> list[tuple[str, dict]]:
    r = [("batch 1, 1024 = 1024, 4 heads = kv heads, d128 bf16, causal, block 64", BASE)]
    r.append(("+ GQA (4 heads on 2 kv heads)", dict(r[-1][1], kv=2)))
    r.append(("+ a dense head", dict(r[-1][1], dense=1)))
    r.append(("+ batch 2", dict(r[-1][1], batch=2)))
    r.append(("+ 896 queries on 1024 keys (no out box outside the sequence)", dict(r[-1][1], sq=896)))
    r.append(("+ 989 queries (a query tile from position 0: out box from row -35)", dict(r[-1][1], sq=989)))
    r.append(("side: 1000 = 1000 (odd: out box past the last row only)", dict(r[-2][1], sq=1000, sk=1000)))
    r.append(("+ odd lengths, the test's: 2865 queries, 2900 keys", TEST))
    r.append(("+ head dim 64, fp16", dict(TEST, dim=64, half="fp16")))
    for block in (16, 32, 128, 256):
        r.append((f"test shape, block {block}", dict(TEST, block=block, sq=2900 - block // 2 - 3)))
    for block in (64, 16):
        r.append((f"test shape, bidirectional, block {block}",
                  dict(TEST, block=block, sq=2900 - block // 2 - 3, causal=False)))
    for settings in ("no ping-pong", "3 stages", "64-key tiles"):
        r.append((f"test shape, {settings}", dict(TEST, settings=settings)))
    r.append(("profile's shape: 32768 = 32768, 32 heads = kv heads, local 8 stride 16, vs Triton",
              dict(BASE, sq=32768, sk=32768, heads=32, kv=32, local=8, stride=16)))
    return r


STORE_RUNGS = (1, 5, 6, 7, 8)  # rungs (1-based) rerun with --old-store: no box outside, before, after, both
OLD_CONDITION = "    if (row0 >= 0) & (row0 + ROWS <= len_q):\n"


def _old_store_tree() -> str:
    """A copy of the package whose Gluon forward stores out through TMA for every box, as the version first run on a
    GPU did: a directory for the front of a child's PYTHONPATH (nothing in this process changes)."""
    tree = Path(tempfile.mkdtemp(prefix="s2attn-old-store-"))
    shutil.copytree(ROOT / "s2attn", tree / "s2attn", ignore=shutil.ignore_patterns("__pycache__"))
    hopper = tree / "s2attn" / "kernels" / "hopper.py"
    src = hopper.read_text()
    assert OLD_CONDITION in src, "hopper._fwd_compute's store condition changed: update ws_fwd_bisect.OLD_CONDITION"
    hopper.write_text(src.replace(OLD_CONDITION, "    if True:\n"))
    return str(tree)


def _run_rung(shape: dict, tree: str | None) -> str:
    import torch

    import s2attn
    from s2attn import ops
    from s2attn.kernels.plan import Tiles, plan_overrides
    from s2attn.patterns import local_stride

    if tree is not None:  # the old store's copy of the package, not this checkout's
        assert s2attn.__file__.startswith(tree), (s2attn.__file__, tree)
    s = shape
    dtype = torch.bfloat16 if s["half"] == "bf16" else torch.float16
    gen = torch.Generator().manual_seed(0)
    mk = lambda n, h: torch.randn(s["batch"], n, h, s["dim"], generator=gen).to("cuda", dtype)  # noqa: E731
    q, k, v = mk(s["sq"], s["heads"]), mk(s["sk"], s["kv"]), mk(s["sk"], s["kv"])
    pattern = local_stride(s["heads"], s["sk"], s["block"], s["local"], s["stride"], num_kv_heads=s["kv"],
                           num_dense_heads=s["dense"], causal=s["causal"])
    settings = {"": {}, "no ping-pong": dict(ws_fwd_pingpong=False),
                "3 stages": dict(ws_fwd_tiles=Tiles(128, 128, 4, 3)),
                "64-key tiles": dict(ws_fwd_tiles=Tiles(128, 64, 4, 2))}[s["settings"]]
    scale = s["dim"] ** -0.5

    def forward(**overrides):
        plans = []
        with plan_overrides(poison=True, observe=plans.append, **overrides):  # rows never written read NaN
            out, lse = ops.attention(q, k, v, pattern, softmax_scale=scale, causal=s["causal"], layout="bshd",
                                     return_lse=True)
        torch.cuda.synchronize()  # an illegal instruction surfaces here
        return out, lse, [p.fwd.kernel for p in plans]

    t0 = time.time()
    out, lse, kernels = forward(warp_specialised={"fwd": True}, **settings)
    assert kernels == ["_attn_fwd_ws"], kernels
    seconds = time.time() - t0
    ref_out, ref_lse, kernels = forward()
    assert kernels == ["_attn_fwd"], kernels
    checks = {}

    def rel(x, r):
        x, r = x.double(), r.double().to(x.device)
        return float("nan") if not torch.isfinite(x).all() else ((x - r).norm() / r.norm().clamp_min(1e-2)).item()

    def lse_err(x, r):
        x, r = x.double().cpu(), r.double().cpu()
        if not torch.equal(torch.isinf(x), torch.isinf(r)) or torch.isnan(x).any():
            return float("nan")
        finite = torch.isfinite(r)
        return (x[finite] - r[finite]).abs().max().item() if finite.any() else 0.0

    checks["out vs Triton"] = (rel(out, ref_out), 4e-3)
    checks["lse vs Triton"] = (lse_err(lse, ref_lse), 1e-3)
    if s["sk"] <= 4096:  # the fp64 reference on the CPU
        r_out, r_lse = s2attn.reference_attention(*(x.double().cpu() for x in (q, k, v)), pattern,
                                                  softmax_scale=scale, causal=s["causal"], layout="bshd",
                                                  return_lse=True)
        checks["out vs reference"] = (rel(out, r_out), 1e-2)
        checks["lse vs reference"] = (lse_err(lse, r_lse), 1e-1)
    bad = [name for name, (err, tol) in checks.items() if not err <= tol]  # NaN fails
    text = ", ".join(f"{name} {err:.1e}" for name, (err, _) in checks.items())
    return f"{'WRONG (' + ', '.join(bad) + ')' if bad else 'ok'}: {text}; first call {seconds:.1f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="rungs to run, 1-based, comma-separated (default: all)")
    ap.add_argument("--old-store", action="store_true",
                    help=f"also rerun rungs {','.join(map(str, STORE_RUNGS))} with the first version's out store")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds a rung may take (a hang: HANG)")
    ap.add_argument("--rung", type=int, help=argparse.SUPPRESS)  # in the child process
    ap.add_argument("--child-tree", help=argparse.SUPPRESS)  # the old store's package copy
    a = ap.parse_args(argv)
    rungs = _rungs()
    if a.rung is not None:
        print("RESULT " + _run_rung(rungs[a.rung - 1][1], a.child_tree), flush=True)
        return 0
    picked = [int(x) for x in a.only.split(",") if x] or list(range(1, len(rungs) + 1))
    jobs = [(i, False) for i in picked] + ([(i, True) for i in STORE_RUNGS] if a.old_store else [])
    tree = _old_store_tree() if a.old_store else None
    failed = 0
    for i, old in jobs:
        name = rungs[i - 1][0] + ("  [old store: TMA for every box]" if old else "")
        cmd = [sys.executable, os.path.abspath(__file__), "--rung", str(i)] + (["--child-tree", tree] if old else [])
        env = dict(os.environ)
        if old:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (tree, env.get("PYTHONPATH")) if x)
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode == 0 and lines:
                verdict = lines[-1][len("RESULT "):]
            else:
                tail = [x for x in (run.stderr + run.stdout).splitlines() if x.strip()]
                errors = [x for x in tail if "Error" in x or "error" in x]
                verdict = f"CRASH (rc {run.returncode}): {(errors or tail or ['?'])[-1].strip()}"
        except subprocess.TimeoutExpired:
            verdict = f"HANG (> {a.timeout:.0f} s)"
        failed += not verdict.startswith("ok")
        print(f"{i:2d}. {name}: {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
