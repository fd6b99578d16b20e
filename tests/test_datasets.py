"""sarwmix.data.datasets and sarwmix.data.patches: every format, channel subsets, split names, resize, bad patches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sarwmix.constants import DATASET_STATS
from sarwmix.data.bad_patches import GuardedData
from sarwmix.data.datasets import DATASETS, build_dataset, write_format
from sarwmix.data.patches import PatchDataset, channel_indices, resize_db
from sarwmix.errors import ConfigError, DataError

N, SEED = 16, 2


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    for fmt in ("benv1", "benv1_zarr", "benv2", "benv2_lmdb", "packed"):
        write_format(fmt, base / fmt, N, SEED)
    return {fmt: base / fmt for fmt in ("benv1", "benv1_zarr", "benv2", "benv2_lmdb", "packed")}


@pytest.mark.parametrize("name", ["benv1", "benv1_zarr", "benv2", "benv2_lmdb", "packed"])
def test_every_format_builds_with_the_same_contract(roots: dict[str, Path], name: str) -> None:
    data = build_dataset(name, data_path=str(roots[name]), split="train", input_size=64)
    x, y = data[0]
    assert x.shape == (2, 64, 64) and x.dtype == torch.float32
    assert y.shape == (19,) and y.dtype == torch.float32 and data.num_classes == 19
    assert data.stats == {"name": "benv2" if name.startswith("benv2") else "benv1",
                          **DATASET_STATS["benv2" if name.startswith("benv2") else "benv1"]}
    vv = build_dataset(name, data_path=str(roots[name]), split="train", input_size=64, channels=("VV",))
    torch.testing.assert_close(vv[0][0], x[1:])
    assert vv.stats["mean"] == [data.stats["mean"][1]]


def test_all_formats_hold_the_same_patches(roots: dict[str, Path]) -> None:
    items = {name: build_dataset(name, data_path=str(path), split="test", input_size=128)
             for name, path in roots.items()}
    reference = items.pop("benv1")
    for data in items.values():
        for i in range(len(reference)):
            torch.testing.assert_close(data[i][0], reference[i][0], rtol=0, atol=0)


def test_split_name_aliases(roots: dict[str, Path]) -> None:
    for name in ("benv1", "benv2"):
        val = build_dataset(name, data_path=str(roots[name]), split="val", input_size=32)
        validation = build_dataset(name, data_path=str(roots[name]), split="validation", input_size=32)
        assert val.names == validation.names and len(val) > 0
    with pytest.raises(ConfigError, match="split 'dev'"):
        build_dataset("benv1", data_path=str(roots["benv1"]), split="dev", input_size=32)


def test_synthetic_defaults_and_split_seeds() -> None:
    train = build_dataset("synthetic", data_path=None, split="train", input_size=32)
    val = build_dataset("synthetic", data_path=None, split="val", input_size=32)
    assert (len(train), len(val)) == (512, 128)
    assert not torch.equal(train[0][0], val[0][0])
    small = build_dataset("synthetic", data_path=None, split="test", input_size=32, num_samples=5, seed=1)
    assert len(small) == 5 and not torch.equal(small[0][0], build_dataset(
        "synthetic", data_path=None, split="test", input_size=32, num_samples=5)[0][0])


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="dataset 'imagenet'"):
        build_dataset("imagenet", data_path=None, split="train", input_size=32)
    with pytest.raises(ConfigError, match="needs --data_path"):
        build_dataset("benv1", data_path=None, split="train", input_size=32)
    with pytest.raises(ConfigError, match="channels"):
        channel_indices(("HH",))
    assert channel_indices(("VV", "VH")) == (1, 0)
    assert "sen12flood" in DATASETS and "packed" in DATASETS


def test_resize_db() -> None:
    x = torch.randn(2, 120, 120)
    assert resize_db(x, 120) is x
    assert resize_db(x, 128).shape == (2, 128, 128)
    const = torch.full((1, 120, 120), -17.5)
    torch.testing.assert_close(resize_db(const, 128), torch.full((1, 128, 128), -17.5))
    ramp = torch.arange(120.0).expand(1, 120, 120)
    out = resize_db(ramp, 240)[0, 0]
    assert out[0] == 0 and out[-1] == 119 and torch.all(out[1:] >= out[:-1])


class _Flaky(PatchDataset):
    """Items whose index is in ``bad`` raise DataError."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(input_size=8, channels=("VH", "VV"), stats_name="benv1", label_set=19)
        self.names, self.bad = [f"p{i}" for i in range(n)], bad

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self.bad:
            raise DataError(f"p{i}.tif: broken")
        return np.full((2, 8, 8), float(i), np.float32), np.zeros(19, np.float32)


def test_bad_patch_raises_and_the_guard_replaces_it() -> None:
    with pytest.raises(DataError, match="p1.tif: broken"):
        _Flaky(4, {1})[1]
    data = GuardedData(_Flaky(4, {1, 2}), "skip")
    index, (x, _), met = data[1]
    assert x[0, 0, 0] == 3.0 and [b.name for b in met] == ["p1", "p2"]
    assert data[3][1][0][0, 0, 0] == 3.0 and _Flaky(4, set())[-1][0][0, 0, 0] == 3.0
    with pytest.raises(DataError, match="all 3 patches of the data set are bad"):
        GuardedData(_Flaky(3, {0, 1, 2}), "skip")[0]
    with pytest.raises(IndexError):
        _Flaky(4, set())[4]


def test_sen12flood_is_delegated(tmp_path: Path) -> None:
    pytest.importorskip("sarwmix.data.sen12flood_loader")
    with pytest.raises((ConfigError, DataError, FileNotFoundError)):
        build_dataset("sen12flood", data_path=str(tmp_path / "absent"), split="train", input_size=128)


def test_sen12flood_refuses_a_channel_subset(tmp_path: Path) -> None:
    """The pair files hold VH and VV of both dates: a subset would give the model the wrong in_chans."""
    with pytest.raises(ConfigError, match=r"sen12flood.*\('VV',\)"):
        build_dataset("sen12flood", data_path=str(tmp_path), split="train", input_size=512, channels=("VV",))
