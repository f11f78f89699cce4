"""`s2attn needle`: the scoring rule, and the command end to end at a toy size."""

import argparse
import csv
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from s2attn.apps import data, needle, train  # noqa: E402


class Oracle(torch.nn.Module):
    """Predicts the true next token (shifted input), or a wrong one when ``wrong``."""

    def __init__(self, wrong=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, input_ids, logits_to_keep=0):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt[:, -3] = (nxt[:, -3] + 1) % data.VOCAB_SIZE  # one digit of the key off
        logits = torch.nn.functional.one_hot(nxt, data.VOCAB_SIZE).float()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_scoring_is_exact_match_on_the_key():
    assert needle.passkey_accuracy(Oracle(), 300, 0.5, samples=5, batch_size=2) == 1.0
    assert needle.passkey_accuracy(Oracle(wrong=True), 300, 0.5, samples=5, batch_size=2) == 0.0
    grid = needle.needle_grid(Oracle(), [128, 256], [0.0, 1.0], samples=2)
    assert grid.shape == (2, 2) and bool((grid == 1).all())


def test_needle_on_checkpoints_and_fresh_model(tmp_path, capsys):
    toy = ["--layers", "2", "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--block-size", "16", "--local", "32",
           "--stride", "2", "--device", "cpu"]
    assert train.main([*toy, "--variants", "dense,hhst", "--seq-len", "128", "--steps", "1", "--batch-size", "1",
                       "--out", str(tmp_path / "run")]) == 0
    ckpts = [str(tmp_path / "run" / v / "checkpoint") for v in ("dense", "hhst")]
    out = tmp_path / "needle"
    grid = ["--lengths", "128,200", "--depths", "3", "--samples", "2", "--out", str(out)]
    capsys.readouterr()
    assert needle.main([*grid, "--checkpoint", *ckpts]) == 0
    progress = capsys.readouterr().err  # a bar per model, cell by cell
    assert "dense: 100%" in progress and "hhst: 100%" in progress and "6/6" in progress
    with open(out / "needle.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3 and {r["model"] for r in rows} == {"dense", "hhst"}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    fresh = tmp_path / "fresh"  # beyond training's 128 tokens, at depths short of 100%
    assert needle.main([*toy, *grid, "--depths", "0,0.9", "--variant", "homo", "--out", str(fresh)]) == 0
    with open(fresh / "needle.csv") as f:
        assert [(r["length"], r["depth"]) for r in csv.DictReader(f)] == [("128", "0.000"), ("128", "0.900"),
                                                                          ("200", "0.000"), ("200", "0.900")]
    pytest.importorskip("matplotlib")
    assert (out / "needle.png").stat().st_size > 0 and (fresh / "needle.png").exists()


def test_depths_are_a_count_or_fractions():
    assert needle.depth_list("5") == [0.0, 0.25, 0.5, 0.75, 1.0] and needle.depth_list("1") == [0.0]
    assert needle.depth_list("0,0.1, 0.95") == [0.0, 0.1, 0.95] and needle.depth_list("1.0") == [1.0]
    for bad in ("0", "", "0,1.5", "-0.1", "half"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a"):
            needle.depth_list(bad)
