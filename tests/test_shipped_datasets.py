"""The official BigEarthNet-S1 v1 lists and label map shipped in datasets/, their derivation and their use
as the default split source of the BENv1 loader."""
from __future__ import annotations

import argparse
import bz2
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sarwmix.data.bigearthnetv1 as v1
from finetuning import split_file_of
from sarwmix.constants import BEN_19_CLASSES, BEN_19_FROM_43, BEN_43_CLASSES, BEN_43_TO_19
from sarwmix.data.bigearthnetv1 import BenV1Folder, read_name_list
from sarwmix.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
SPLITS = ("train", "val", "test")
EXCLUSIONS = ("patches_with_seasonal_snow", "patches_with_cloud_and_shadow", "patches_without_19_class_labels")
# The sizes the BigEarthNet team publishes for its v1 lists.
PUBLISHED_ROWS = {"train": 269_695, "val": 123_723, "test": 125_866, "patches_with_seasonal_snow": 61_707,
                  "patches_with_cloud_and_shadow": 9_280, "patches_without_19_class_labels": 57}


@pytest.fixture(scope="module")
def shipped() -> dict[str, tuple[list[str], list[str]]]:
    """list name -> (S2 names, S1 names) of every shipped list."""
    return {name: read_name_list(DATASETS / f"{name}.csv.gz") for name in SPLITS + EXCLUSIONS}


def third_party_rows() -> dict[str, int]:
    text = (REPO / "THIRD_PARTY.md").read_text()
    return {name: int(rows.replace(",", "")) for name, rows in
            re.findall(r"^\| `datasets/([\w]+)\.csv\.gz` \| ([\d,]+) rows \|", text, re.M)}


def test_shipped_lists_parse_with_the_published_and_recorded_counts(shipped) -> None:
    assert third_party_rows() == PUBLISHED_ROWS
    for name, (s2, s1) in shipped.items():
        assert len(s2) == len(s1) == len(set(s1)) == PUBLISHED_ROWS[name], name
        assert all(n.startswith(("S2A_MSIL2A_", "S2B_MSIL2A_")) for n in s2), name
        assert all(n.startswith(("S1A_IW_GRDH_", "S1B_IW_GRDH_")) for n in s1), name
        # An S1 name ends with the row and column of its S2 partner.
        assert all(a.rsplit("_", 2)[1:] == b.rsplit("_", 2)[1:] for a, b in zip(s2, s1, strict=True)), name


def test_splits_are_disjoint_and_hold_no_excluded_patch(shipped) -> None:
    split_sets = [set(shipped[split][1]) for split in SPLITS]
    assert sum(map(len, split_sets)) == len(set().union(*split_sets))
    for name in EXCLUSIONS:
        assert set(shipped[name][1]).isdisjoint(set().union(*split_sets)), name


def test_label_map_agrees_with_the_constants() -> None:
    labels = json.loads((DATASETS / "label_indices.json").read_text(encoding="utf-8"))
    assert list(labels) == ["original_labels", "label_conversion", "BigEarthNet-19_labels"]
    assert labels["original_labels"] == {name: i for i, name in enumerate(BEN_43_CLASSES)}
    assert labels["BigEarthNet-19_labels"] == {name: i for i, name in enumerate(BEN_19_CLASSES)}
    assert [tuple(row) for row in labels["label_conversion"]] == list(BEN_19_FROM_43)
    unmapped = sorted(set(range(43)) - {i for row in labels["label_conversion"] for i in row})
    assert unmapped == [i for i, j in enumerate(BEN_43_TO_19) if j is None] == [3, 4, 5, 6, 7, 8, 9, 10, 30, 32, 37]


def make_folders(root: Path, names: list[str]) -> Path:
    """Patch folders under ``root/BigEarthNet-S1-v1.0`` (index building lists folders, reads no file)."""
    for name in names:
        (root / v1.V1_FOLDER / name).mkdir(parents=True)
    return root


