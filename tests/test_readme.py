"""The README's numbers and versions, held to what they claim: every figure in "Choosing a pattern" and
"Serving" against the command printed beside it, and the support matrix's tested versions against the pins
CI installs (the Makefile) and the ranges the package declares (pyproject.toml)."""

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

import s2attn
from s2attn.apps import cli

pytestmark = pytest.mark.quick  # `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in ``text``: one dict per row, keyed by the header."""
    lines = [li for li in text.splitlines() if li.startswith("|")]
    cells = [[c.strip() for c in li.strip("|").split("|")] for li in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def run(command: str, capsys) -> str:
    """``s2attn ...`` as printed in the README, run in-process; its output with whitespace normalised."""
    argv = shlex.split(command.strip("`"))
    assert argv[0] == "s2attn" and cli.main(argv[1:]) == 0
    return " ".join(capsys.readouterr().out.split())


def number(text: str) -> str:
    return text.replace(",", "")


def test_choosing_a_pattern_table(capsys):
    rows = table(section("Choosing a pattern"))
    assert len(rows) >= 4
    for row in rows:
        out = run(row["reproduce"], capsys)
        complete = "yes" if row["union complete"].startswith("yes") else "no"
        assert f"union complete {complete} " in out, row["settings"]
        assert f"density {row['density']} of the causal blocks" in out, row["settings"]
        kept = re.search(r"KV tokens kept/head ([\d,]+) / [\d,]+ / ([\d,]+) tokens = [\d.]+ / ([\d.]+) / [\d.]+ %", out)
        low, high = (row["KV kept per kv head"].removesuffix(" tokens").split("–") * 2)[:2]
        assert (kept[1], kept[2], kept[3] + "%") == (low, high, row["of dense"]), row["settings"]
        assert f"sequences in 80 GiB {row['128k sequences in 80 GiB']} (dense 5)" in out, row["settings"]


def test_serving_numbers(capsys):
    from s2attn.inference import kv_blocks_kept

    text = " ".join(section("Serving").split())
    claim = re.search(r"local (\d+), stride (\d+): union complete\) the pool holds ([\d,]+)–([\d,]+) tokens per kv "
                      r"head, ([\d.]+)× the ideal `local \+ context / stride` = ([\d,]+), \*\*([\d.]+)% of a dense",
                      text)
    local, stride = int(claim[1]), int(claim[2])
    pattern = s2attn.local_stride(32, 131072, 64, local // 64, stride, num_kv_heads=8)
    assert pattern.is_union_complete()
    pool = kv_blocks_kept(pattern, 32, 8, 131072) * 64
    ideal = local + 131072 // stride
    assert (int(number(claim[3])), int(number(claim[4])), int(number(claim[6]))) == (pool.min(), pool.max(), ideal)
    assert f"{float(pool.double().mean()) / ideal:.2f}" == claim[5]
    assert f"{float(pool.double().mean()) / 131072:.1%}" == claim[7] + "%"
    fits = re.search(r"\*\*(\d+) sequences of 128k tokens in 80 GiB of KV memory versus (\d+) with a dense cache\*\*, "
                     r"(\d+) versus (\d+) beside 14 GB of bf16 weights \((`s2attn patterns [^`]+`), and `([^`]+)`\)",
                     text)
    command = fits[5]
    assert f"--stride {stride} " in command
    assert f"sequences in 80 GiB {fits[1]} (dense {fits[2]})" in run(command, capsys)
    weights = run(command.replace("--kv-memory 80", fits[6]), capsys)
    assert f"sequences in 66.96 GiB {fits[3]} (dense {fits[4]})" in weights
    assert abs(80 - 14e9 / 2**30 - 66.96) < 0.01
    sparser = re.search(r"Stride (\d+) would keep half as much \((\d+) sequences\), but", text)
    out = run(command.replace(f"--stride {stride}", f"--stride {sparser[1]}"), capsys)
    assert f"sequences in 80 GiB {sparser[2]} " in out and "union complete no " in out


def test_support_matrix_matches_the_pins():
    rows = {row[""]: row for row in table(section("Supported versions and GPUs"))}
    makefile = (ROOT / "Makefile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = lambda name: re.search(rf"^{name.upper()} \?= {name}==([\d.]+)$", makefile, re.M)[1]  # noqa: E731
    floor = lambda name: next(re.search(r">=([\d.]+)", d)[1] for d in project["dependencies"]  # noqa: E731
                              if d.startswith(name))
    tested = "tested (CI: CPU; by hand: GPU)"
    assert f"{pin('torch')} CPU build (CI, `make test`)" in rows["torch"][tested]
    assert f"{pin('triton')} (CI" in rows["Triton"][tested]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == rows["Python"][tested]
    assert f"≥ {project['requires-python'].removeprefix('>=')} (`requires-python`)" == rows["Python"]["should work"]
    assert rows["torch"]["should work"].startswith(f"≥ {floor('torch')};")
    assert rows["Triton"]["should work"].startswith(f"≥ {floor('triton')};")
