"""sarwmix.data.datasets.DATASETS: what each entry answers, and a data set added in a test (its reader plus one
entry) that pretraining and finetuning then run on through their entry points."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import main_finetune
import main_pretrain
from sarwmix.data.datasets import DATASETS, DatasetSpec, build_dataset, dataset_names, dataset_spec, normalise_split
from sarwmix.data.packed import sources
from sarwmix.data.patches import PatchDataset
from sarwmix.data.synthetic import generate_patch
from sarwmix.errors import ConfigError, DataError
from util.runner import common_parser


def test_the_table_answers_what_the_entry_points_ask():
    assert dataset_names(synthetic=True) == ("synthetic",)
    assert dataset_names(pairs=True) == ("sen12flood",)
    assert [normalise_split(dataset_spec(n), "val") for n in ("benv1", "benv2", "benv2_lmdb", "packed")] == [
        "val", "validation", "validation", "val"]
    assert sources() == ("synthetic", "benv1", "benv1_zarr", "benv2", "benv2_lmdb")
    assert {n: s.pack_label_set for n, s in DATASETS.items() if s.pack_label_set} == {
        "benv1": 43, "benv1_zarr": 43, "benv2": 19, "benv2_lmdb": 19}
    with pytest.raises(ConfigError, match="split 'dev': expected one of"):
        normalise_split(DATASETS["benv1"], "dev")


class NpyPatches(PatchDataset):
    """A toy format: ``<root>/<split>/<name>__<class>.npy`` holding (2, 120, 120) dB [VH, VV]."""

    def __init__(self, data_path, split, *, input_size, channels, label_set, **_) -> None:
        super().__init__(input_size=input_size, channels=channels, stats_name="benv1", label_set=label_set)
        self.files = sorted((Path(data_path) / split).glob("*.npy"))
        if not self.files:
            raise DataError(f"{Path(data_path) / split}: no .npy patches")
        self.names = [f.stem for f in self.files]

    def read_patch(self, i: int):
        target = np.zeros(self.num_classes, np.float32)
        target[int(self.names[i].rsplit("__", 1)[1])] = 1.0
        return np.load(self.files[i]).astype(np.float32), target


@pytest.fixture
def npy_patches(monkeypatch, tmp_path) -> Path:
    """The toy format registered under ``npy_patches`` (one entry), and 8 patches per split written."""
    monkeypatch.setitem(DATASETS, "npy_patches", DatasetSpec(NpyPatches))
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        for i in range(8):
            sar_db, target, _ = generate_patch(hash((split, i)) % 10_000)
            np.save(tmp_path / split / f"p{i}__{int(np.argmax(target))}.npy", sar_db)
    return tmp_path


def test_an_added_data_set_is_a_choice_and_a_reader(npy_patches):
    args = common_parser().parse_args(["--dataset", "npy_patches", "--data_path", str(npy_patches)])
    assert args.dataset == "npy_patches"
    data = build_dataset("npy_patches", data_path=str(npy_patches), split="val", input_size=64)
    assert len(data) == 8 and data[0][0].shape == (2, 64, 64) and data.patch_name(0).startswith("p0__")


def test_pretraining_and_finetuning_run_on_an_added_data_set(npy_patches, tmp_path):
    common = ["--model", "mixmim_study", "--input_size", "64", "--dataset", "npy_patches", "--data_path",
              str(npy_patches), "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
              "--no-progress"]
    main_pretrain.main(main_pretrain.parse_args([*common, "--vis_samples", "0", "--output_dir", str(tmp_path / "pre")]))
    assert json.loads((tmp_path / "pre" / "log.txt").read_text().splitlines()[0])["epoch"] == 0
    results = main_finetune.main(main_finetune.parse_args([
        *common, "--finetune", str(tmp_path / "pre" / "checkpoint.pth"), "--output_dir", str(tmp_path / "ft")]))
    assert results["task"] == "ben" and results["dataset"] == "npy_patches" and results["test"]["n_samples"] == 8
