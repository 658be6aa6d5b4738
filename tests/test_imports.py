"""The package's import graph has no circle (function-level imports included): dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

from _music import REPO

PACKAGES = {"meloformer": "meloformer", "callbacks": "meloformer.callbacks", "datamodules": "meloformer.datamodules"}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (``callbacks/`` installs as ``meloformer.callbacks``)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in targets if target in known and target != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            if circle := visit(target, [*path, node]):
                return circle
        done.add(node)
        return None

    return next((circle for node in sorted(graph) if (circle := visit(node, []))), None)


def test_the_package_imports_without_a_circle():
    graph = import_graph()
    assert {"meloformer.cli", "meloformer.serve", "meloformer.callbacks.sample_logger"} <= graph.keys()
    assert "meloformer.sampler" in graph["meloformer.serve"]  # the graph sees imports
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_a_circle_is_found():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
