"""Bad patches at run time: the five ways a patch goes bad, each injected into a data set in its real format,
in both modes (stop with one line naming the patch; --skip_bad: skip, count per epoch, list, stop past
--max_bad), for pretraining and finetuning; and the guard itself (sarwmix.data.bad_patches)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _bigearthnet_helpers import poke_nan, truncate, write_wrong_shape

import main_finetune
import main_pretrain
from sarwmix.data.bad_patches import BadPatch, Collate, GuardedData, patch_name, unpack
from sarwmix.data.bigearthnetv2 import LMDB_FOLDER
from sarwmix.data.datasets import build_dataset
from sarwmix.data.synthetic import convert_synthetic, write_benv1, write_benv2, write_benv2_lmdb
from sarwmix.errors import DataError
from util.subsets import SubsetView

N = 24  # synthetic patches written per data set (about half of them in the train split)


class _Items(torch.utils.data.Dataset):
    """Items 0..n-1 as (tensor [i], i); those in ``bad`` raise DataError naming a file."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad
        self.stats, self.num_classes = {"mean": [0.0], "std": [1.0]}, 1

    def __len__(self) -> int:
        return self.n

    def patch_name(self, i: int) -> str:
        return f"p{i}"

    def __getitem__(self, i: int):
        if i in self.bad:
            raise DataError(f"/data/p{i}.tif: broken")
        return torch.tensor([float(i)]), i


def test_guard_modes_replace_drop_or_stop():
    skip = GuardedData(_Items(5, {1, 2}), "skip")
    index, item, met = skip[1]
    assert (index, item[1]) == (1, 3) and [b.name for b in met] == ["p1", "p2"]  # the next readable one
    assert skip[4][2] == [] and skip[4][1][1] == 4
    assert GuardedData(_Items(3, {2}), "skip")[2][1][1] == 0  # wraps around
    with pytest.raises(DataError, match="all 2 patches of the data set are bad; the first: bad patch p0"):
        GuardedData(_Items(2, {0, 1}), "skip")[0]
    batch = Collate("skip")([skip[i] for i in range(4)])
    assert batch.data[1].tolist() == [0, 3, 3, 3] and batch.fatal is None and len(batch.skipped) == 3
    drop = GuardedData(_Items(5, {1, 2}), "drop")
    dropped = Collate("drop")([drop[i] for i in range(4)])
    assert dropped.data[1].tolist() == [0, 3] and dropped.indices == [0, 3]
    assert [b.name for b in dropped.skipped] == ["p1", "p2"]
    stop = GuardedData(_Items(5, {2}), "stop")
    stopped = Collate("stop")([stop[i] for i in range(4)])
    assert stopped.data is None and stopped.fatal == BadPatch("p2", "/data/p2.tif: broken")
    assert unpack(stopped)[2] is stopped.fatal and unpack([1, 2]) == ([1, 2], [], None)
    with pytest.raises(ValueError, match="bad-patch mode 'ignore'"):
        GuardedData(_Items(1, set()), "ignore")


def test_patch_names_reach_through_subsets():
    items = _Items(5, set())
    assert patch_name(SubsetView(items, [4, 2]), 1) == "p2"
    assert patch_name(torch.utils.data.TensorDataset(torch.zeros(2)), 1) == "item 1"


# --- the five kinds, injected into real formats ---

def _train_names(fmt: str, root: Path) -> list[str]:
    data = build_dataset(fmt, data_path=str(root), split="train", input_size=64)
    return [data.patch_name(i) for i in range(len(data))]


def _truncated_tif(root: Path, name: str) -> None:
    truncate(root / "BigEarthNet-S1-v1.0" / name / f"{name}_VV.tif", keep=2000)


def _nan_tif(root: Path, name: str) -> None:
    folder = next((root / "BigEarthNet-S1").glob(f"*/{name}"))
    poke_nan(folder / f"{name}_VH.tif")


