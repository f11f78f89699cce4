"""The ``s2attn`` command: ``patterns`` at a million tokens, ``demo`` on the CPU, the bench hook, feature commands."""

import importlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from s2attn import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
    """``python -m s2attn ARGS`` in a fresh process (so the import cost is counted, as a user sees it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "s2attn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    return proc, time.perf_counter() - start


def test_patterns_million_tokens_is_fast(tmp_path):
    png = tmp_path / "p.png"
    proc, seconds = run_cli("patterns", "--heads", 32, "--seq-len", 1 << 20, "--block-size", 64, "--local", 512,
                            "--stride", 16, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert seconds < 20, f"s2attn patterns took {seconds:.1f} s at 1M tokens"
    out = proc.stdout
    assert "1,048,576 tokens = 16,384 blocks of 64" in out
    assert "union complete       yes" in out and "KV-cache efficient   yes" in out
    assert "KV tokens kept/head" in out and "% of dense" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,expect", [
    (["--homogeneous"], "union complete       no"),
    (["--kv-heads", 8, "--dense-heads", 1], "union complete       yes"),
    (["--heads", 8], "union complete       no"),
    (["--bidirectional"], "n/a (bidirectional"),
    (["--head-step", 0, "--head-offset", 3], "union complete       no"),
])
def test_patterns_options(capsys, args, expect):
    assert cli.main(["patterns", "--seq-len", "65536", *map(str, args)]) == 0
    assert expect in capsys.readouterr().out


def test_patterns_bad_arguments(capsys):
    assert cli.main(["patterns", "--local", "100"]) == 2
    assert "--local=100: expected a multiple of --block-size=64" in capsys.readouterr().err
    assert cli.main(["patterns", "--heads", "6", "--kv-heads", "4"]) == 2
    assert "num_kv_heads=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["patterns", "--no-such-option"])


def test_demo_runs_on_cpu(tmp_path):
    proc, _ = run_cli("demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "demo" / "pattern.png").read_bytes()[:4] == b"\x89PNG"
    assert "union complete       yes" in proc.stdout
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout


def test_bench_delegates_to_the_bench_module(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "s2attn.bench", types.SimpleNamespace(main=lambda argv: calls.append(argv)))
    assert cli.main(["bench", "--quick", "--seq-len", "8192"]) == 0
    assert cli.main(["bench", "--help"]) == 0
    assert calls == [["--quick", "--seq-len", "8192"], ["--help"]]


def test_bench_without_the_bench_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "s2attn.bench", None)  # makes `import s2attn.bench` fail
    assert cli.main(["bench"]) == 2
    assert "s2attn.bench is not available" in capsys.readouterr().err


def test_feature_commands_are_imported_only_when_run(monkeypatch, capsys):
    def add_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(func=lambda args: print("hello " * args.times) or 3)
        return p

    imported = []
    monkeypatch.setitem(cli.FEATURE_COMMANDS, "hello", ("fake_feature", "say hello"))
    monkeypatch.setitem(sys.modules, "fake_feature", types.SimpleNamespace(
        add_parser=lambda sub: imported.append(True) or add_parser(sub)))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "hello" in capsys.readouterr().out and not imported
    assert cli.main(["hello", "--times", "2"]) == 3
    assert capsys.readouterr().out.strip() == "hello hello" and imported


@pytest.mark.parametrize("name", cli.FEATURE_COMMANDS)
def test_registered_feature_commands_build_their_parsers(name, capsys):
    try:
        importlib.import_module(cli.FEATURE_COMMANDS[name][0])
    except ModuleNotFoundError as e:  # an optional dependency (an extra) is not installed: a clear error
        assert cli.main([name, "--help"]) == 2
        assert f"needs the package {e.name!r}" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--help"])
    assert info.value.code == 0 and f"usage: s2attn {name}" in capsys.readouterr().out


def test_feature_command_missing_dependency(monkeypatch, capsys):
    monkeypatch.setitem(cli.FEATURE_COMMANDS, "needs_extra", ("fake_feature_with_extra", "needs an extra"))

    def fail(sub):
        raise ModuleNotFoundError("No module named 'some_extra'", name="some_extra")

    monkeypatch.setitem(sys.modules, "fake_feature_with_extra", types.SimpleNamespace(add_parser=fail))
    assert cli.main(["needs_extra"]) == 2
    assert "needs the package 'some_extra'" in capsys.readouterr().err
