"""One entry point for every data set (``build_dataset``).

Every data set returns ``(sar_db, target)``: raw dB float32 ``(C, input_size, input_size)`` in the channel
order of ``CHANNELS`` (or the requested subset) and a float32 multi-hot target. Nothing here normalises or
flips: the training engine does both on the device, from ``dataset.stats`` and a per-step seed, so a
resumed run sees exactly the same augmentations.

The readers share the base class ``sarwmix.data.patches.PatchDataset``.
"""
from __future__ import annotations

import torch

from sarwmix.constants import CHANNELS
from sarwmix.data import bigearthnetv1, bigearthnetv2
from sarwmix.data.packed_format import PackedDataset
from sarwmix.data.sen12flood_loader import Sen12FloodPairs
from sarwmix.data.synthetic import SyntheticS1
from sarwmix.errors import ConfigError

DATASET_NAMES: tuple[str, ...] = (
    "synthetic", "benv1", "benv1_zarr", "benv2", "benv2_lmdb", "packed", "sen12flood",
)
SPLITS: tuple[str, ...] = ("train", "val", "validation", "test")


def _normalise_split(name: str, split: str) -> str:
    """``validation`` -> ``val`` for v1-style sources, ``val`` -> ``validation`` for v2 sources."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {SPLITS}")
    if name in ("benv2", "benv2_lmdb"):
        return "validation" if split == "val" else split
    return "val" if split == "validation" else split


def build_dataset(name: str, *, data_path: str | None, split: str, input_size: int,
                  channels: tuple[str, ...] = CHANNELS, split_file: str | None = None,
                  num_samples: int | None = None, seed: int = 0,
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
        num_samples: ``synthetic`` only: number of patches (default 512 train, 128 val/test).
        seed: ``synthetic`` only: base seed; each split uses a different one.
        include_snow_cloud: keep patches flagged with seasonal snow or cloud/shadow.
        label_set: 19 or 43 classes (43 only for v1-style sources).
        scene: ``synthetic`` only: ``mosaic`` or ``structured`` (``sarwmix.data.synthetic.generate_patch``).

    Returns:
        a ``torch.utils.data.Dataset`` with ``.stats`` and ``.num_classes``.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"dataset {name!r}: expected one of {DATASET_NAMES}")
    split = _normalise_split(name, split)
    if name == "synthetic":
        n = num_samples or (512 if split == "train" else 128)
        split_seed = {"train": 0, "val": 1, "test": 2}[split]
        return SyntheticS1(n=n, input_size=input_size, seed=3 * seed + split_seed, channels=channels,
                           scene=scene)
    if not data_path:
        raise ConfigError(f"dataset {name!r} needs --data_path")
    if name == "sen12flood":
        if tuple(channels) != CHANNELS:  # the pair files hold both polarisations of both dates
            raise ConfigError(f"dataset 'sen12flood' has channels {CHANNELS}; got {tuple(channels)}")
        return Sen12FloodPairs(root=data_path, split=split)
    common = {"input_size": input_size, "channels": tuple(channels), "label_set": label_set}
    if name in ("benv1", "benv1_zarr"):
        cls = bigearthnetv1.BenV1Folder if name == "benv1" else bigearthnetv1.BenV1Zarr
        return cls(data_path, split, split_file=split_file, include_snow_cloud=include_snow_cloud, **common)
    if name in ("benv2", "benv2_lmdb"):
        cls = bigearthnetv2.BenV2Folder if name == "benv2" else bigearthnetv2.BenV2Lmdb
        return cls(data_path, split, metadata_file=split_file, include_snow_cloud=include_snow_cloud,
                   **common)
    return PackedDataset(data_path, split, **common)