def _wrong_shape(root: Path, name: str) -> None:
    write_wrong_shape(root / "BigEarthNet-S1-v1.0" / name / f"{name}_VH.tif")


def _undecodable_lmdb(root: Path, name: str) -> None:
    # In a process of its own: this one may still hold an environment of an earlier test's deleted copy, and
    # LMDB refuses a second environment on a recycled inode ("already open in this process").
    code = ("import lmdb, sys; env = lmdb.open(sys.argv[1], map_size=2**26); "
            "txn = env.begin(write=True); txn.put(sys.argv[2].encode(), b'not a safetensors value'); txn.commit()")
    subprocess.run([sys.executable, "-c", code, str(root / LMDB_FOLDER), name], check=True, timeout=60)


KINDS = {  # kind: (format, writer, damage of one patch, what the one-line error says)
    "truncated GeoTIFF": ("benv1", write_benv1, _truncated_tif, "not a readable GeoTIFF|readable"),
    "NaN pixels": ("benv2", write_benv2, _nan_tif, "NaN/Inf pixels"),
    "wrong shape": ("benv1", write_benv1, _wrong_shape, r"expected shape \(120, 120\), got \(100, 100\)"),
    "undecodable LMDB value": ("benv2_lmdb", write_benv2_lmdb, _undecodable_lmdb, "not a safetensors value"),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """One clean copy of each format (each test damages a copy of its own)."""
    base = tmp_path_factory.mktemp("clean")
    out = {fmt: base / fmt for fmt in ("benv1", "benv2", "benv2_lmdb")}
    for fmt, writer in (("benv1", write_benv1), ("benv2", write_benv2), ("benv2_lmdb", write_benv2_lmdb)):
        writer(out[fmt], N, seed=3)
    convert_synthetic(base / "packed", N, seed=3, shard_size=4)
    out["packed"] = base / "packed"
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _pretrain(out: Path, fmt: str, root: Path, n_train: int, *extra: str) -> dict:
    # One update per epoch (the whole train split in one batch): every patch is drawn in every epoch.
    args = main_pretrain.parse_args([
        "--model", "mixmim_study", "--input_size", "64", "--dataset", fmt, "--data_path", str(root),
        "--batch_size", str(n_train), "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
        "--no-progress", "--vis_samples", "0", "--output_dir", str(out), *extra])
    return main_pretrain.main(args)


def _damaged(kind: str, datasets: dict[str, Path], tmp_path: Path, bad: int = 2) -> tuple[str, Path, list, list]:
    """A copy of the kind's format with ``bad`` train patches damaged: (format, root, train names, bad names)."""
    fmt, _, damage, _ = KINDS[kind]
    names = _train_names(fmt, datasets[fmt])  # of the clean copy: an LMDB is opened once per process
    root = _copy(datasets[fmt], tmp_path / "data")
    for name in names[1:1 + bad]:
        damage(root, name)
    return fmt, root, names, names[1:1 + bad]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_bad_patch_stops_the_run_with_one_line_naming_it(kind, datasets, tmp_path):
    fmt, root, names, bad = _damaged(kind, datasets, tmp_path, bad=1)
    with pytest.raises(DataError, match=KINDS[kind][3]) as err:
        _pretrain(tmp_path / "out", fmt, root, len(names))
    message = str(err.value)
    assert message.startswith(f"bad patch {bad[0]}: ") and "--skip_bad" in message
    assert "\n" not in message
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_skip_bad_counts_each_epoch_and_lists_the_patches(kind, datasets, tmp_path):
    fmt, root, names, bad = _damaged(kind, datasets, tmp_path, bad=2)
    out = tmp_path / "out"
    _pretrain(out, fmt, root, len(names), "--skip_bad", "--max_bad", "0.5")
    assert [e["bad_patches"] for e in _log(out)] == [2, 2]
    listed = [line.split("\t") for line in (out / "bad_patches.txt").read_text().splitlines()]
    assert sorted((e, n) for e, n, _ in listed) == sorted((str(e), n) for e in (0, 1) for n in bad)
    assert all(reason for _, _, reason in listed)


def _packed_with_truncated_shard(datasets: dict[str, Path], tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    root = _copy(datasets["packed"], tmp_path / "data")
    meta = json.loads((root / "packed.json").read_text())
    index = pd.read_parquet(root / "index.parquet")
    train = index.index[index["split"] == "train"].tolist()
    shard = train[0] // meta["shard_size"]  # the shard of the first train patch
    truncate(root / meta["shards"][shard], keep=500)
    rows = range(shard * meta["shard_size"], (shard + 1) * meta["shard_size"])
    bad = [index["name"][r] for r in rows if r in train]
    return root, index["name"][train].tolist(), bad


def test_truncated_packed_shard_in_both_modes(datasets, tmp_path):
    root, names, bad = _packed_with_truncated_shard(datasets, tmp_path)
    assert 1 <= len(bad) < len(names)  # the other shards stay readable
    with pytest.raises(DataError, match=f"bad patch {bad[0]}: .*unreadable shard"):
        _pretrain(tmp_path / "stop", "packed", root, len(names))
    _pretrain(tmp_path / "skip", "packed", root, len(names), "--skip_bad", "--max_bad", "0.9")
    assert [e["bad_patches"] for e in _log(tmp_path / "skip")] == [len(bad)] * 2


def test_more_bad_than_max_bad_stops_the_run(datasets, tmp_path):
    fmt, root, names, bad = _damaged("wrong shape", datasets, tmp_path, bad=2)
    limit = 1.5 / len(names)  # one bad patch allowed, two met
    with pytest.raises(DataError, match=rf"2 bad patches in epoch 0, more than --max_bad {limit:g}"):
        _pretrain(tmp_path / "out", fmt, root, len(names), "--skip_bad", "--max_bad", str(limit))


def test_finetuning_skips_bad_training_and_evaluation_patches(datasets, tmp_path):
    """Training patches are replaced and counted, evaluation patches left out and counted (n_bad)."""
    root = _copy(datasets["benv1"], tmp_path / "data")
    for split, count in (("train", 1), ("val", 1), ("test", 2)):
        data = build_dataset("benv1", data_path=str(root), split=split, input_size=64)
        for i in range(count):
            poke_nan(root / "BigEarthNet-S1-v1.0" / data.patch_name(i) / f"{data.patch_name(i)}_VV.tif")
    common = ["--model", "mixmim_study", "--input_size", "64", "--dataset", "benv1", "--data_path", str(root),
              "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--no-progress"]
    with pytest.raises(DataError, match="NaN/Inf pixels"):
        main_finetune.main(main_finetune.parse_args([*common, "--output_dir", str(tmp_path / "stop")]))
    results = main_finetune.main(main_finetune.parse_args([*common, "--skip_bad", "--max_bad", "0.5",
                                                          "--output_dir", str(tmp_path / "skip")]))
    assert results["val"]["n_bad"] == 1 and results["test"]["n_bad"] == 2
    n_val = len(build_dataset("benv1", data_path=str(root), split="val", input_size=64))
    assert results["val"]["n_samples"] == n_val - 1
    assert _log(tmp_path / "skip")[0]["bad_patches"] == 1


def test_every_bad_patch_kind_is_a_data_error_naming_its_file(datasets, tmp_path):
    """The readers' side of the contract: each kind raises DataError with the file in the message."""
    for kind in KINDS:
        fmt, root, names, bad = _damaged(kind, datasets, tmp_path / kind.replace(" ", "_"), bad=1)
        data = build_dataset(fmt, data_path=str(root), split="train", input_size=64)
        with pytest.raises(DataError) as err:
            data[names.index(bad[0])]
        assert str(root) in str(err.value), kind
        assert np.isfinite(data[0][0].numpy()).all()
