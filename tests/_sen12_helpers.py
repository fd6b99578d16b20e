"""Shared SEN12-FLOOD fixtures for the tests: one synthetic root, its alignment and its pairs per session.

The expected pairs are written out by hand from the flood patterns documented in
``sarwmix/data/sen12flood_synthetic.py`` (sequence i follows pattern i % 4), as indices into each sequence's
dates in chronological order. Tests that modify data copy it first (``copy_tree``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sarwmix.data.sen12flood_synthetic import write_sen12flood
from sarwmix.prep.sen12_align_s1_to_s2 import align_dataset
from sarwmix.prep.sen12_data_prep import prepare_pairs

SEED = 3
N_SEQUENCES = 4
TEST_SEQUENCES = ["0003"]
# (earlier-or-non-flood date index, other date index, label) per sequence, chronological indices.
# 0001: F F T T   0002: F F F   0003: F T T   0004: T T T
EXPECTED_PAIRS: dict[str, list[tuple[int, int, int]]] = {
    "0001": [(0, 1, 0), (0, 2, 1), (0, 3, 1), (1, 2, 1), (1, 3, 1)],
    "0002": [(0, 1, 0), (0, 2, 0), (1, 2, 0)],
    "0003": [(0, 1, 1), (0, 2, 1)],
    "0004": [],
}
# The mostly-zero S1 image: sequence 0001, chronological date index 1.
MOSTLY_ZERO = ("0001", 1)


def _shared(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "sen12_shared"


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """The synthetic SEN12FLOOD root, written once per session (do not modify: copy it)."""
    base = _shared(factory)
    root = base / "SEN12FLOOD"
    if not (root / "S1list.json").is_file():
        write_sen12flood(base, N_SEQUENCES, SEED)
    return root


def shared_aligned(factory: pytest.TempPathFactory) -> Path:
    """The aligned root (nearest resampling), built once per session."""
    out = _shared(factory) / "aligned"
    if not (out / "align_report.json").is_file():
        align_dataset(shared_root(factory), out)
    return out


def shared_pairs(factory: pytest.TempPathFactory) -> Path:
    """The unpruned pair root with ``TEST_SEQUENCES`` in test, built once per session."""
    out = _shared(factory) / "pairs"
    if not (out / "done").is_file():
        aligned = shared_aligned(factory)
        prepare_pairs(aligned, aligned / "S1list.json", out, TEST_SEQUENCES)
        (out / "done").write_text("")
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a shared folder, for tests that modify files."""
    shutil.copytree(src, dst)
    return dst


def chronological_files(root: Path, seq: str) -> list[str]:
    """The S1 filenames of a sequence ordered by date, read from the root's ``S1list.json``."""
    listing = json.loads((root / "S1list.json").read_text())[seq]
    entries = [v for k, v in listing.items() if k.isdigit()]
    return [e["filename"] for e in sorted(entries, key=lambda e: e["date"])]


def expected_pair_names(root: Path) -> dict[str, int]:
    """``{pair file name: label}`` predicted from ``EXPECTED_PAIRS``."""
    names = {}
    for seq, pairs in EXPECTED_PAIRS.items():
        files = chronological_files(root, seq)
        for first, second, label in pairs:
            names[f"{seq}__{files[first]}__{files[second]}__{label}.npy"] = label
    return names


def mostly_zero_filename(root: Path) -> str:
    seq, index = MOSTLY_ZERO
    return chronological_files(root, seq)[index]
