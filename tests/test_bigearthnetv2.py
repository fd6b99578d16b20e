"""BigEarthNet v2: metadata parquet / CSV, folder layout, LMDB (safetensors, no pickle), bad input."""
from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest
from conftest import real_s1_dir

from sarwmix.constants import BEN_19_CLASSES
from sarwmix.data.bad_patches import GuardedData
from sarwmix.data.bigearthnetv1 import target_from_names
from sarwmix.data.bigearthnetv2 import (
    METADATA_COLUMNS,
    BenV2Folder,
    BenV2Lmdb,
    decode_lmdb_value,
    encode_lmdb_value,
    load_metadata,
    targets_from_labels,
)
from sarwmix.data.synthetic import generate_patch, patch_records, write_benv2, write_benv2_lmdb
from sarwmix.errors import ConfigError, DataError
from tests._bigearthnet_helpers import copy_tree

N, SEED = 24, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benv2(tmp_path_factory.mktemp("benv2"), N, SEED)


@pytest.fixture(scope="module")
def lmdb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benv2_lmdb(tmp_path_factory.mktemp("benv2_lmdb"), N, SEED)


def expected(split: str, flagged_too: bool = False) -> list[str]:
    return [r["s1_name"] for r in patch_records(N, SEED)
            if r["split"] == split and (flagged_too or not (r["snow"] or r["cloud"]))]


def test_metadata_has_the_real_columns(folder: Path) -> None:
    meta = pd.read_parquet(folder / "metadata.parquet")
    assert tuple(meta.columns) == METADATA_COLUMNS
    assert set(meta["split"]) <= {"train", "validation", "test"}
    assert meta["patch_id"].str.match(r"S2[AB]_MSIL2A_\d{8}T\d{6}_N9999_R\d{3}_T\d{2}[A-Z]{3}_\d+_\d+$").all()
    assert all(set(labels) <= set(BEN_19_CLASSES) for labels in meta["labels"])
    assert not (meta["contains_seasonal_snow"] | meta["contains_cloud_or_shadow"]).any()


def test_folder_and_lmdb_readers_agree_with_the_generator(folder: Path, lmdb_root: Path) -> None:
    by_name = {r["s1_name"]: r for r in patch_records(N, SEED)}
    for split, alias in (("train", "train"), ("validation", "val"), ("test", "test")):
        tifs = BenV2Folder(folder, alias, input_size=120)
        store = BenV2Lmdb(lmdb_root, split, input_size=120)
        assert tifs.names == store.names == expected("val" if split == "validation" else split)
        assert tifs.stats["name"] == "benv2"
        for i, name in enumerate(tifs.names):
            sar_db, target, _ = generate_patch(by_name[name]["seed"])
            for data in (tifs, store):
                x, y = data[i]
                np.testing.assert_array_equal(x.numpy(), sar_db)
                np.testing.assert_array_equal(y.numpy(), target)


def test_snow_and_cloud_only_when_asked(folder: Path) -> None:
    flagged = set(expected("train", True)) - set(expected("train"))
    assert flagged, "seed must produce a flagged training patch"
    assert not flagged & set(BenV2Folder(folder, "train").names)
    assert set(BenV2Folder(folder, "train", include_snow_cloud=True).names) == set(expected("train", True))


def test_csv_export_gives_the_same_index(folder: Path, tmp_path: Path) -> None:
    meta = pd.read_parquet(folder / "metadata.parquet")
    meta["labels"] = meta["labels"].map(lambda labels: str(list(labels)))
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    from_csv = BenV2Folder(folder, "test", metadata_file=str(tmp_path / "metadata.csv"))
    from_parquet = BenV2Folder(folder, "test")
    assert from_csv.names == from_parquet.names
    np.testing.assert_array_equal(from_csv.targets, from_parquet.targets)
    meta.loc[0, "labels"] = "__import__('os').system('echo hacked')"
    meta.to_csv(tmp_path / "evil.csv", index=False)
    with pytest.raises(DataError, match="not a Python list of class names"):
        load_metadata(tmp_path / "evil.csv")


def test_csv_written_by_pandas_from_the_parquet_is_accepted(folder: Path, tmp_path: Path) -> None:
    # read_parquet gives numpy arrays; to_csv writes them as "['a' 'b'\n 'c']" (no commas, wrapped).
    meta = pd.read_parquet(folder / "metadata.parquet")
    meta.loc[0, "labels"] = np.array(["Beaches, dunes, sands", "Inland waters", "Arable land", "Pastures",
                                      "Natural grassland and sparsely vegetated areas"], dtype=object)
    meta.to_parquet(tmp_path / "metadata.parquet")
    pd.read_parquet(tmp_path / "metadata.parquet").to_csv(tmp_path / "metadata.csv", index=False)
    from_csv = load_metadata(tmp_path / "metadata.csv")
    assert "' '" in (tmp_path / "metadata.csv").read_text(), "the numpy repr this test is about"
    assert [list(labels) for labels in from_csv["labels"]] == [list(labels) for labels in meta["labels"]]


