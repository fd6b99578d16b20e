"""scripts/prepare_sen12flood.sh runs for real on the synthetic root, as a folder and as a zip."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _sen12_helpers import EXPECTED_PAIRS, expected_pair_names, mostly_zero_filename, shared_root

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_sen12flood.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


def _pair_names(out: Path) -> dict[str, list[str]]:
    return {split: sorted(p.name for p in (out / split).glob("*.npy")) for split in ("train", "test")}


def test_folder_input(root, tmp_path):
    (tmp_path / "test.txt").write_text("0003\n")
    result = _run(str(root), str(tmp_path / "out"), "--test_sequences", str(tmp_path / "test.txt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == ["class counts:", "train: 5 pairs (no flood 3, flood 2)",
                                               "test: 2 pairs (no flood 0, flood 2)"]
    # Hand prediction minus the three pairs of the mostly-zero image.
    heavy = mostly_zero_filename(root)
    expected = sorted(n for n in expected_pair_names(root) if heavy not in n)
    names = _pair_names(tmp_path / "out")
    assert sorted(names["train"] + names["test"]) == expected
    assert len(names["test"]) == len(EXPECTED_PAIRS["0003"])
    assert not (tmp_path / "out" / "_work").exists()
    assert (tmp_path / "out" / "test_sequences.txt").read_text() == "0003\n"


def test_zip_input_gives_the_same_pairs(root, tmp_path):
    archive = tmp_path / "SEN12FLOOD.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root.parent))
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "0009__old__run__1.npy").write_bytes(b"")  # replaced, not mixed in
    result = _run(str(archive), str(tmp_path / "out"), "--test_fraction", "0", "--keep_intermediate")
    assert result.returncode == 0, result.stderr
    assert "[1/4] unzip" in result.stdout
    assert (tmp_path / "out" / "_work" / "unzipped" / "SEN12FLOOD" / "S1list.json").is_file()
    heavy = mostly_zero_filename(root)
    names = _pair_names(tmp_path / "out")
    assert names == {"train": sorted(n for n in expected_pair_names(root) if heavy not in n), "test": []}


def test_usage_and_bad_input(tmp_path):
    result = _run()
    assert result.returncode == 2 and result.stderr.startswith("usage: scripts/prepare_sen12flood.sh")
    result = _run(str(tmp_path / "missing.zip"), str(tmp_path / "out"))
    assert result.returncode == 2 and "neither a .zip file nor a folder" in result.stderr
    result = _run(str(tmp_path), str(tmp_path / "out"), "--bogus")
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert result.returncode == 2 and "no S1list.json" in result.stderr
