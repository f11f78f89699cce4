"""No module global of s2attn is written from outside its module: settings reach the code as arguments (the
kernels' launch plans through ``plan_overrides``), not as module state that tests and benchmarks rewrite.

An AST scan of s2attn/, tests/ and benchmarks/ for ``module.NAME = ...`` (and ``del``, ``+=``, item
assignment), ``monkeypatch.setattr(module, "NAME", ...)`` / ``setitem(module.NAME, ...)`` / ``setattr(module,
...)``, and mutating calls on a module's global (``module.NAME.update(...)``), where ``module`` is an s2attn
module however it was imported. Test doubles that replace a function for one test are listed below, each with
its reason; nothing else may."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATORS = {"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault", "add",
            "discard", "__setitem__"}
TEST_DOUBLES = {  # (file, module, name): why a test replaces it for its own duration (monkeypatch restores it)
    ("tests/test_ops.py", "s2attn.ops", "_backward_grads"): "spy: the traced backward must not call the kernels",
    ("tests/apps/test_cli.py", "s2attn.apps.cli", "check_against_reference"): "stub: the CLI's check without kernels",
    ("tests/inference/test_inference_decode.py", "s2attn.inference.decode", "decode_attention"):
        "stub: proves no kernel launches off CUDA",
    ("tests/integrations/test_transformers.py", "s2attn.ops", "use_kernel"):
        "stub: generation through the reference under the slow CPU interpreter",
    ("tests/integrations/test_vllm.py", "s2attn.ops", "use_kernel"): "stub: as in test_transformers",
    ("tests/integrations/test_vllm.py", "s2attn.integrations.vllm.paged", "use_kernel"): "stub: as above",
    ("tests/apps/test_cli.py", "s2attn.apps.cli", "FEATURE_COMMANDS"): "registers a fake command to test the lazy imports",
}


def _is_module(name: str) -> bool:
    """Whether ``name`` is an s2attn module or package (from the files: importing would run them)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


class _Scan(ast.NodeVisitor):
    def __init__(self, path: Path):
        self.path = path.relative_to(ROOT).as_posix()
        parts = self.path[:-3].split("/")
        self.package = ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])
        self.own = ".".join(parts) if parts[-1] != "__init__" else self.package
        self.aliases: dict[str, str] = {}
        self.writes: list[tuple[str, str, int]] = []

    # -------------------------------------------------------------- which names are s2attn modules
    def visit_Import(self, node):
        for a in node.names:
            if a.name.split(".")[0] == "s2attn":
                self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "s2attn"

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            pkg = self.package.split(".")
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        if base.split(".")[0] != "s2attn":
            return
        for a in node.names:
            if _is_module(f"{base}.{a.name}"):
                self.aliases[a.asname or a.name] = f"{base}.{a.name}"

    def module(self, node):
        """The s2attn module ``node`` names, or None."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            outer = self.module(node.value)
            return f"{outer}.{node.attr}" if outer and _is_module(f"{outer}.{node.attr}") else None
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("s2attn")):
            return node.args[0].value
        return None

    def global_of(self, node):
        """``(module, NAME)`` where ``node`` is ``module.NAME`` (not itself a module), else None."""
        if isinstance(node, ast.Attribute) and self.module(node) is None:
            m = self.module(node.value)
            if m is not None:
                return m, node.attr
        return None

    # -------------------------------------------------------------- writes
    def record(self, target, node):
        g = self.global_of(target)
        if g is None and isinstance(target, ast.Subscript):
            g = self.global_of(target.value)
        if g is None and isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.record(t, node)
            return
        if g is not None and g[0] != self.own:
            self.writes.append((g[0], g[1], node.lineno))

    def visit_Assign(self, node):
        for t in node.targets:
            self.record(t, node)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self.record(node.target, node)
        self.generic_visit(node)

    visit_AnnAssign = visit_AugAssign

    def visit_Delete(self, node):
        for t in node.targets:
            self.record(t, node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("setattr", "delattr") and node.args:
            m = self.module(node.args[0])
            if m is not None and m != self.own:
                name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
                self.writes.append((m, name, node.lineno))
        if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args:
            m = self.module(node.args[0])
            if m is not None and m != self.own:
                self.writes.append((m, "?", node.lineno))
        if isinstance(f, ast.Attribute) and f.attr in ("setitem", "delitem") and node.args:
            self.record(node.args[0], node)
        if isinstance(f, ast.Attribute) and f.attr in MUTATORS:
            self.record(f.value, node)
        self.generic_visit(node)


def _writes():
    found = []
    for folder in ("s2attn", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            scan = _Scan(path)
            scan.visit(ast.parse(path.read_text(), str(path)))
            found += [(scan.path, m, name, line) for m, name, line in scan.writes]
    return found


def test_no_module_global_is_written_from_outside():
    bad = [f"{path}:{line}: {m}.{name}" for path, m, name, line in _writes() if (path, m, name) not in TEST_DOUBLES]
    assert not bad, "module globals written from outside their module:\n" + "\n".join(bad)


def test_the_scan_sees_writes():
    tree = ast.parse("from s2attn.kernels import launch\nimport s2attn\nlaunch.X = 1\nlaunch.D['k'] = 2\n"
                     "s2attn.ops.Y += 1\nmonkeypatch.setattr(s2attn.validation, '_WARNED', set())\n"
                     "monkeypatch.setitem(launch.D, 'k', 1)\nlaunch.D.clear()\nlaunch.f(1)\nx.y = 2\n")
    scan = _Scan(ROOT / "tests" / "example.py")
    scan.visit(tree)
    assert [(m, n) for m, n, _ in scan.writes] == [
        ("s2attn.kernels.launch", "X"), ("s2attn.kernels.launch", "D"), ("s2attn.ops", "Y"),
        ("s2attn.validation", "_WARNED"), ("s2attn.kernels.launch", "D"), ("s2attn.kernels.launch", "D")]
