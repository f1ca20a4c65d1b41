"""One-way layering: no module of ``lit_meta`` or ``datamodules`` imports itself back through others, and the
user-facing error types are defined once, in ``datamodules/errors.py``.

Imports are read from the source with ``ast``, every one of them: at the top, deferred inside functions, and under
``if TYPE_CHECKING:`` (a cycle there is a cycle for every type checker and reader, even if it never runs).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lit_meta", "datamodules")


def modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for file in sorted((REPO / package).rglob("*.py")):
            parts = list(file.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return found


def imported(name: str, file: Path, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its source."""
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod.
                target = f"{base}.{alias.name}"
                if target in known:
                    edges.add(target)
                elif base in known:
                    edges.add(base)
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(name, file, is_package, known) for name, (file, is_package) in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_deferred_and_relative_imports(tmp_path):
    # A check that finds nothing proves little unless it would find something: a planted two-module cycle.
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    graph = {
        "pkg.a": imported("pkg.a", tmp_path / "a.py", False, known),
        "pkg.b": imported("pkg.b", tmp_path / "b.py", False, known),
    }
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycles():
    graph = import_graph()
    assert {"lit_meta.algorithms.base", "lit_meta.prediction", "lit_meta.checkpoints", "datamodules.errors"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_checkpoint_reading_sits_below_the_algorithms():
    graph = import_graph()
    assert "lit_meta.checkpoints" in graph["lit_meta.algorithms.base"]
    assert "lit_meta.algorithms.base" in graph["lit_meta.prediction"]
    for low in ("lit_meta.checkpoints", "lit_meta.adapted"):
        assert not {m for m in graph[low] if m.startswith(("lit_meta.algorithms", "lit_meta.prediction"))}, low


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_error_types_are_defined_only_in_datamodules_errors():
    defined = []
    for name, (file, _) in modules().items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", "")).endswith(("Error", "Exception")) for base in node.bases
            ):
                defined.append(f"{name}.{node.name}")
    assert sorted(defined) == ["datamodules.errors.ConfigError", "datamodules.errors.DataError", "datamodules.errors.LitMetaError"]
    import datamodules
    import lit_meta
    from datamodules import errors

    for package in (lit_meta, datamodules):
        for error in ("ConfigError", "DataError", "LitMetaError"):
            assert getattr(package, error) is getattr(errors, error)
