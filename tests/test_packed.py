"""Packed format: converter round trips from every source, shards, dtypes, bad input, command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sarwmix.data.bigearthnetv1 import BenV1Folder, to_zarr
from sarwmix.data.bigearthnetv2 import BenV2Lmdb
from sarwmix.data.packed import convert, convert_synthetic, main
from sarwmix.data.packed_format import PackedDataset
from sarwmix.data.synthetic import write_benv1, write_benv2_lmdb
from sarwmix.errors import ConfigError, DataError

N, SEED = 20, 11


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_benv1(root / "benv1", N, SEED)
    to_zarr(root / "benv1", root / "benv1" / "BigEarthNet-S1-v1.0.zarr", 2)
    write_benv2_lmdb(root / "lmdb", N, SEED)
    return {"benv1": root / "benv1", "benv1_zarr": root / "benv1" / "BigEarthNet-S1-v1.0.zarr",
            "benv2_lmdb": root / "lmdb"}


def assert_same_items(a: torch.utils.data.Dataset, b: torch.utils.data.Dataset) -> None:
    assert a.names == b.names and len(a) > 0
    for i in range(len(a)):
        xa, ya = a[i]
        xb, yb = b[i]
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["benv1", "benv1_zarr", "benv2_lmdb"])
def test_round_trip_equals_the_source(sources: dict[str, Path], tmp_path: Path, source: str) -> None:
    out = convert(source, sources[source], tmp_path / "packed", shard_size=7)
    meta = json.loads((out / "packed.json").read_text())
    assert len(meta["shards"]) == -(-meta["n"] // 7) > 1, "several shards, the last one partial"
    v1 = source.startswith("benv1")
    assert meta["stats"] == ("benv1" if v1 else "benv2") and meta["label_set"] == (43 if v1 else 19)
    for split in ("train", "val", "test"):
        packed = PackedDataset(out, split, input_size=128)
        original = (BenV1Folder(sources["benv1"], split) if v1 else BenV2Lmdb(sources["benv2_lmdb"], split))
        assert packed.stats == original.stats
        assert_same_items(packed, original)
    if v1:
        assert_same_items(PackedDataset(out, "val", input_size=120, label_set=43),
                          BenV1Folder(sources["benv1"], "val", input_size=120, label_set=43))
    else:
        with pytest.raises(ConfigError, match="stores 19-class labels"):
            PackedDataset(out, "val", label_set=43)


def test_float16_is_close_and_half_the_size(sources: dict[str, Path], tmp_path: Path) -> None:
    full = convert("benv1", sources["benv1"], tmp_path / "f32", splits=("test",))
    half = convert("benv1", sources["benv1"], tmp_path / "f16", splits=("test",), dtype="float16")
    assert (half / "shard_00000.npy").stat().st_size < 0.51 * (full / "shard_00000.npy").stat().st_size
    a, b = PackedDataset(full, "test", input_size=120), PackedDataset(half, "test", input_size=120)
    for i in range(len(a)):
        np.testing.assert_allclose(b[i][0].numpy(), a[i][0].numpy(), atol=0.02)
    with pytest.raises(DataError, match="split 'train' is empty"):
        PackedDataset(full, "train")


def test_synthetic_packed_matches_the_v1_writer(sources: dict[str, Path], tmp_path: Path) -> None:
    out = convert_synthetic(tmp_path / "syn", N, SEED)
    assert_same_items(PackedDataset(out, "validation"), BenV1Folder(sources["benv1"], "val"))


def test_bad_packed_folders(sources: dict[str, Path], tmp_path: Path) -> None:
    out = convert_synthetic(tmp_path / "p", N, SEED)
    with pytest.raises(ConfigError, match="already holds a packed data set"):
        convert_synthetic(out, N, SEED)
    shard = np.load(out / "shard_00000.npy", mmap_mode="r+")
    data = PackedDataset(out, "train")
    shard[int(data.rows[0]), 1, 2, 3] = np.nan
    shard.flush()
    with pytest.raises(DataError, match=f"shard_00000.npy: patch {data.names[0]} .* NaN/Inf"):
        PackedDataset(out, "train")[0]
    meta = json.loads((out / "packed.json").read_text())
    (out / "packed.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(DataError, match="version 99"):
        PackedDataset(out, "train")
    (out / "packed.json").unlink()
    with pytest.raises(DataError, match="no packed.json"):
        PackedDataset(out, "train")


def test_missing_or_inconsistent_index_files(tmp_path: Path) -> None:
    out = convert_synthetic(tmp_path / "p", N, SEED)
    targets = np.load(out / "targets.npy")
    np.save(out / "targets.npy", targets[:-1])
    with pytest.raises(DataError, match=r"targets.npy has shape .* one row per row of index.parquet"):
        PackedDataset(out, "train")
    (out / "targets.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="unreadable index.parquet / targets.npy"):
        PackedDataset(out, "train")
    np.save(out / "targets.npy", targets)
    (out / "index.parquet").unlink()
    with pytest.raises(DataError, match="missing or unreadable index.parquet"):
        PackedDataset(out, "train")


def test_workers_reopen_the_memory_maps(tmp_path: Path) -> None:
    data = PackedDataset(convert_synthetic(tmp_path / "p", N, SEED), "train")
    data[0]  # maps opened in this process must not be shipped to the workers
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    batches = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(batches, torch.stack([data[i][0] for i in range(len(data))]))


def test_command_line(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "--source", "benv2_lmdb", str(sources["benv2_lmdb"]), str(tmp_path / "a"),
                 "--split", "train", "--dtype", "float16"]) == 0
    assert "float16" in capsys.readouterr().out
    assert main(["convert", "--source", "synthetic", str(tmp_path / "s"), "--n", "8"]) == 0
    assert main(["convert", "--source", "benv1", str(tmp_path / "absent"), str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["convert", "--source", "benv1", str(tmp_path / "only_one")]) == 2
