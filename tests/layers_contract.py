"""An import-linter layers contract that also sees the repository's top-level modules.

import-linter builds its graph with grimp, which scans packages only: ``main_pretrain.py``,
``engine_pretrain.py``, ``models_mixmim.py``, ``backbones.py`` ... are single-file modules at the top of the
repository, which grimp refuses as root packages. With ``include_external_packages`` a package's import of
one of them is in the graph already (as an external module); this contract adds the modules themselves and
their own imports (read with ``ast``, absolute imports at any depth, the same rule as grimp's), then checks
the layers exactly as import-linter's ``layers`` contract does.

Registered in ``pyproject.toml`` (``contract_types``); ``lint-imports`` run from the repository root imports
it as ``tests.layers_contract``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import grimp
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import ContractCheck

REPO = Path(__file__).resolve().parent.parent


def top_level_modules(root: Path = REPO) -> dict[str, Path]:
    """Module name -> file of every ``*.py`` at the top of the repository."""
    return {p.stem: p for p in sorted(root.glob("*.py"))}


def imported_names(path: Path) -> list[tuple[str, int, str]]:
    """(dotted name, line number, line) of every absolute import in ``path``; ``from a import b`` gives
    both ``a`` and ``a.b`` (``b`` may be a module)."""
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        out += [(n, node.lineno, lines[node.lineno - 1].strip()) for n in names]
    return out


def add_top_level_modules(graph: grimp.ImportGraph, root: Path = REPO) -> None:
    """Add the top-level modules and their imports of modules in the graph (or of each other)."""
    tops = top_level_modules(root)
    for name in tops:
        if name not in graph.modules:
            graph.add_module(name)
    known = graph.modules
    for importer, path in tops.items():
        for dotted, line_number, line in imported_names(path):
            target = dotted
            while target and target not in known:
                target = target.rpartition(".")[0]
            if not target or target == importer:
                continue
            if graph.is_module_squashed(target) and target not in tops:
                continue  # an external package (torch, timm, ...)
            graph.add_import(importer=importer, imported=target, line_number=line_number, line_contents=line)


class TopLevelLayersContract(LayersContract):
    """``layers``, over a graph that includes the top-level modules (``type = "layers_top_level"``)."""

    type_name = "layers_top_level"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        add_top_level_modules(graph)
        return super().check(graph, verbose)
