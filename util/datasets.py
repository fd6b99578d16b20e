"""One entry point for every data set (``build_dataset``), the shared resize, and the reader base class.

Every data set returns ``(sar_db, target)``: raw dB float32 ``(C, input_size, input_size)`` in the channel
order of ``CHANNELS`` (or the requested subset) and a float32 multi-hot target. Nothing here normalises or
flips: the training engine does both on the device, from ``dataset.stats`` and a per-step seed, so a
resumed run sees exactly the same augmentations.

The readers live in ``sarwmix/`` and are imported inside ``build_dataset`` only, because they import
``PatchDataset`` from here.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, CHANNELS, DATASET_STATS
from sarwmix.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = (
    "synthetic", "benv1", "benv1_zarr", "benv2", "benv2_lmdb", "packed", "sen12flood",
)
SPLITS: tuple[str, ...] = ("train", "val", "validation", "test")


def channel_indices(channels: tuple[str, ...]) -> tuple[int, ...]:
    """Positions of ``channels`` in ``CHANNELS`` (e.g. ("VV",) -> (1,)); unknown names are a ConfigError."""
    bad = [c for c in channels if c not in CHANNELS]
    if bad or not channels or len(set(channels)) != len(channels):
        raise ConfigError(f"channels {tuple(channels)!r}: expected a non-empty subset of {CHANNELS}")
    return tuple(CHANNELS.index(c) for c in channels)


def channel_stats(name: str, channels: tuple[str, ...]) -> dict:
    """``{"name", "mean", "std"}`` of data set ``name`` restricted to ``channels``."""
    if name not in DATASET_STATS:
        raise ConfigError(f"statistics {name!r}: expected one of {sorted(DATASET_STATS)}")
    index = channel_indices(channels)
    stats = DATASET_STATS[name]
    return {"name": name, "mean": [stats["mean"][i] for i in index], "std": [stats["std"][i] for i in index]}


def resize_db(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of a (C, H, W) dB tensor to (C, size, size).

    Returns the input unchanged when it already has that size.
    """
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=False)[0]


class PatchDataset(torch.utils.data.Dataset):
    """Base of every BigEarthNet-style reader: channel selection, resize, skipping of bad patches.

    Subclasses fill ``self.names`` (one entry per item) and implement ``read_patch(i)`` returning the
    full-size ``(2, H, W)`` float32 dB array in ``CHANNELS`` order and the float32 target; they raise
    ``DataError`` for a bad patch. With ``skip_bad`` a bad item is replaced by the next good one, counted
    in ``n_skipped`` and logged (each DataLoader worker counts its own skips).

    Args:
        input_size: side of the returned tensors.
        channels: subset and order of ``CHANNELS`` to return.
        stats_name: key of ``DATASET_STATS`` that normalises this data.
        label_set: 19 or 43 (length of the target).
        skip_bad: skip and count bad patches instead of raising.
    """

    def __init__(self, *, input_size: int, channels: tuple[str, ...], stats_name: str, label_set: int,
                 skip_bad: bool) -> None:
        if label_set not in (19, 43):
            raise ConfigError(f"label_set {label_set}: expected 19 or 43")
        self.input_size, self.skip_bad = input_size, skip_bad
        self.channels = tuple(channels)
        self._channel_index = list(channel_indices(self.channels))
        self.stats = channel_stats(stats_name, self.channels)
        self.num_classes = label_set
        self.class_names = BEN_19_CLASSES if label_set == 19 else BEN_43_CLASSES
        self.names: list[str] = []
        self.n_skipped = 0

    def __len__(self) -> int:
        return len(self.names)

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-size patch ``i``: (sar_db float32 (2, H, W) [VH, VV], target float32 (num_classes,))."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sar_db float32 (C, input_size, input_size), target float32 (num_classes,))."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        i %= len(self)
        for step in range(len(self)):
            j = (i + step) % len(self)
            try:
                sar_db, target = self.read_patch(j)
            except DataError as err:
                if not self.skip_bad:
                    raise
                self.n_skipped += 1
                logger.warning("skip_bad: skipped %s (%d skipped so far in this process): %s",
                               self.names[j], self.n_skipped, err)
                continue
            x = torch.from_numpy(np.ascontiguousarray(sar_db[self._channel_index]))
            return resize_db(x, self.input_size), torch.from_numpy(target)
        raise DataError(f"{type(self).__name__}: all {len(self)} patches are bad (see the log)")


