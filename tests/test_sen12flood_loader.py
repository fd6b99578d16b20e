"""SEN12-FLOOD pair loader: shapes, dtypes, dB conversion with the no-data floor, splits, bad files."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from _sen12_helpers import copy_tree, shared_pairs

from sarwmix.constants import DATASET_STATS, LINEAR_FLOOR
from sarwmix.data.sen12flood_loader import Sen12FloodPairs
from sarwmix.errors import ConfigError, DataError
from sarwmix.prep.sen12_data_prep import count_labels, print_class_counts
from sarwmix.prep.sen12_prune_partial_pairs import prune_pairs
from sarwmix.sar.units import linear_to_db


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = copy_tree(shared_pairs(tmp_path_factory), tmp_path_factory.mktemp("loader") / "pairs")
    prune_pairs(out, delete=True)
    return out


def test_items_are_db_pairs_with_int64_labels(pruned):
    ds = Sen12FloodPairs(pruned, "train")
    assert len(ds) == 5 and ds.num_classes == 2
    assert ds.labels == [int(p.stem[-1]) for p in ds.files] and sorted(ds.labels) == [0, 0, 0, 1, 1]
    assert ds.stats == {"name": "sen12flood", **DATASET_STATS["sen12flood"]}
    for i in range(len(ds)):
        pair_db, label = ds[i]
        assert pair_db.shape == (2, 2, 512, 512) and pair_db.dtype == torch.float32
        assert label.dtype == torch.int64 and label.ndim == 0 and int(label) == ds.labels[i]
        assert torch.isfinite(pair_db).all() and pair_db.min() >= -60.0 and pair_db.max() < 30.0
        valid = pair_db[pair_db > -60]
        assert -30.0 < float(valid.mean()) < -5.0  # dB, not normalised, not linear
        lin = np.load(ds.files[i])
        np.testing.assert_allclose(pair_db.numpy(), 10 * np.log10(np.maximum(lin, 1e-6)), atol=1e-4)


def test_zeros_become_minus_60_db_not_inf(pruned):
    ds = Sen12FloodPairs(pruned, "train")
    with_zeros = [i for i, p in enumerate(ds.files) if (np.load(p) == 0).any()]
    assert with_zeros  # the thin no-data strips survive pruning
    lin = np.load(ds.files[with_zeros[0]])
    pair_db = ds[with_zeros[0]][0].numpy()
    assert (pair_db[lin == 0] == np.float32(10 * np.log10(LINEAR_FLOOR))).all()
    assert np.float32(10 * np.log10(LINEAR_FLOOR)) == -60.0
    assert linear_to_db(np.array([0.0, -1.0, 1.0], dtype=np.float32)).tolist() == [-60.0, -60.0, 0.0]


def test_flood_pairs_show_darkening(pruned):
    # The synthetic floods darken the second image: a signal the finetuning can learn.
    ds = Sen12FloodPairs(pruned, "train")
    change = {0: [], 1: []}
    for pair_db, label in (ds[i] for i in range(len(ds))):
        change[int(label)].append(float(pair_db[1].mean() - pair_db[0].mean()))
    assert max(change[1]) < min(change[0]) - 1.0


def test_val_split_falls_back_to_test_with_a_warning(pruned, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sarwmix.data.sen12flood_loader"):
        ds = Sen12FloodPairs(pruned, "val")
    assert ds.files == Sen12FloodPairs(pruned, "test").files and "no validation split" in caplog.text
    root = copy_tree(pruned, tmp_path / "pairs")
    (root / "val").mkdir()
    moved = min((root / "train").glob("*.npy"))
    moved.rename(root / "val" / moved.name)
    caplog.clear()
    assert [p.name for p in Sen12FloodPairs(root, "validation").files] == [moved.name]
    assert "no validation split" not in caplog.text
    with pytest.raises(ConfigError, match="split must be one of"):
        Sen12FloodPairs(root, "dev")


def test_bad_files(pruned, tmp_path):
    root = tmp_path / "pairs"
    (root / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no .npy pair files"):
        Sen12FloodPairs(root)
    with pytest.raises(DataError, match="split folder not found"):
        Sen12FloodPairs(root, "test")
    pair = np.load(min((pruned / "train").glob("*.npy")))
    pair[1, 0, 5, 5] = np.nan
    np.save(root / "train" / "0001__a__b__1.npy", pair)
    ds = Sen12FloodPairs(root)
    with pytest.raises(DataError, match="0001__a__b__1.npy holds non-finite"):
        ds[0]
    np.save(root / "train" / "0001__a__b__1.npy", pair[:, :, :256])
    with pytest.raises(DataError, match=r"has shape \(2, 2, 256, 512\)"):
        ds[0]
    np.save(root / "train" / "0001__a__b__flood.npy", pair)
    with pytest.raises(DataError, match="0001__a__b__flood.npy: expected a name"):
        Sen12FloodPairs(root)


def test_class_counts(pruned, capsys):
    assert count_labels(pruned) == {"train": (3, 2), "test": (0, 2)}
    assert print_class_counts(pruned) == 0
    assert capsys.readouterr().out.splitlines() == ["train: 5 pairs (no flood 3, flood 2)",
                                                    "test: 2 pairs (no flood 0, flood 2)"]
    assert print_class_counts(pruned / "train") == 2
    assert "no train/val/test folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "npz", "int16", "complex64", "bool"])
def test_unreadable_or_non_float_pair_file_is_a_data_error_naming_it(kind, tmp_path):
    # An interrupted write leaves an empty file (np.load: EOFError); an .npz loads as an archive; integer,
    # complex or boolean arrays are not linear power and must not be converted silently.
    path = tmp_path / "train" / "0001__a__b__1.npy"
    path.parent.mkdir()
    power = np.full((2, 2, 512, 512), 0.03, dtype=np.float32)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, pair=power)
    else:
        np.save(path, power.astype(kind))
    with pytest.raises(DataError, match=r"0001__a__b__1\.npy (is not a readable \.npy|has dtype)"):
        Sen12FloodPairs(tmp_path)[0]