def test_loader_uses_the_shipped_lists_when_no_other_is_given(shipped, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    picked = {split: shipped[split][1][:3] for split in SPLITS}
    root = make_folders(tmp_path, [name for names in picked.values() for name in names])
    with caplog.at_level(logging.INFO, logger="sarwmix.data.bigearthnetv1"):
        for split in SPLITS:
            assert BenV1Folder(root, split).names == picked[split]
    assert "BigEarthNet-S1 v1 val split" in caplog.text and "(shipped official list)" in caplog.text
    assert f"{PUBLISHED_ROWS['val'] - 3} of {PUBLISHED_ROWS['val']} listed patches are not in" in caplog.text


def test_lists_beside_the_data_and_split_file_come_first(shipped, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    train, snow = shipped["train"][1][:2], shipped["patches_with_seasonal_snow"][1][0]
    root = make_folders(tmp_path, [*train, snow])
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.csv").write_text(f"{train[1]}\r\n{snow}\r\n")
    with caplog.at_level(logging.INFO, logger="sarwmix.data.bigearthnetv1"):
        # splits/ beside the data wins; the shipped snow list still applies, as no snow list is beside it.
        assert BenV1Folder(root, "train").names == [train[1]]
    assert "(beside the data)" in caplog.text
    assert BenV1Folder(root, "train", include_snow_cloud=True).names == [train[1], snow]
    explicit = tmp_path / "mine.csv"
    explicit.write_text(f"{train[0]}\n")
    assert BenV1Folder(root, "train", split_file=str(explicit)).names == [train[0]]


def test_shipped_lists_naming_none_of_the_patches_are_not_used(tmp_path: Path) -> None:
    names = ["S1A_IW_GRDH_1SDV_20990101T000000_33UUP_1_1", "S1A_IW_GRDH_1SDV_20990101T000000_33UUP_1_2"]
    root = make_folders(tmp_path, names)
    assert BenV1Folder(root, "train").names == names  # not BigEarthNet names: every patch on disk
    with pytest.raises(ConfigError, match="no split list val.csv .*no shipped official list names its patches"):
        BenV1Folder(root, "val")


def test_loader_without_the_shipped_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v1, "SHIPPED_LISTS", tmp_path / "absent")
    name = "S1A_IW_GRDH_1SDV_20990101T000000_33UUP_1_1"
    with pytest.raises(ConfigError, match="no split list test.csv"):
        BenV1Folder(make_folders(tmp_path, [name]), "test")


def test_finetune_split_folder_accepts_the_compressed_lists() -> None:
    args = argparse.Namespace(dataset="benv1", split_file=str(DATASETS))
    assert split_file_of(args, "val") == str(DATASETS / "val.csv.gz")


# ----------------------------------------------------------------------------------------------------------
# scripts/derive_datasets.py on a miniature package of the same layout
# ----------------------------------------------------------------------------------------------------------
def write_package(folder: Path, pairs: dict[str, list[tuple[str, str]]]) -> Path:
    """A ``bigearthnet_common/`` folder with the package's file names and formats."""
    package = folder / "bigearthnet_common"
    package.mkdir(parents=True)
    old2new = {name: (BEN_19_CLASSES[j] if j is not None else None) for name, j in zip(BEN_43_CLASSES,
                                                                                      BEN_43_TO_19, strict=True)}
    (package / "constants.py").write_text(f"import re\nOLD2NEW_LABELS_DICT = {old2new!r}\n"
                                          f"NEW_LABELS_ORIGINAL_ORDER = {BEN_19_CLASSES!r}\n")
    table = ["s1_name,s2_name,country,season"] + [f"{s1},{s2},Austria,Summer"
                                                  for rows in pairs.values() for s2, s1 in rows]
    (package / "s1_s2_name_country_season.csv.bz2").write_bytes(bz2.compress("\n".join(table).encode()))
    for source, rows in pairs.items():
        (package / source).write_bytes(bz2.compress("".join(f"{s2}\r\n" for s2, _ in rows).encode()))
    return folder


def mini_pairs(shipped) -> dict[str, list[tuple[str, str]]]:
    sources = {"train": "train", "val": "val", "test": "test", "patches_with_seasonal_snow":
               "patches_with_seasonal_snow", "patches_with_cloud_and_shadow": "patches_with_cloud_and_shadow",
               "patches_without_19_class_labels": "patches_with_no_19_class_targets"}
    return {f"{sources[name]}.csv.bz2": list(zip(*shipped[name], strict=True))[:4] for name in sources}


def test_derive_script_writes_the_shipped_formats(shipped, tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", mini_pairs(shipped))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "scripts" / "derive_datasets.py"), str(package), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in DATASETS.iterdir())
    assert (out / "label_indices.json").read_bytes() == (DATASETS / "label_indices.json").read_bytes()
    for name in SPLITS + EXCLUSIONS:
        assert read_name_list(out / f"{name}.csv.gz") == tuple(list(c[:4]) for c in shipped[name]), name
    assert result.stdout.count("| `datasets/") == 7
    first = (out / "train.csv.gz").read_bytes()
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    assert (out / "train.csv.gz").read_bytes() == first  # no time stamp: same rows, same bytes


def test_derive_script_refuses_a_split_overlap(shipped, tmp_path: Path) -> None:
    pairs = mini_pairs(shipped)
    pairs["val.csv.bz2"].append(pairs["train.csv.bz2"][0])
    package = write_package(tmp_path / "pkg", pairs)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "derive_datasets.py"), str(package), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "is in both train.csv.gz and val.csv.gz" in result.stderr
