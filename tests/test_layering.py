"""The library apart from the lab: nothing outside ``s2attn.apps`` imports it, and the library imports
without the optional dependencies (``transformers``, ``tqdm``, ``matplotlib``, ``vllm``)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "s2attn"
OPTIONAL = ("transformers", "tqdm", "matplotlib", "vllm")
# Modules that need an optional dependency to import, and which. Every other module of the package must
# import with all of OPTIONAL missing.
NEEDS = {
    "s2attn.apps.needle": "tqdm, transformers",
    "s2attn.apps.train": "tqdm, transformers",
    "s2attn.integrations.megatron": "megatron-core",
    "s2attn.integrations.transformers": "transformers",
    "s2attn.integrations.vllm.backend": "vllm",
    "s2attn.integrations.vllm.patterns": "transformers (the config helpers of integrations.transformers)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_nothing_outside_apps_imports_apps():
    """The core never imports the applications (``python -m s2attn``'s ``__main__`` is a program, not a
    module: it starts the command line)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "s2attn.apps" or name.startswith("s2attn.apps.") or name == "s2attn.__main__":
            continue
        bad = sorted(m for m in imported_modules(path) if m == "s2attn.apps" or m.startswith("s2attn.apps."))
        offenders += [f"{path.relative_to(ROOT)} imports {m}" for m in bad]
    assert not offenders, "\n".join(offenders)


def test_the_scan_resolves_relative_imports():
    """The check above would see ``from ..apps import cli`` in a subpackage and ``from .apps import x`` at the top."""
    assert "s2attn.apps.cli" in imported_modules(PACKAGE / "__main__.py")
    assert imported_modules(PACKAGE / "models" / "hhst.py") >= {"s2attn.integrations"}


def test_the_library_imports_without_optional_dependencies():
    """Every module but those in NEEDS imports in a process where the optional dependencies are missing
    (an import hook refuses them, as if they were not installed)."""
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, Missing())
        import s2attn
        names = [m.name for m in pkgutil.walk_packages(s2attn.__path__, "s2attn.")]
        skip = set({sorted(NEEDS)!r}) | {{"s2attn.__main__"}}
        for name in ["s2attn", *names]:
            if name not in skip:
                importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
        assert not loaded, loaded
        print(len(names) + 1 - len(skip), "modules imported")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules imported" in proc.stdout
