"""The package's shape: no import cycle (lazy imports included), small modules, documented subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "filteratom_sd"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules a module's source imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            candidates = bases
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # `import a.b.c` also runs a and a.b: the deepest known module is the edge that matters
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f.read_text(encoding="utf-8"), module_name(f), f.name == "__init__.py", known)
            for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "filteratom_sd.core.layer" in graph["filteratom_sd.filter_atoms.delta"]  # from ..core.layer import
    assert "filteratom_sd.core.layer" in graph["filteratom_sd.core.method"]  # from .layer import
    assert "filteratom_sd.resources" in graph["filteratom_sd.tiny.bundled"]  # a package's __init__
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    source = "import os\n\ndef f():\n    from .b import x\n    import pkg.sub.c\n    from . import sub\n"
    assert imported_modules(source, "pkg.a", False, known) == {"pkg.b", "pkg.sub.c", "pkg", "pkg.sub"}


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_module_is_too_long():
    long = {module_name(f): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_every_subpackage_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring and len(docstring.splitlines()) <= 3, module_name(init)


def test_no_module_finds_shipped_data_by_walking_up_from_its_own_file():
    offenders = [module_name(f) for f in PACKAGE.rglob("*.py") if "__file__" in f.read_text(encoding="utf-8")]
    assert not offenders, offenders
