"""Pruning of partial-coverage SEN12-FLOOD pairs (>= 25 % exact zeros in any channel of either date)."""
from __future__ import annotations

import numpy as np
import pytest
from _sen12_helpers import copy_tree, mostly_zero_filename, shared_pairs, shared_root

from sarwmix.errors import ConfigError, DataError
from sarwmix.prep.sen12_prune_partial_pairs import is_partial, main, prune_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return shared_pairs(tmp_path_factory)


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    return mostly_zero_filename(shared_root(tmp_path_factory))


def _names(folder):
    return sorted(p.name for p in folder.glob("*.npy"))


def test_prunes_exactly_the_pairs_of_the_mostly_zero_image(pairs, heavy, tmp_path, capsys):
    out = copy_tree(pairs, tmp_path / "pairs")
    with_heavy = [n for n in _names(out / "train") if heavy in n]
    assert len(with_heavy) == 3  # 0001: the image of date 2 pairs with dates 1, 3 and 4
    before = {s: _names(out / s) for s in ("train", "test")}
    assert main([str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "train: kept 5, moved to _pruned 3 pairs with >= 25% zeros",
        "test: kept 2, moved to _pruned 0 pairs with >= 25% zeros"]
    assert _names(out / "_pruned" / "train") == with_heavy
    assert _names(out / "train") == sorted(set(before["train"]) - set(with_heavy))
    assert _names(out / "test") == before["test"]


def test_dry_run_and_delete(pairs, tmp_path):
    out = copy_tree(pairs, tmp_path / "pairs")
    before = _names(out / "train")
    assert prune_pairs(out, dry_run=True) == {"train": {"kept": 5, "pruned": 3},
                                              "test": {"kept": 2, "pruned": 0}}
    assert _names(out / "train") == before and not (out / "_pruned").exists()
    prune_pairs(out, delete=True)
    assert len(_names(out / "train")) == 5 and not (out / "_pruned").exists()


@pytest.mark.parametrize("date, channel", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_threshold_applies_to_any_channel_of_either_date(tmp_path, date, channel):
    pair = np.ones((2, 2, 40, 40), dtype=np.float32)
    pair[date, channel, :10, :] = 0.0  # exactly 25 % zeros
    np.save(tmp_path / "exact.npy", pair)
    pair[date, channel, 9, 0] = 1.0  # one pixel under 25 %
    np.save(tmp_path / "under.npy", pair)
    assert is_partial(tmp_path / "exact.npy") and not is_partial(tmp_path / "under.npy")
    assert is_partial(tmp_path / "under.npy", threshold=0.2)


def test_bad_input(tmp_path, capsys):
    with pytest.raises(DataError, match="none of the split folders"):
        prune_pairs(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="threshold"):
        prune_pairs(tmp_path, threshold=0.0)
    np.save(tmp_path / "train" / "a__b__c__1.npy", np.zeros((2, 512, 512), dtype=np.float32))
    with pytest.raises(DataError, match=r"a__b__c__1.npy has shape \(2, 512, 512\)"):
        prune_pairs(tmp_path)
    (tmp_path / "train" / "a__b__c__1.npy").write_bytes(b"not numpy")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
