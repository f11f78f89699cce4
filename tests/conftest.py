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


def pytest_terminal_summary(terminalreporter):
    """What tests counted (``record_property("summary", line)``: fuzz cases, schedules, soak steps), printed
    at the end of the run; the properties travel with the reports, so this works under pytest-xdist too."""
    lines = [value for when in ("passed", "failed") for report in terminalreporter.stats.get(when, [])
             for name, value in getattr(report, "user_properties", ()) if name == "summary"]
    if lines:
        terminalreporter.write_sep("-", "counts")
        for line in dict.fromkeys(lines):
            terminalreporter.write_line(line)
