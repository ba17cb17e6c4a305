"""The shape of the package: no import cycle among retrac's modules, and no module over 600 lines.

Every module under ``src/retrac`` is parsed with :mod:`ast`; every import counts, including one inside
a function (a function-level import that closes a cycle only hides it), except those under
``if TYPE_CHECKING:`` (never run). ``from retrac.x import y`` is an edge to ``retrac.x.y`` when that
is a module, else to ``retrac.x``; relative imports are resolved the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "retrac"
MAX_MODULE_LINES = 600


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("retrac", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every ``Import`` / ``ImportFrom`` below ``node`` (at any depth) outside ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    # relative: the package of this module, then up (level - 1) more
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            for target in targets:
                # `import retrac.a.b` names retrac.a.b; an unknown tail falls back to its longest known prefix
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, or by a relative import, is
    found; one under ``if TYPE_CHECKING:`` is not."""
    root = tmp_path / "retrac"
    (root / "pkg").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pkg" / "__init__.py").write_text("from .low import f\n")
    (root / "pkg" / "low.py").write_text("def f():\n    from retrac.high import g\n    return g\n")
    (root / "high.py").write_text("from retrac.pkg import low\n\ng = 1\n")
    graph = import_graph(module_files(root))
    assert graph["retrac.high"] == {"retrac.pkg.low"}
    assert graph["retrac.pkg"] == {"retrac.pkg.low"}
    assert find_cycle(graph) == ["retrac.high", "retrac.pkg.low", "retrac.high"]
    (root / "pkg" / "low.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from retrac.high import g\n"
    )
    assert find_cycle(import_graph(module_files(root))) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_projection_dependencies_point_one_way():
    """gradients <- base <- exact / dense / factored <- the package: no projector module imports the
    package, and base and gradients import no projector."""
    graph = import_graph(module_files())
    projection = [m for m in graph if m.startswith("retrac.projection.")]
    assert "retrac.projection.base" in projection
    for module in projection:
        assert "retrac.projection" not in graph[module], f"{module} imports retrac.projection itself"
    for module in ("retrac.projection.base", "retrac.projection.gradients"):
        inner = {m for m in graph[module] if m.startswith("retrac.projection")}
        assert inner <= {"retrac.projection.gradients"} - {module}, f"{module} imports {sorted(inner)}"


@pytest.mark.parametrize("name", sorted(module_files()))
def test_module_size(name):
    lines = len(module_files()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it by responsibility"


BENCHMARKS = PACKAGE_ROOT.parents[1] / "benchmarks"


def retrac_names_imported(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` of every ``from retrac... import name`` in ``path``, at any depth."""
    found = []
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("retrac"):
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    """A benchmark's function-level ``from retrac.x import y`` still finds ``y`` after a refactor (these
    imports run only when the phase does, minutes into a benchmark)."""
    import importlib

    missing = []
    for module, name, line in retrac_names_imported(path):
        if not hasattr(importlib.import_module(module), name) and f"{module}.{name}" not in module_files():
            missing.append(f"line {line}: from {module} import {name}")
    assert not missing, f"{path.name} imports names retrac no longer has: {missing}"


def test_benchmark_import_check_sees_function_level_imports(tmp_path):
    """The checker itself: an import inside a function is found, and a name that moved is reported."""
    script = tmp_path / "bench.py"
    script.write_text("def phase():\n    from retrac.indexer.store import chunk_rows_for\n")
    assert retrac_names_imported(script) == [("retrac.indexer.store", "chunk_rows_for", 2)]
    import importlib

    assert not hasattr(importlib.import_module("retrac.indexer.store"), "chunk_rows_for")
