"""The import layers (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md) hold, and the check sees them."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import tomllib
from conftest import REPO

LINT = shutil.which("lint-imports") or pytest.skip("import-linter is not installed (pip install -e '.[dev]')",
                                                   allow_module_level=True)


def lint(config: str | None = None) -> subprocess.CompletedProcess:
    cmd = [LINT, "--no-cache"] + (["--config", config] if config else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    result = lint()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def lint_reordered(tmp_path, reorder) -> subprocess.CompletedProcess:
    """``lint-imports`` with the layers contract alone, its layers list changed in place by ``reorder``."""
    lint_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    lint_config["contracts"] = lint_config["contracts"][:1]
    reorder(lint_config["contracts"][0]["layers"])
    path = tmp_path / "reordered.toml"
    path.write_text(_toml(lint_config))
    return lint(str(path))


def test_an_upward_import_between_top_level_modules_breaks_the_layers(tmp_path):
    """A run below its engine: the check sees the imports of single-file modules, which grimp alone does not
    scan."""
    def swap(layers: list[str]) -> None:
        i, j = layers.index("finetuning | pretraining"), layers.index("engine_pretrain | engine_finetune")
        layers[i], layers[j] = layers[j], layers[i]

    result = lint_reordered(tmp_path, swap)
    assert result.returncode != 0
    assert "pretraining -> engine_pretrain" in result.stdout


def test_an_upward_import_from_a_package_into_a_top_level_module_breaks_the_layers(tmp_path):
    """analysis/ at the bottom: its imports of top-level modules (external to grimp's packages) count too."""
    def to_bottom(layers: list[str]) -> None:
        layers.append(layers.pop(layers.index("analysis | benchmarks")))

    result = lint_reordered(tmp_path, to_bottom)
    assert result.returncode != 0
    assert "analysis.finetuned -> finetuning" in result.stdout


def _toml(lint_config: dict) -> str:
    """The [tool.importlinter] table as TOML (lists of strings and plain values only)."""
    def value(v):
        return "[" + ", ".join(f'"{x}"' for x in v) + "]" if isinstance(v, list) else (
            "true" if v is True else f'"{v}"')
    lines = ["[tool.importlinter]"]
    lines += [f"{k} = {value(v)}" for k, v in lint_config.items() if k != "contracts"]
    for contract in lint_config["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"] + [f"{k} = {value(v)}" for k, v in contract.items()]
    return "\n".join(lines) + "\n"


def test_top_level_modules_are_scanned():
    grimp = pytest.importorskip("grimp")
    from tests.layers_contract import add_top_level_modules

    graph = grimp.build_graph("sarwmix", "util", include_external_packages=True, cache_dir=None)
    add_top_level_modules(graph)
    assert graph.direct_import_exists(importer="finetuning", imported="backbones")
    assert graph.direct_import_exists(importer="backbones", imported="models_mixmim")
    assert not graph.direct_import_exists(importer="models_mixmim", imported="torch")  # externals left out


def test_the_tasks_and_modes_sit_between_the_backbone_table_and_the_engines(tmp_path):
    """tasks/ and modes ask the backbone table for their models, the finetuning engine asks the tasks and the
    pretraining run the modes: a task package or the mode table below the backbone table, or above the engine
    and the run, is an upward import."""
    def swap(upper: str, lower: str):
        def reorder(layers: list[str]) -> None:
            i, j = layers.index(upper), layers.index(lower)
            layers[i], layers[j] = layers[j], layers[i]
        return reorder

    below = lint_reordered(tmp_path, swap("tasks | modes", "backbones"))
    assert below.returncode != 0 and "tasks.base -> backbones" in below.stdout and "modes -> backbones" in below.stdout
    above = lint_reordered(tmp_path, swap("engine_pretrain | engine_finetune", "tasks | modes"))
    assert above.returncode != 0 and "engine_finetune -> tasks" in above.stdout
    run_below = lint_reordered(tmp_path, swap("finetuning | pretraining", "tasks | modes"))
    assert run_below.returncode != 0 and "pretraining -> modes" in run_below.stdout
