"""The repository stands alone: no test, code or document depends on a path outside it, and the tests that
need data the repository may not hold say how to run them instead of skipping silently."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COMPAT, REAL_S1_ENV, REPO, real_s1_dir

TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cff", ".cfg", ".ini", ".json"}
SKIPPED_FOLDERS = {".git", ".venv", "__pycache__", "build", ".pytest_cache", ".ruff_cache"}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared" + "/compat", "shared" + "/data", '"shared" ' + "/")
SPECIFICATION = "SPEC" + ".md"


def repository_text_files() -> list[Path]:
    return [p for p in REPO.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
            and not SKIPPED_FOLDERS & set(p.relative_to(REPO).parts) and not p.name.endswith(".egg-info")
            and "egg-info" not in p.as_posix()]


def test_nothing_names_a_path_outside_the_repository():
    files = repository_text_files()
    assert len(files) > 100
    offenders = {p.relative_to(REPO).as_posix(): [s for s in OUTSIDE if s in p.read_text(errors="replace")]
                 for p in files if p != Path(__file__).resolve()}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_test_reads_the_specification():
    readers = [p.name for p in (REPO / "tests").rglob("*.py")
               if p != Path(__file__).resolve() and SPECIFICATION in p.read_text()]
    assert not readers


def test_the_released_state_dict_manifests_are_in_the_repository():
    names = sorted(p.stem for p in COMPAT.glob("*.json"))
    assert names == ["finetune_ben19_mixmim_base", "finetune_sen12flood_mixmim_base", "pretrain_mixmim_base",
                     "pretrain_mixmim_huge", "pretrain_mixmim_large"]
    for name in names:
        data = json.loads((COMPAT / f"{name}.json").read_text())
        assert data["model"] == name and len(data["entries"]) > 300


def test_a_test_of_the_real_samples_skips_saying_how_to_run_it(monkeypatch, tmp_path):
    monkeypatch.delenv(REAL_S1_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"set {REAL_S1_ENV} to the folder"):
        real_s1_dir()
    monkeypatch.setenv(REAL_S1_ENV, str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="no folder rico_hdl_benv2"):
        real_s1_dir("rico_hdl_benv2")
    (tmp_path / "rico_hdl_benv2").mkdir()
    assert real_s1_dir("rico_hdl_benv2") == tmp_path / "rico_hdl_benv2"
