"""The benchmark scripts run only on a GPU, so CI never executes them: check at least that every name they take
from s2attn exists (`from s2attn.x import name`, and `module.name` on an s2attn module they imported), so a
rename in the library cannot leave a script that fails at its first line on the GPU machine. Imports under an
`if` or `try` are left alone (a script may serve older checkouts on purpose), and so are names the script
binds again (a parameter or variable named like a module)."""

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _unconditional(tree: ast.AST):
    """Every node not under an ``if`` or ``try``."""
    for child in ast.iter_child_nodes(tree):
        if not isinstance(child, (ast.If, ast.Try)):
            yield child
            yield from _unconditional(child)


def _missing(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: dict[str, types.ModuleType] = {}  # local name -> an s2attn module the script imported
    missing = []
    for node in _unconditional(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "s2attn":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"from {node.module} import {alias.name}")
                        continue
                else:
                    value = getattr(module, alias.name)
                if isinstance(value, types.ModuleType):
                    modules[alias.asname or alias.name] = value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "s2attn" and alias.asname:
                    modules[alias.asname] = importlib.import_module(alias.name)
    rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    rebound |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    modules = {name: module for name, module in modules.items() if name not in rebound}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and not hasattr(modules[node.value.id], node.attr)):
            missing.append(f"{node.value.id}.{node.attr}")
    return missing


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_names_from_s2attn_exist(path):
    assert not _missing(path)


def test_a_stale_name_is_caught(tmp_path):
    script = tmp_path / "stale.py"
    script.write_text("from s2attn.apps import bench\nfrom s2attn import nothing_here\nbench._no_such_helper()\n"
                      "if old:\n    from s2attn.gone import x\n")
    assert _missing(script) == ["from s2attn import nothing_here", "bench._no_such_helper"]