def test_vectorised_targets_match_the_per_row_mapping() -> None:
    labels = pd.Series([["Marine waters", "Coniferous forest"], [], ["Urban fabric"],
                        np.array(["Arable land", "Pastures"])])
    targets = targets_from_labels(labels, "m.parquet")
    for row, names in zip(targets, labels, strict=True):
        np.testing.assert_array_equal(row, target_from_names(list(names), 19, "x"))
    assert np.flatnonzero(targets[0]).tolist() == [9, 18]
    with pytest.raises(DataError, match="m.parquet: unknown label 'Cheese'"):
        targets_from_labels(pd.Series([["Pastures"], ["Cheese"]]), "m.parquet")


def test_missing_patches_are_counted_then_fatal(folder: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    copy = copy_tree(folder, tmp_path / "c")
    names = expected("train")
    product = BenV2Folder.product_folder(names[0])
    shutil.rmtree(copy / "BigEarthNet-S1" / product / names[0])
    with caplog.at_level(logging.WARNING):
        assert BenV2Folder(copy, "train").names == names[1:]
    assert f"1 of {len(names)} train patches are not in" in caplog.text
    shutil.rmtree(copy / "BigEarthNet-S1")
    (copy / "BigEarthNet-S1").mkdir()
    with pytest.raises(DataError, match=f"none of the {len(names)} train patches"):
        BenV2Folder(copy, "train")


def test_bad_metadata(folder: Path, tmp_path: Path) -> None:
    meta = pd.read_parquet(folder / "metadata.parquet")
    meta[meta["split"] != "test"].to_parquet(tmp_path / "no_test.parquet")
    with pytest.raises(DataError, match="split 'test' has no rows"):
        BenV2Folder(folder, "test", metadata_file=str(tmp_path / "no_test.parquet"))
    meta.drop(columns=["s1_name"]).to_parquet(tmp_path / "no_s1.parquet")
    with pytest.raises(DataError, match=r"missing columns \['s1_name'\]"):
        BenV2Folder(folder, "test", metadata_file=str(tmp_path / "no_s1.parquet"))
    with pytest.raises(DataError, match="metadata file not found"):
        BenV2Folder(folder, "test", metadata_file=str(tmp_path / "absent.parquet"))
    with pytest.raises(ConfigError, match="19-class labels only"):
        BenV2Folder(folder, "test", label_set=43)


def test_lmdb_reader_in_forked_dataloader_workers(lmdb_root: Path) -> None:
    # The index is built (and an item read) in this process, so its environment is open when workers fork.
    import torch

    store = BenV2Lmdb(lmdb_root, "train", input_size=120)
    first = store[0][0]
    loader = torch.utils.data.DataLoader(store, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = [x for x, _ in loader]
    assert sum(len(x) for x in batches) == len(store)
    np.testing.assert_array_equal(batches[0][0].numpy(), first.numpy())
    np.testing.assert_array_equal(store[0][0].numpy(), first.numpy())  # still readable here afterwards


def test_lmdb_of_a_deleted_folder_is_closed_before_the_next_one_opens(lmdb_root: Path, tmp_path: Path) -> None:
    # py-lmdb refuses an environment whose lock file has the (device, inode) of one still open in the process;
    # the lock file of a deleted folder is not held open, so its inode is free for reuse by any new file.
    from sarwmix.data import bigearthnetv2

    gone = copy_tree(lmdb_root, tmp_path / "gone")
    BenV2Lmdb(gone, "test")[0]
    assert any(path.startswith(str(gone)) for _, path in bigearthnetv2._LMDB_ENVS)
    shutil.rmtree(gone)
    fresh = BenV2Lmdb(copy_tree(lmdb_root, tmp_path / "fresh"), "test", input_size=120)
    assert fresh[0][0].shape == (2, 120, 120)
    assert not any(path.startswith(str(gone)) for _, path in bigearthnetv2._LMDB_ENVS)


def test_close_lmdb_environments_lets_the_files_be_opened_again(lmdb_root: Path, tmp_path: Path) -> None:
    from sarwmix.data.bigearthnetv2 import close_lmdb_environments

    copy = copy_tree(lmdb_root, tmp_path / "c")
    BenV2Lmdb(copy, "test")[0]
    with pytest.raises(lmdb.Error, match="already open in this process"):
        lmdb.open(str(copy / "BigEarthNet_LMDB"), readonly=True, lock=False)
    close_lmdb_environments()
    lmdb.open(str(copy / "BigEarthNet_LMDB"), readonly=True, lock=False).close()
    assert BenV2Lmdb(copy, "test", input_size=120)[0][0].shape == (2, 120, 120)  # the reader opens it anew


def _lmdb_with(path: Path, key: str, value: bytes) -> None:
    env = lmdb.open(str(path), map_size=2**24)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def test_lmdb_pickled_values_are_refused(lmdb_root: Path, tmp_path: Path) -> None:
    copy = copy_tree(lmdb_root, tmp_path / "c")
    name = expected("test")[0]
    sar_db = generate_patch(0)[0]
    _lmdb_with(copy / "BigEarthNet_LMDB", name, pickle.dumps({"VH": sar_db[0], "VV": sar_db[1]}))
    data = BenV2Lmdb(copy, "test")
    with pytest.raises(DataError, match=f"{name}.*is a Python pickle.*refusing to unpickle"):
        data[0]
    assert [b.name for b in GuardedData(data, "skip")[0][2]] == [name]


def test_lmdb_value_checks() -> None:
    sar_db = generate_patch(1)[0]
    np.testing.assert_array_equal(decode_lmdb_value(encode_lmdb_value(sar_db), "k"), sar_db)
    from safetensors.numpy import save

    with pytest.raises(DataError, match=r"k: bands \['VV'\] missing"):
        decode_lmdb_value(save({"VH": sar_db[0]}), "k")
    with pytest.raises(DataError, match="k: not a safetensors value"):
        decode_lmdb_value(b"\x01\x02garbage", "k")
    with pytest.raises(DataError, match=r"k/VV: expected shape \(120, 120\)"):
        decode_lmdb_value(save({"VH": sar_db[0], "VV": sar_db[1, :60]}), "k")
    nan = sar_db.copy()
    nan[0, 1, 1] = np.nan
    with pytest.raises(DataError, match="k/VH: 1 NaN/Inf"):
        decode_lmdb_value(encode_lmdb_value(nan), "k")


def test_lmdb_value_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle() -> None:
    from safetensors.numpy import save

    sar_db = generate_patch(2)[0]
    bands = {"VH": sar_db[0], "VV": sar_db[1]}
    value = next(v for pad in range(256) if (v := save(bands, metadata={"pad": "x" * pad}))[:1] == b"\x80")
    np.testing.assert_array_equal(decode_lmdb_value(value, "k"), sar_db)


def test_real_patch_folder_and_lmdb_are_identical(tmp_path: Path) -> None:
    real = real_s1_dir("rico_hdl_benv2")  # skipped, saying how to run it, without the samples
    name = next((real / "BigEarthNet-S1").glob("*/*")).name
    meta = pd.DataFrame({"patch_id": ["S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57"],
                         "labels": [["Coniferous forest", "Mixed forest"]], "split": ["train"],
                         "country": ["Austria"], "s1_name": [name], "s2v1_name": ["S2A_MSIL2A_x_0_0"],
                         "contains_seasonal_snow": [False], "contains_cloud_or_shadow": [False]})
    meta.to_parquet(tmp_path / "metadata.parquet")
    tifs = BenV2Folder(real, "train", metadata_file=str(tmp_path / "metadata.parquet"))
    store = BenV2Lmdb(real / "BigEarthNet_LMDB", "train", metadata_file=str(tmp_path / "metadata.parquet"))
    a, b = tifs.read_patch(0)[0], store.read_patch(0)[0]
    assert a.shape == (2, 120, 120) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert -35 < a[0].mean() < a[1].mean() < -3, "real dB: VH darker than VV"
    assert np.flatnonzero(tifs.targets[0]).tolist() == [9, 10]


@pytest.mark.parametrize("name", ["BigEarthNet-V2-LMDB", "Encoded-BigEarthNet"])
def test_lmdb_folder_of_any_name_is_found(lmdb_root: Path, tmp_path: Path, name: str) -> None:
    """rico-hdl users name the LMDB folder as they like: the one folder holding data.mdb beside the metadata."""
    copy = copy_tree(lmdb_root, tmp_path / "c")
    (copy / "BigEarthNet_LMDB").rename(copy / name)
    store = BenV2Lmdb(copy, "train", input_size=120)
    assert store.lmdb_path == copy / name
    assert store.names == expected("train")


def test_two_lmdb_folders_are_one_error_naming_both(lmdb_root: Path, tmp_path: Path) -> None:
    copy = copy_tree(lmdb_root, tmp_path / "c")
    shutil.copytree(copy / "BigEarthNet_LMDB", copy / "Encoded-BigEarthNet")
    with pytest.raises(DataError, match="BigEarthNet_LMDB.*Encoded-BigEarthNet.*--data_path"):
        BenV2Lmdb(copy, "train", input_size=120)


def test_no_lmdb_folder_is_a_clear_error(lmdb_root: Path, tmp_path: Path) -> None:
    copy = copy_tree(lmdb_root, tmp_path / "c")
    shutil.rmtree(copy / "BigEarthNet_LMDB")
    (copy / "notes").mkdir()
    with pytest.raises(DataError, match="no LMDB.*data.mdb"):
        BenV2Lmdb(copy, "train", input_size=120)
