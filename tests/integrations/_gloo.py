"""Run a test function in several CPU processes joined by a gloo process group."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)  # forked from a process that used OpenMP: stay single-threaded
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 60.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; re-raise the first failure.

    Forked, because a spawned process spends seconds importing torch again, unless this process
    has initialised CUDA, which a forked child could not use."""
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world,
                                 join=False, start_method=method)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{fn.__name__} with {world} processes did not finish in {timeout} s")
