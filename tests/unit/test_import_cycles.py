"""No module-level import cycle anywhere in hvsim, hvbase or qmp_bridge, TYPE_CHECKING imports
included (grimp's graph, the one import-linter checks the layers on). The layer contract already
forbids cycles across layers and subsystems; this also catches them *inside* one package (the
placement cycle of six modules this test was written against). Function-level imports are not
seen by grimp: they are the lazy CLI imports the README mentions."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, sorted(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def import_graph(*packages: str) -> dict[str, set[str]]:
    g = grimp.build_graph(*packages, cache_dir=None)
    return {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}


def test_the_detector_finds_a_type_checking_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "cyc_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "c.py").write_text("from .a import b\n")
    (pkg / "d.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = cycles(import_graph("cyc_pkg"))
    sys.modules.pop("cyc_pkg", None)
    assert found == [["cyc_pkg.a", "cyc_pkg.b", "cyc_pkg.c"]]


def test_no_import_cycle_in_the_project() -> None:
    found = cycles(import_graph("hvbase", "qmp_bridge", "hvsim"))
    assert found == [], "import cycles (break them by moving the shared types into their own module):\n" + \
        "\n".join(" -> ".join(c) for c in found)
