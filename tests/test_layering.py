"""The library apart from the lab: nothing outside ``s2attn.apps`` imports it."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "s2attn"


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

