"""BigEarthNet-S1 v1.0: writer layout, folder and Zarr readers, split / exclusion lists, bad input."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from sarwmix.constants import BEN_43_CLASSES, BEN_43_TO_19
from sarwmix.data.bad_patches import GuardedData
from sarwmix.data.bigearthnetv1 import (
    LABELS_JSON_KEYS,
    BenV1Folder,
    BenV1Zarr,
    main,
    read_name_list,
    target_from_names,
    to_zarr,
)
from sarwmix.data.geotiff import write_band
from sarwmix.data.synthetic import generate_patch, patch_records, write_benv1
from sarwmix.errors import ConfigError, DataError
from tests._bigearthnet_helpers import (
    copy_tree,
    poke_nan,
    set_json,
    truncate,
    v1_files,
    write_two_bands,
    write_wrong_shape,
)

N, SEED = 24, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("benv1")
    write_benv1(out, N, SEED)
    return out


@pytest.fixture
def copy(written: Path, tmp_path: Path) -> Path:
    return copy_tree(written, tmp_path / "copy")


def expected_names(split: str) -> list[str]:
    return [r["s1_name"] for r in patch_records(N, SEED) if r["split"] == split and not (r["snow"] or r["cloud"])]


def test_hand_checked_label_vectors() -> None:
    target = target_from_names(["Coniferous forest", "Sea and ocean"], 19, "x")
    assert np.flatnonzero(target).tolist() == [9, 18]
    assert np.flatnonzero(target_from_names(["Coniferous forest", "Sea and ocean"], 43, "x")).tolist() == [23, 42]
    # Road/rail (3), bare rock (30), burnt areas (32), intertidal flats (37) have no 19-class counterpart.
    assert target_from_names(["Road and rail networks and associated land", "Bare rock"], 19, "x").sum() == 0
    merged = target_from_names(["Continuous urban fabric", "Discontinuous urban fabric", "Peatbogs"], 19, "x")
    assert np.flatnonzero(merged).tolist() == [0, 15]
    with pytest.raises(DataError, match="where.json: unknown label 'Moon dust'"):
        target_from_names(["Moon dust"], 19, "where.json")


def test_writer_produces_the_real_layout(written: Path) -> None:
    root = written / "BigEarthNet-S1-v1.0"
    record = patch_records(N, SEED)[0]
    files = v1_files(root, record["s1_name"])
    meta = json.loads(files["json"].read_text())
    assert sorted(meta) == sorted(LABELS_JSON_KEYS)
    assert meta["corresponding_s2_patch"] == record["s2_name"]
    assert meta["labels"] == generate_patch(record["seed"])[2]
    with rasterio.open(files["VV"]) as src:
        assert (src.count, src.dtypes[0], src.shape, src.nodata) == (1, "float32", (120, 120), None)
        assert src.crs.to_epsg() == record["epsg"] and src.transform.a == 10.0 and src.transform.e == -10.0
        assert (src.transform.c, src.transform.f) == (record["ulx"], record["uly"])
        np.testing.assert_array_equal(src.read(1), generate_patch(record["seed"])[0][1])
    raw = (written / "splits" / "train.csv").read_bytes()
    assert raw.count(b"\r\n") == len(expected_names("train")) and b"\n" not in raw.replace(b"\r\n", b"")


def test_reader_items_and_split_filtering(written: Path) -> None:
    seen = set()
    for split in ("train", "val", "test"):
        data = BenV1Folder(written, split, input_size=128)
        assert data.names == expected_names(split)
        seen.update(data.names)
        x, y = data[0]
        assert x.shape == (2, 128, 128) and x.dtype.is_floating_point and y.shape == (19,)
        assert -50 < x.min() and x.max() < 20 and -35 < x[0].mean() < x[1].mean()
    flagged = {r["s1_name"] for r in patch_records(N, SEED) if r["snow"] or r["cloud"]}
    assert flagged and not seen & flagged, "flagged patches are in no split"
    data = BenV1Folder(written / "BigEarthNet-S1-v1.0", "val", input_size=120, label_set=43)
    record = next(r for r in patch_records(N, SEED) if r["s1_name"] == data.names[0])
    sar_db, _, labels = generate_patch(record["seed"])
    x, y = data[0]
    np.testing.assert_array_equal(x.numpy(), sar_db)
    assert [BEN_43_CLASSES[i] for i in np.flatnonzero(y.numpy())] == labels


def test_split_list_variants_give_the_same_names(written: Path, tmp_path: Path) -> None:
    pairs = read_name_list(written / "splits" / "test_s2_s1.csv")
    assert pairs[1] == expected_names("test")
    reversed_csv = tmp_path / "s1_s2.csv"
    reversed_csv.write_text("s1,s2\n" + "".join(f"{s1},{s2}\n" for s2, s1 in zip(*pairs, strict=True)))
    s1_only = tmp_path / "s1.csv"
    s1_only.write_text("\r\n".join(pairs[1]) + "\r\n")
    for split_file in (written / "splits" / "test_s2_s1.csv", reversed_csv, s1_only):
        assert BenV1Folder(written, "test", split_file=str(split_file)).names == expected_names("test")


def test_exclusion_lists_apply_without_split_lists(copy: Path) -> None:
    shutil.rmtree(copy / "splits")
    records = patch_records(N, SEED)
    everything = sorted(r["s1_name"] for r in records)
    clean = sorted(r["s1_name"] for r in records if not (r["snow"] or r["cloud"]))
    assert BenV1Folder(copy, "train").names == clean
    assert BenV1Folder(copy, "train", include_snow_cloud=True).names == everything
    with pytest.raises(ConfigError, match="val.csv"):
        BenV1Folder(copy, "val")


def test_missing_listed_patches_are_counted(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = expected_names("train")
    shutil.rmtree(copy / "BigEarthNet-S1-v1.0" / names[0])
    with caplog.at_level(logging.WARNING):
        data = BenV1Folder(copy, "train")
    assert data.names == names[1:]
    assert f"1 of {len(names)} listed patches are not in" in caplog.text
    for name in names[1:]:
        shutil.rmtree(copy / "BigEarthNet-S1-v1.0" / name)
    with pytest.raises(DataError, match=f"none of its {len(names)} patches"):
        BenV1Folder(copy, "train")


def test_empty_split_list(copy: Path) -> None:
    (copy / "splits" / "val.csv").write_bytes(b"\r\n")
    with pytest.raises(DataError, match="val.csv: split list is empty"):
        BenV1Folder(copy, "val")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f["VV"].unlink(), "_VV.tif: file not found"),
    (lambda f: f["VH"].unlink(), "_VH.tif: file not found"),
    (lambda f: truncate(f["VH"]), "_VH.tif: not a readable GeoTIFF"),
    (lambda f: f["VV"].write_text("not a tiff"), "_VV.tif: not a readable GeoTIFF"),
    (lambda f: write_wrong_shape(f["VV"]), r"expected shape \(120, 120\), got \(100, 100\)"),
    (lambda f: write_two_bands(f["VH"]), "_VH.tif: has 2 bands, expected 1"),
    (lambda f: poke_nan(f["VV"]), "_VV.tif: 1 NaN/Inf pixels"),
    (lambda f: write_band(f["VV"], np.full((120, 120), 1200, np.uint16)), "_VV.tif: pixels are uint16; "
     "expected float32 dB"),
    (lambda f: f["json"].unlink(), "labels_metadata.json: labels JSON not found"),
    (lambda f: set_json(f["json"], labels=None), "labels_metadata.json: expected a JSON object with a list"),
    (lambda f: f["json"].write_text("{not json"), "labels_metadata.json: not a readable JSON"),
    (lambda f: set_json(f["json"], labels=["Pastures", "Lava"]), "unknown label 'Lava'"),
])
def test_bad_patch_raises_or_is_skipped(copy: Path, damage, message: str) -> None:
    # The two-column list names the S1 patches directly, so no labels JSON is read at index time.
    names, pairs = expected_names("train"), str(copy / "splits" / "train_s2_s1.csv")
    damage(v1_files(copy / "BigEarthNet-S1-v1.0", names[0]))
    with pytest.raises(DataError, match=message) as err:
        BenV1Folder(copy, "train", split_file=pairs)[0]
    assert names[0] in str(err.value)
    _, (x, _), met = GuardedData(BenV1Folder(copy, "train", split_file=pairs), "skip")[0]
    assert [b.name for b in met] == [names[0]] and re.search(message, met[0].reason)
    np.testing.assert_array_equal(x.numpy(), BenV1Folder(copy, "train", split_file=pairs)[1][0].numpy())


def test_unreadable_json_drops_the_patch_from_an_s2_list_with_a_warning(
        copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = expected_names("train")
    v1_files(copy / "BigEarthNet-S1-v1.0", names[0])["json"].unlink()
    with caplog.at_level(logging.WARNING):
        data = BenV1Folder(copy, "train")
    assert data.names == names[1:]
    assert f"S2 name of {names[0]} unknown" in caplog.text and "1 of" in caplog.text


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_round_trip_and_resume(written: Path, tmp_path: Path, zarr_format: int) -> None:
    store = tmp_path / "BigEarthNet-S1-v1.0.zarr"
    counts = to_zarr(written, store, zarr_format)
    assert counts == {"written": N, "kept": 0, "skipped": 0}
    assert zarr.open_group(str(store), mode="r").metadata.zarr_format == zarr_format
    shutil.copytree(written / "splits", tmp_path / "splits")
    folder = BenV1Folder(written, "train", label_set=43)
    container = BenV1Zarr(store, "train", label_set=43)
    assert container.names == folder.names
    for i in range(len(folder)):
        np.testing.assert_array_equal(container.read_patch(i)[0], folder.read_patch(i)[0])
        np.testing.assert_array_equal(container.read_patch(i)[1], folder.read_patch(i)[1])
    # Resume: an interrupted patch (labels attribute not yet written) is redone, the others kept.
    group = zarr.open_group(str(store), mode="a")["sentinel1"][folder.names[0]]
    del group.attrs["labels"]
    assert to_zarr(written, store, zarr_format) == {"written": 1, "kept": N - 1, "skipped": 0}


def test_zarr_bad_content(written: Path, tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    to_zarr(written, store, 3)
    name = BenV1Zarr(store, "train", split_file=str(written / "splits" / "train.csv")).names[0]
    patch = zarr.open_group(str(store), mode="a")["sentinel1"][name]
    patch["VV"][3, 3] = np.inf
    data = BenV1Zarr(store, "train", split_file=str(written / "splits" / "train.csv"))
    with pytest.raises(DataError, match=f"{name}/VV: 1 NaN/Inf"):
        data[0]
    del patch["VH"]
    with pytest.raises(DataError, match="expected arrays VH, VV"):
        data[0]


def test_to_zarr_command_line(written: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["to-zarr", str(written), str(tmp_path / "o.zarr"), "--zarr_format", "2"]) == 0
    assert f"{N} written" in capsys.readouterr().out
    assert main(["to-zarr", str(tmp_path / "absent"), str(tmp_path / "p.zarr")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_label_mapping_covers_every_43_class() -> None:
    for i, name in enumerate(BEN_43_CLASSES):
        target = target_from_names([name], 19, "x")
        assert target.sum() == (BEN_43_TO_19[i] is not None)
