"""Every output folder a documented command or a default writes is ignored by git (runs write gigabytes of .pth)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO, doc_files

# README.md and every docs/*.md
DOCS = "\n".join(path.read_text() for path in doc_files())
# Output folders of the parser defaults and launchers, which the documented commands write without naming them.
DEFAULT_OUTPUTS = ("output_dir", "output_finetune", "output", "analysis_out")
# A value that is not a folder name: a placeholder, a flag, an absolute path.
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z_]+|-.*|/.*|<.*)$")


def documented_output_folders() -> set[str]:
    """Top-level folders the documented commands write: the values of --output_dir, --out, OUTPUT_DIR=."""
    values = re.findall(r"(?:--output_dir|--out|OUTPUT_DIR)[ =]([^\s`\"')]+)", DOCS)
    folders = set()
    for value in values:
        value = value.removeprefix("./")
        if not PLACEHOLDER.match(value):
            folders.add(value.split("/", 1)[0])
    return folders


def test_documented_output_folders_are_found():
    assert {"output_finetune", "output_eval", "output_label_eff", "figures", "output"} <= (
        documented_output_folders() | set(DEFAULT_OUTPUTS))


def test_every_output_folder_is_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    folders = sorted(documented_output_folders() | set(DEFAULT_OUTPUTS))
    probes = [f"{folder}/config.yaml" for folder in folders]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert sorted(set(probes) - set(ignored)) == [], "output folders not in .gitignore"


def test_tracked_figures_are_not_ignored():
    """The output patterns are anchored at the root: docs/figures/ stays tracked."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert tracked == [], f"tracked files matched by .gitignore: {tracked}"
