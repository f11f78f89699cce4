"""The ``s2attn`` command: ``patterns`` at a million tokens, ``demo`` on the CPU, the bench hook, feature commands."""

import importlib
import importlib.util
import os
import resource
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import s2attn
from s2attn.apps import cli

pytestmark = pytest.mark.quick  # `make test-quick`

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=120):
    """``python -m s2attn ARGS`` in a fresh process (so the import cost is counted, as a user sees it), and the
    CPU seconds it used: unlike wall time, not stretched by other processes (pytest-xdist workers, other jobs:
    7 s alone read 21 s of wall time on a loaded 2-core machine)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "s2attn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_patterns_million_tokens_is_fast(tmp_path):
    png = tmp_path / "p.png"
    proc, seconds = run_cli("patterns", "--heads", 32, "--seq-len", 1 << 20, "--block-size", 64, "--local", 512,
                            "--stride", 16, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert seconds < 20, f"s2attn patterns took {seconds:.1f} CPU seconds at 1M tokens"
    out = proc.stdout
    assert "1,048,576 tokens = 16,384 blocks of 64" in out
    assert "union complete       yes" in out and "KV-cache efficient   yes" in out
    assert "KV tokens kept/head" in out and "% of dense" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,expect", [
    (["--homogeneous"], "union complete       no"),
    (["--kv-heads", 8, "--dense-kv-heads", 1], "union complete       yes"),
    (["--heads", 8], "union complete       no"),
    (["--bidirectional"], "n/a (bidirectional"),
    (["--head-step", 0, "--head-offset", 3], "union complete       no"),
])
def test_patterns_options(capsys, args, expect):
    assert cli.main(["patterns", "--seq-len", "65536", *map(str, args)]) == 0
    assert expect in capsys.readouterr().out


def test_patterns_explains_what_is_not_union_complete(capsys):
    """The README's GQA case: 8 kv heads cannot cover stride 16; stride 8 (or one dense kv head) can."""
    assert cli.main(["patterns", "--kv-heads", "8", "--seq-len", "131072", "--kv-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "union complete       no" in out
    out = " ".join(out.split())  # the explanation is wrapped
    assert "offsets {0, 2, 4, 6, 8, 10, 12, 14} of every 16 key blocks" in out
    assert "8 sparse kv-head groups cannot cover 16 offsets" in out
    assert "--stride 8 --head-step 1 (density 13.18%, KV kept/head 12.8% of dense)" in out
    assert "--dense-kv-heads 1 (density 18.61%" in out
    assert "sequences in 80 GiB 76 (dense 5)" in out
    assert cli.main(["patterns", "--kv-heads", "8", "--stride", "8", "--seq-len", "131072", "--kv-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "union complete       yes" in out and "why:" not in out
    assert "KV tokens kept/head  16,832 / 16,832 / 16,832 tokens = 12.8" in out
    assert "sequences in 80 GiB  39 (dense 5)" in out


def test_patterns_with_nothing_short_of_dense(capsys):
    assert cli.main(["patterns", "--kv-heads", "1", "--seq-len", "65536"]) == 0
    assert "no union-complete local-stride setting short of dense attention" in capsys.readouterr().out


def test_demo_runs_on_cpu(tmp_path):
    proc, _ = run_cli("demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "demo" / "pattern.png").read_bytes()[:4] == b"\x89PNG"
    assert "union complete       yes" in proc.stdout
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout


def test_bench_delegates_to_the_bench_module(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "s2attn.apps.bench", types.SimpleNamespace(main=lambda argv: calls.append(argv)))
    assert cli.main(["bench", "--quick", "--seq-len", "8192"]) == 0
    assert cli.main(["bench", "--help"]) == 0
    assert calls == [["--quick", "--seq-len", "8192"], ["--help"]]


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


# ---------------------------------------------------------------- errors, units, help
def exit_code(argv):
    """``cli.main(argv)``'s exit code, whether it returns it or argparse raises ``SystemExit``."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


NOT_A_DIR = "NOT_A_DIR"  # replaced by a regular file's path: no directory can be made under it


@pytest.mark.parametrize("argv, named", [
    (["patterns", "--kv-heads", "3"], "--kv-heads=3"),
    (["patterns", "--local", "100"], "--local=100"),
    (["patterns", "--block-size", "48"], "--block-size: invalid choice: 48"),
    (["patterns", "--seq-len", "0"], "--seq-len: '0'"),
    (["patterns", "--dense-kv-heads", "9", "--kv-heads", "8"], "--dense-kv-heads=9"),
    (["patterns", "--plot", f"{NOT_A_DIR}/p.png"], "--plot="),
    (["demo", "--out", f"{NOT_A_DIR}/demo"], "--out="),
    (["bench", "--local", "100"], "--local=100"),
    (["bench", "--block-size", "48"], "--block-size: invalid choice: 48"),
    (["train", "--local", "8"], "--local=8"),
    (["train", "--block-size", "48"], "--block-size: invalid choice: 48"),
    (["train", "--kv-heads", "3"], "--kv-heads=3"),
    (["train", "--d-model", "100"], "--d-model=100"),
    (["train", "--layers", "1"], "--dense-layers=0"),
    (["train", "--dense-layers", "4"], "--dense-layers=4"),
    (["train", "--dense-layers", "one"], "--dense-layers: 'one'"),
    (["train", "--variants", "dense,sparse"], "--variants: 'dense,sparse'"),
    (["train", "--steps", "0"], "--steps: '0'"),
    (["train", "--min-len", "2000"], "--min-len=2000"),
    (["train", "--seq-len", "8", "--task", "passkey"], "--seq-len=8"),
    (["train", "--data", "no/such/file.txt"], "--data: 'no/such/file.txt': no such file"),
    (["train", "--device", "cuda:99"], "--device: 'cuda:99'"),
    (["train", "--device", "npu"], "--device: 'npu'"),
    (["train", "--out", f"{NOT_A_DIR}/run"], "--out="),
    (["needle", "--lengths", "8"], "--lengths=8"),
    (["needle", "--lengths", ""], "--lengths="),
    (["needle", "--checkpoint", "no/such.pt"], "--checkpoint: 'no/such.pt': no such file or directory"),
    (["needle", "--kv-heads", "3"], "--kv-heads=3"),
    (["needle", "--depths", "0"], "--depths: '0'"),
    (["needle", "--device", "cuda:99"], "--device: 'cuda:99'"),
])
def test_bad_values_end_in_one_line_naming_the_option(argv, named, tmp_path, monkeypatch, capsys):
    if "transformers" not in sys.modules and argv[0] in cli.FEATURE_COMMANDS:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / NOT_A_DIR).write_text("a file")
    assert exit_code(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and named in err and err.startswith(f"s2attn {argv[0]}: error: "), err
    assert captured.out == "" and not (tmp_path / "runs").exists()  # nothing run, nothing written


def test_window_options_are_tokens_in_every_subcommand():
    """--local 512 --stride 8 --block-size 64 is the same pattern (8 local blocks, every 8th block) everywhere."""
    pytest.importorskip("transformers")
    from s2attn.apps import bench, options, train

    argv = ["--local", "512", "--stride", "8", "--block-size", "64"]
    parsers = [subparser(name) for name in ("patterns", "train", "needle")] + [bench.build_parser()]
    parsed = [p.parse_args(argv) for p in parsers]
    for args in parsed:
        assert options.pattern_options(args, 8, 8) == dict(block_size=64, local_blocks=8, vert_stride=8,
                                                       **({"num_dense_heads": 0} if "dense_kv_heads" in args else {}))
    config = train.build_config("hhst", parsed[1], 1024)
    assert (config.s2attn["local_blocks"], config.s2attn["vert_stride"], config.s2attn["block_size"]) == (8, 8, 64)
    helps = [" ".join(p.format_help().split()) for p in parsers]
    assert all("--local TOKENS local window in tokens" in h and "--stride N vertical stride: every N-th key block" in h
               for h in helps)


def subparser(name):
    """The parser of subcommand ``name``, as ``s2attn NAME ...`` uses it."""
    return cli.build_parser(name)._subparsers._group_actions[0].choices[name]


def every_parser():
    """(name, parser) of every subcommand, bench's own parser included (feature commands need their extras)."""
    from s2attn.apps import bench

    names = ["patterns", "demo"] + [n for n in cli.FEATURE_COMMANDS if importlib.util.find_spec("transformers")]
    return [(n, subparser(n)) for n in names] + [("bench", bench.build_parser())]


def test_help_shows_every_default():
    import argparse

    for name, parser in every_parser():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            shown = " ".join(parser._get_formatter()._format_action(action).split())  # as --help prints it
            assert "(default" in shown, f"s2attn {name} {action.option_strings[-1]}: no default in --help"


def test_version(capsys):
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"s2attn {s2attn.__version__} (torch {torch.__version__}, triton ")


def test_demo_without_matplotlib_says_where_the_plot_would_go(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as after `pip install s2attn` without the plot extra
    monkeypatch.setattr(cli, "check_against_reference", lambda *args: True)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert f"not drawn: matplotlib is not installed (pip install 's2attn[plot]' draws {tmp_path / 'demo'}" in out
    assert not (tmp_path / "demo" / "pattern.png").exists()