def _normalise_split(name: str, split: str) -> str:
    """``validation`` -> ``val`` for v1-style sources, ``val`` -> ``validation`` for v2 sources."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {SPLITS}")
    if name in ("benv2", "benv2_lmdb"):
        return "validation" if split == "val" else split
    return "val" if split == "validation" else split


def build_dataset(name: str, *, data_path: str | None, split: str, input_size: int,
                  channels: tuple[str, ...] = CHANNELS, split_file: str | None = None,
                  skip_bad: bool = False, num_samples: int | None = None, seed: int = 0,
                  include_snow_cloud: bool = False, label_set: int = 19,
                  scene: str = "mosaic") -> torch.utils.data.Dataset:
    """Build any data set of the project by name.

    Args:
        name: one of ``DATASET_NAMES``.
        data_path: data-set root (not needed for ``synthetic``).
        split: ``train | val | validation | test``.
        input_size: side of the returned tensors (patches are resized bilinearly).
        channels: subset and order of ``CHANNELS``, e.g. ("VV",) for one-channel SimMIM.
        split_file: explicit split list (v1: S2 or S1 names, or two-column S2,S1 CSV) or metadata
            file (v2: parquet/CSV); default: found next to the data.
        skip_bad: skip (and count) bad patches instead of raising ``DataError``.
        num_samples: ``synthetic`` only: number of patches (default 512 train, 128 val/test).
        seed: ``synthetic`` only: base seed; each split uses a different one.
        include_snow_cloud: keep patches flagged with seasonal snow or cloud/shadow.
        label_set: 19 or 43 classes (43 only for v1-style sources).
        scene: ``synthetic`` only: ``mosaic`` or ``structured`` (``sarwmix.synthetic.generate_patch``).

    Returns:
        a ``torch.utils.data.Dataset`` with ``.stats`` and ``.num_classes``.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"dataset {name!r}: expected one of {DATASET_NAMES}")
    split = _normalise_split(name, split)
    if name == "synthetic":
        from sarwmix.synthetic import SyntheticS1

        n = num_samples or (512 if split == "train" else 128)
        split_seed = {"train": 0, "val": 1, "test": 2}[split]
        return SyntheticS1(n=n, input_size=input_size, seed=3 * seed + split_seed, channels=channels,
                           scene=scene)
    if not data_path:
        raise ConfigError(f"dataset {name!r} needs --data_path")
    if name == "sen12flood":
        from sarwmix.sen12flood_loader import Sen12FloodPairs

        if tuple(channels) != CHANNELS:  # the pair files hold both polarisations of both dates
            raise ConfigError(f"dataset 'sen12flood' has channels {CHANNELS}; got {tuple(channels)}")
        return Sen12FloodPairs(root=data_path, split=split)
    common = {"input_size": input_size, "channels": tuple(channels), "skip_bad": skip_bad,
              "label_set": label_set}
    if name in ("benv1", "benv1_zarr"):
        from sarwmix import bigearthnetv1

        cls = bigearthnetv1.BenV1Folder if name == "benv1" else bigearthnetv1.BenV1Zarr
        return cls(data_path, split, split_file=split_file, include_snow_cloud=include_snow_cloud, **common)
    if name in ("benv2", "benv2_lmdb"):
        from sarwmix import bigearthnetv2

        cls = bigearthnetv2.BenV2Folder if name == "benv2" else bigearthnetv2.BenV2Lmdb
        return cls(data_path, split, metadata_file=split_file, include_snow_cloud=include_snow_cloud,
                   **common)
    from sarwmix.packed import PackedDataset

    return PackedDataset(data_path, split, **common)
