"""benchmarks/train_quality_seeds.py on synthetic run directories, and the runner's resume and budget at a toy
size (CPU, dense only)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_quality_seeds", ROOT / "benchmarks" / "train_quality_seeds.py")
tqs = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
spec.loader.exec_module(tqs)

LENGTHS, DEPTHS = (1024, 8192, 16384), (0.0, 0.5, 0.9, 1.0)


def fake_run(results: Path, variant: str, seed: int, *, passkey: float, loss: float, slow: float = 1.0) -> None:
    """A run directory as the runner writes it: passkey ``passkey`` at depths < 1 up to 8192, 0 beyond and at 1;
    200 / ``slow`` tokens/s at 8192."""
    run = results / f"{variant}-s{seed}"
    run.mkdir(parents=True)
    args = {"seq_len": 8192, "steps": 4, "seed": seed, "variants": [variant], "out": f"/tmp/{variant}"}
    heldout = [{"length": n, "sequences": 1, "tokens": n, "loss": loss * (3 if n > 8192 else 1), "answer_acc": 0.5}
               for n in LENGTHS]
    row = {"variant": variant, "final_loss": loss / 2, "final_answer_acc": 0.9, "tokens_per_s": 1e5, "heldout": heldout}
    (run / "summary.json").write_text(json.dumps({"args": args, "results": [row]}))
    (run / "run.json").write_text(json.dumps({"wall_s": 12.0, "device": "fake", "commit": "abc1234"}))
    with open(run / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "step", "seq_len", "tokens", "loss", "answer_acc", "lr",
                                          "elapsed_s"])
        w.writeheader()
        for step, (n, tokens, seconds) in enumerate([(4096, 100, 1.0), (4096, 200, 2.0), (8192, 300, 2.5),
                                                     (8192, 400, 3.0)], 1):
            w.writerow({"variant": variant, "step": step, "seq_len": n, "tokens": tokens, "loss": loss + 1 / step,
                        "answer_acc": 0.5, "lr": 1e-3, "elapsed_s": seconds * slow})
    with open(run / "needle.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "length", "depth", "accuracy", "samples"])
        w.writeheader()
        for n in LENGTHS:
            for d in DEPTHS:
                w.writerow({"model": variant, "length": n, "depth": f"{d:.3f}", "samples": 10,
                            "accuracy": passkey if n <= 8192 and d < 1 else 0.0})


def test_statistics():
    assert tqs.t_two_sided_p(4.303, 2) == pytest.approx(0.05, abs=1e-4)
    assert tqs.t_two_sided_p(-2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert tqs.t_two_sided_p(0.0, 3) == pytest.approx(1.0) and tqs.t_two_sided_p(1e6, 3) < 1e-6
    assert tqs.t_two_sided_p(1.0, 1) == pytest.approx(0.5)
    assert tqs.t_two_sided_p(2.0, 1e4) == pytest.approx(0.0455, abs=1e-4)
    w = tqs.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w["diff"] == -3 and w["t"] == pytest.approx(-3.674, abs=1e-3) and w["df"] == pytest.approx(4)
    assert w["p"] == pytest.approx(0.0213, abs=1e-3)
    assert tqs.welch([1.0], [2.0, 3.0])["p"] is None
    assert tqs.welch([1.0, 1.0], [2.0, 2.0])["note"].startswith("no spread")
    d = tqs.paired([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # differences 1, 2, 3
    assert d["diff"] == 2 and d["t"] == pytest.approx(3.464, abs=1e-3) and d["df"] == 2
    assert d["p"] == pytest.approx(0.0742, abs=1e-3)
    assert tqs.paired([1.0, 2.0], [1.0, 2.0])["note"] == "identical in every run"
    assert tqs.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and tqs.mean_std([5.0]) == (5.0, None)


def test_report_from_partial_runs(tmp_path):
    """3 seeds of dense and hhst, 1 of homo, 1 killed part-way: means ± std, verdicts and what is missing."""
    for seed, (a, b) in enumerate([(0.90, 0.50), (0.95, 0.55), (0.92, 0.45)]):
        fake_run(tmp_path, "dense", seed, passkey=a, loss=0.10 + seed / 100, slow=1 + seed / 10)
        fake_run(tmp_path, "hhst", seed, passkey=b, loss=0.11 - seed / 100, slow=1.05 * (1 + seed / 10))
    fake_run(tmp_path, "homo", 1, passkey=0.3, loss=0.2)
    (tmp_path / "homo-s2.partial").mkdir()
    (tmp_path / "notes").mkdir()  # not a run directory
    assert tqs.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "**Missing**: homo-s0, homo-s2; killed or in progress: homo-s2.partial." in text
    table = text.split("## Mean ± std over seeds")[1].split("##")[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert rows["| dense"].startswith("| dense | 3 | 0.1100 ± 0.0100 | 0.3300 ± 0.0300 | 0.0550 ± 0.0050 | "
                                      "0.923 ± 0.025 | 0.923 ± 0.025 | 0.000 ± 0.000 | 0.000 ± 0.000 | 183 ± 17 |")
    assert rows["| homo"].startswith("| homo | 1 | 0.2000 | 0.6000 |")
    assert "| 8192 | 16384 (beyond training) |" in text
    claims = text.split("## The claims")[1]
    for line in [
        "passkey @ 8192: hhst 0.500 ± 0.050 vs dense 0.923 ± 0.025 (n = 3, 3); difference -0.423; Welch: t = -13.10, "
        "df = 3.0, p = 0.001: **significant** at 5%, dense better; paired by seed (n = 3): t = -18.14",
        "held-out loss @ 8192: hhst 0.1000 ± 0.0100 vs dense 0.1100 ± 0.0100 (n = 3, 3); difference -0.0100; Welch: "
        "t = -1.22, df = 4.0, p = 0.288: not significant at 5%; paired by seed (n = 3): t = -0.87, df = 2.0, "
        "p = 0.478: not significant at 5%",
        # the same seed's runs differ by the same few percent: only the paired test sees it
        "tokens/s @ 8192 stage: hhst 174 ± 16 vs dense 183 ± 17 (n = 3, 3); difference -9; Welch: t = -0.65, df = 4.0, "
        "p = 0.549: not significant at 5%; paired by seed (n = 3): t = -18.97, df = 2.0, p = 0.003: **significant** at "
        "5%, dense better",
        "passkey @ 16384: hhst 0.000 ± 0.000 vs dense 0.000 ± 0.000 (n = 3, 3); difference +0.000; Welch: identical in "
        "every run; paired by seed (n = 3): identical in every run",
        "held-out loss @ 8192: hhst 0.1000 ± 0.0100 vs homo 0.2000 (n = 3, 1); difference -0.1000; Welch: not "
        "testable with n = 3 and 1 (needs two runs of each)\n",  # one seed in common: no paired test
    ]:
        assert line in claims
    assert "| homo-s1 | 0.2000 |" in text and text.count("| fake | abc1234 |") == 7
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "needle.png").stat().st_size > 0
    assert "![needle.png](needle.png)" in text


def test_report_names_settings_that_differ(tmp_path):
    fake_run(tmp_path, "dense", 0, passkey=1, loss=0.1)
    fake_run(tmp_path, "hhst", 0, passkey=1, loss=0.1)
    summary = json.loads((tmp_path / "hhst-s0" / "summary.json").read_text())
    summary["args"]["steps"] = 8
    (tmp_path / "hhst-s0" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "dense-s0" / "needle.csv").unlink()
    assert tqs.main(["--results", str(tmp_path), "--variants", "dense,hhst", "--seeds", "0"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "**Warning**: the runs differ in steps (4, 8)" in text
    assert "**Missing**: none of the expected runs; dense-s0 lacks needle.csv." in text


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_runner_resumes_and_keeps_to_its_budget(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path / "r"), "WORK": str(tmp_path / "w"),
           "DEVICE": "cpu", "SEQ": "64", "STEPS": "2", "BATCH": "1", "D_MODEL": "16", "LAYERS": "1", "HEADS": "2",
           "KV_HEADS": "2", "BLOCK": "16", "LOCAL": "32", "STRIDE": "2", "MIN_LEN": "0",
           "NEEDLE_LENGTHS": "64,96", "NEEDLE_DEPTHS": "0,1", "NEEDLE_SAMPLES": "1", "EVAL_TOKENS": "64"}
    script = [str(ROOT / "benchmarks" / "train_quality_seeds.sh")]
    first = subprocess.run(["bash", *script, "VARIANTS=dense", "SEEDS=0", f"BUNDLE={tmp_path / 'b.tar.gz'}"], env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = tmp_path / "r" / "dense-s0"
    assert {p.name for p in run.iterdir()} >= {"run.log", "run.json", "summary.json", "train_log.csv", "needle.csv"}
    assert json.loads((run / "summary.json").read_text())["results"][0]["heldout"][1]["length"] == 96
    assert "finished dense-s0" in first.stdout and (tmp_path / "b.tar.gz").stat().st_size > 0
    again = subprocess.run(["bash", *script, "VARIANTS=dense", "SEEDS=0,1", "BUDGET_S=1"], env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished none; already there dense-s0; left for another call dense-s1" in again.stdout
    listed = subprocess.run(["bash", *script, "RUNS=dense-s0"], env=env, capture_output=True, text=True)
    assert "finished none; already there dense-s0; left for another call none" in listed.stdout
    for arg, error in [("SEED=1", "argument 'SEED=1': expected NAME=value"),
                       ("RUNS=dense-s0,homo-1", "RUNS=dense-s0,homo-1: 'homo-1' is not <dense|hhst|homo>-s<seed>")]:
        bad = subprocess.run(["bash", *script, arg], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and error in bad.stderr
