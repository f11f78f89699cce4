"""The differential fuzz (``tests/differential.py``) in CI: fixed seed, CPU mode, under the interpreter."""

import os

import pytest
import torch

import differential
from s2attn.kernels import launch

CASES = int(os.environ.get("S2ATTN_FUZZ_CASES", "150"))


@pytest.mark.skipif(not launch.interpreting() or torch.cuda.is_available(),
                    reason="CPU mode under TRITON_INTERPRET=1 (the GPU mode runs from scripts/gpu_check.sh)")
def test_differential_fuzz(record_property):
    count, failures = differential.run(seed=0, cases=CASES, gpu=False)
    record_property("summary", f"differential fuzz: {count} cases, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {count} cases failed, each rerun by:\n" + "\n".join(failures)
