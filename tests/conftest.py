"""Shared test set-up."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be chosen before
# anything imports triton (`make test` exports it too). With a GPU, the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)
