"""The layout's promises, read from the code's own imports at run time (not `TYPE_CHECKING`).

`lint-imports` (scripts/check) enforces the layers of docs/architecture.md; these tests check
what it cannot say: no cycle among the modules Python actually imports, and `Offload` imported
by the adapters only.
"""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest

BELOW_THE_FACADE = ("offload.core", "offload.lanes", "offload.ledger", "offload.transport")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("offload", exclude_type_checking_imports=True, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith("offload"):
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(m for m in graph.modules if m.startswith("offload")):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_at_run_time(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: a graph with one planted cycle.
    planted = grimp.ImportGraph()
    for module in ("offload", "offload.a", "offload.b", "offload.c"):
        planted.add_module(module)
    planted.add_import(importer="offload.a", imported="offload.b")
    planted.add_import(importer="offload.b", imported="offload.a")
    planted.add_import(importer="offload.c", imported="offload.a")
    assert _cycles(planted) == [["offload.a", "offload.b"]]


def test_only_adapters_import_the_facade(graph: grimp.ImportGraph) -> None:
    importers = graph.find_modules_that_directly_import("offload.app")
    below = sorted(m for m in importers if m.startswith((*BELOW_THE_FACADE, "offload.web")))
    assert below == []
    assert "offload.worker.loading" in importers  # the check sees real imports


def test_importing_offload_loads_neither_celery_nor_fastapi() -> None:
    code = (
        "import sys, offload\n"
        "print(sorted(m for m in ('celery', 'kombu', 'fastapi', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
