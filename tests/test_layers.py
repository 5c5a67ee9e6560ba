"""The shape of the package: no import cycle, and modules and classes a reader can hold.

The layers themselves are import-linter's contract in pyproject.toml (``lint-imports``, run by
``make lint``); these tests pin what that contract cannot: that no import cycle is left among
any of ctxkit's modules, listed in the layers or not, counting imports under TYPE_CHECKING, and
the size limits of ``docs/contributing.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "ctxkit"
MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 450


def _cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


class TestImports:
    def test_no_module_of_ctxkit_is_in_an_import_cycle(self) -> None:
        """No chain of imports among ctxkit's modules (TYPE_CHECKING ones too) comes back."""
        assert _cycles(grimp.build_graph("ctxkit")) == []

    def test_a_cycle_is_found(self) -> None:
        """The cycle finder sees a cycle where there is one (so the test above can fail)."""

        class Graph:
            modules = frozenset({"a", "b", "c"})

            def find_modules_directly_imported_by(self, module: str) -> set[str]:
                return {"a": {"b"}, "b": {"c"}, "c": {"a"}}[module]

        assert _cycles(Graph()) == [{"a", "b", "c"}]  # type: ignore[arg-type]


class TestSizes:
    def test_no_module_is_over_the_limit(self) -> None:
        """Each module of ctxkit, docstrings included, is at most MAX_MODULE_LINES long."""
        long = {
            str(path.relative_to(PACKAGE)): lines
            for path in PACKAGE.rglob("*.py")
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
        }
        assert long == {}

    def test_no_class_is_over_the_limit(self) -> None:
        """Each class of ctxkit, docstrings included, is at most MAX_CLASS_LINES long."""
        long = {}
        for path in PACKAGE.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    assert node.end_lineno is not None
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
        assert long == {}
