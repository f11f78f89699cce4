"""`s2attn train` end to end at a toy size (CPU, reference attention)."""

import argparse
import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

import safetensors.torch  # noqa: E402

from s2attn.apps import needle, train  # noqa: E402

TOY = ["--seq-len", "160", "--steps", "4", "--batch-size", "2", "--layers", "2", "--d-model", "32", "--heads", "4",
       "--kv-heads", "2", "--block-size", "16", "--local", "32", "--stride", "2", "--dense-layers", "1",
       "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert train.main([*TOY, "--eval-tokens", "80", "--eval-lengths", "40,80", "--out", str(out)]) == 0
    return out


def test_train_writes_log_checkpoints_plot_and_summary(run_dir):
    with open(run_dir / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["dense"] * 4 + ["hhst"] * 4 + ["homo"] * 4
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())["results"]
    assert [r["variant"] for r in summary] == ["dense", "hhst", "homo"]
    for r in summary:
        assert r["tokens"] == 4 * 2 * 160 and r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
    assert "| hhst |" in (run_dir / "summary.md").read_text()
    pytest.importorskip("matplotlib")
    assert (run_dir / "loss_curves.png").stat().st_size > 0


def test_variants_share_initial_weights_and_data(run_dir):
    """Same seed and shapes: step-1 losses differ only through the attention pattern (a little)."""
    with open(run_dir / "train_log.csv") as f:
        first = {r["variant"]: float(r["loss"]) for r in csv.DictReader(f) if r["step"] == "1"}
    assert max(first.values()) - min(first.values()) < 0.05


@pytest.mark.parametrize("variant", ["dense", "hhst", "homo"])
def test_checkpoint_reloads(run_dir, variant):
    model, name = train.load_checkpoint(run_dir / variant / "checkpoint")
    assert name == variant
    expected = {"dense": "sdpa", "hhst": "s2attn", "homo": "s2attn"}[variant]
    assert model.config._attn_implementation == expected
    if variant != "dense":
        assert model.config.s2attn["homogeneous"] == (variant == "homo")
        assert model.config.s2attn["dense_layers"] == [1]
    saved = safetensors.torch.load_file(run_dir / variant / "checkpoint" / "model.safetensors")
    state = model.state_dict()
    assert len(saved) > 10 and all(torch.equal(state[k], v) for k, v in saved.items())


class RunsCode:
    """Pickles as a call to ``Path.touch(marker)``: loading it with ``weights_only=False`` creates the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_checkpoints_are_refused_and_run_nothing(run_dir, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "checkpoint.pt"
    torch.save({"variant": "dense", "payload": RunsCode(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"checkpoint='.*checkpoint\.pt': refused, it holds more than tensors and "
                                         r"plain values \(a pickle whose loading could run code"):
        needle.main(["--checkpoint", str(crafted), "--lengths", "64", "--samples", "1", "--out", str(tmp_path)])
    directory = tmp_path / "crafted"  # a save_pretrained look-alike whose weights are the pickle
    shutil.copytree(run_dir / "dense" / "checkpoint", directory)
    (directory / "model.safetensors").unlink()
    shutil.copy(crafted, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"expected a directory written by `s2attn train` \(s2attn_run\.json and "
                                         r"model\.safetensors"):
        train.load_checkpoint(directory)
    assert not marker.exists()


def test_checkpoint_files_of_earlier_versions_still_load(run_dir, tmp_path):
    """``checkpoint.pt`` as earlier versions wrote it (tensors and plain values): read with weights_only=True."""
    model, _ = train.load_checkpoint(run_dir / "hhst" / "checkpoint")
    legacy = tmp_path / "checkpoint.pt"
    torch.save({"variant": "hhst", "step": 4, "config": model.config.to_dict(), "attn_implementation": "s2attn",
                "args": {"steps": 4}, "state_dict": model.state_dict()}, legacy)
    again, name = train.load_checkpoint(legacy)
    assert name == "hhst" and again.config._attn_implementation == "s2attn"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_train_on_text_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It was the best of times, it was the worst of times. " * 40)
    out = tmp_path / "run"
    assert train.main([*TOY, "--variants", "hhst", "--steps", "2", "--data", str(corpus), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["task"] == "text" and len(summary["results"]) == 1


def test_loss_on_all_tokens(tmp_path):
    """--loss all trains on next-token loss everywhere: a different loss from the answer tokens' alone."""
    first = {}
    for loss in ("answer", "all"):
        out = tmp_path / loss
        assert train.main([*TOY, "--variants", "dense", "--steps", "1", "--task", "copy", "--loss", loss,
                           "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["args"]["loss"] == loss
        first[loss] = summary["results"][0]["final_loss"]
        assert "heldout" not in summary["results"][0]  # no --eval-tokens
    assert first["answer"] != first["all"]


def test_length_curriculum(tmp_path):
    """--min-len 40 at --seq-len 160: lengths 40, 80 over the first half of the steps, then 160; tokens per step kept."""
    out = tmp_path / "curriculum"
    assert train.main([*TOY, "--variants", "dense", "--task", "passkey", "--min-len", "40", "--out", str(out)]) == 0
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seq_len"]) for r in rows] == [40, 80, 160, 160]
    assert [int(r["tokens"]) for r in rows] == [320, 640, 960, 1280]
    assert [train.seq_len_at(s, 16, 1024, 128) for s in range(0, 16, 2)] == [128, 128, 256, 512, 1024, 1024, 1024, 1024]
    assert {train.seq_len_at(s, 10, 100, 100) for s in range(10)} == {100}


def test_bad_arguments_are_named(tmp_path, capsys):
    """More cases in tests/apps/test_cli.py; here: through ``python -m s2attn.apps.train``'s entry point."""
    assert train.main([*TOY, "--min-len", "200", "--out", str(tmp_path)]) == 2
    assert "s2attn train: error: --min-len=200" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train.main([*TOY, "--variants", "dense,sparse", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--variants" in capsys.readouterr().err
    assert not (tmp_path / "train_log.csv").exists()


def test_homogeneous_ablation_does_not_warn_but_hhst_would():
    """homo is not union complete by design, and asked for (no warning); hhst with a stride its kv heads
    cannot cover warns."""
    import warnings

    from s2attn.apps.cli import build_parser
    from s2attn.coverage import NotUnionCompleteWarning

    parser = build_parser("train")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotUnionCompleteWarning)
        train.build_config("homo", parser.parse_args(["train", *TOY, "--stride", "7"]), 160)
        train.build_config("hhst", parser.parse_args(["train", *TOY]), 160)  # 2 kv heads, stride 2: complete
    with pytest.warns(NotUnionCompleteWarning, match="2 sparse kv-head groups cannot cover 3 offsets"):
        train.build_config("hhst", parser.parse_args(["train", *TOY, "--stride", "3"]), 160)


def test_lr_schedule():
    lrs = [train.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_heldout_loss_in_the_summary(run_dir):
    """--eval-tokens: the loss on held-out sequences at each --eval-lengths, in the variant's summary row."""
    rows = json.loads((run_dir / "summary.json").read_text())["results"]
    for r in rows:
        assert [h["length"] for h in r["heldout"]] == [40, 80]
        assert [h["sequences"] for h in r["heldout"]] == [2, 1] and [h["tokens"] for h in r["heldout"]] == [80, 80]
        assert all(math.isfinite(h["loss"]) and 0 <= h["answer_acc"] <= 1 for h in r["heldout"])
    assert rows[0]["heldout"] != rows[1]["heldout"]


class Oracle(torch.nn.Module):
    """Logits 30 on the true next token (the shifted input), 0 elsewhere; with ``wrong``, on the token after
    it at the key's third-last digit (a passkey's answer is its last 5 tokens)."""

    def __init__(self, wrong=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt[:, -4] = (nxt[:, -4] + 1) % 256
        return SimpleNamespace(logits=30 * torch.nn.functional.one_hot(nxt, 256).float())


def test_heldout_set_is_fixed_and_apart_from_training(monkeypatch):
    """The held-out sequences depend on neither --seed nor --batch-size, and come from a stream no training
    seed names; loss and accuracy are over the supervised tokens (answer or all, as in training)."""
    seeds = []
    batches = train.data.batches
    monkeypatch.setattr(train.data, "batches", lambda *a, **k: seeds.append(k["seed"]) or batches(*a, **k))
    args = argparse.Namespace(task="passkey", loss="answer", batch_size=2, seq_len=160, seed=0)
    result = train.heldout_loss(Oracle(), args, 80, 600)
    assert result == {"length": 80, "sequences": 8, "tokens": 640, "loss": pytest.approx(0, abs=1e-9),
                      "answer_acc": 1.0}
    args.seed, args.batch_size = 7, 5
    assert train.heldout_loss(Oracle(), args, 80, 600) == result
    assert seeds == ["heldout/80", "heldout/80"]
    wrong = train.heldout_loss(Oracle(wrong=True), args, 80, 600)
    assert wrong["answer_acc"] == pytest.approx(0.8) and wrong["loss"] == pytest.approx(30 / 5, rel=1e-3)
    every = train.heldout_loss(Oracle(), argparse.Namespace(task="copy", loss="all", batch_size=1, seq_len=80), 80, 1)
    assert every["sequences"] == 1 and every["loss"] == pytest.approx(0, abs=1e-9)
