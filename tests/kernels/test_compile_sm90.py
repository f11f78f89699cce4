"""The kernels compile for an H100 (sm_90) in the configurations the launchers pick.

The interpreter tests never call Triton's compiler; this does, without a GPU (Triton ships ptxas),
so a construct only the compiler rejects fails here rather than on the first GPU run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_sm90.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("| _attn_") >= 15, run.stdout  # every kernel of every configuration compiled
    assert run.stdout.count("| _decode_split_kernel |") == 7, run.stdout  # largest pages within shared memory
    assert run.stdout.count("| _attn_fwd_ws |") == 2, run.stdout  # the Gluon forward, off by default


def test_ws_fwd_bisect_old_store_still_builds():
    """``benchmarks/ws_fwd_bisect.py --old-store`` runs rungs on a copy of the package whose Gluon forward has the store
    of its first GPU run (TMA for every out box): the condition it edits is still in the kernel, and the copy
    imports in a child process ahead of this checkout."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ws_fwd_bisect
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tree = ws_fwd_bisect._old_store_tree()
    check = ("import sys, s2attn.kernels.hopper as h; assert h.__file__.startswith(sys.argv[1]), h.__file__; "
             "assert 'if True:' in open(h.__file__).read()")
    run = subprocess.run([sys.executable, "-c", check, tree], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": tree}, cwd=tree)  # not this checkout's s2attn/
    assert run.returncode == 0, run.stderr
