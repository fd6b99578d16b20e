"""SEN12-FLOOD pair data set: ``OUT/<split>/<seq>__<file1>__<file2>__<label>.npy`` -> (dB pair, label).

Pair files are float32 ``(2 dates, 2 channels [VH, VV], 512, 512)`` in **linear** power, written by
``sen12_data_prep`` and cleaned by ``sen12_prune_partial_pairs``. The loader converts to dB with
``10 * log10(max(lin, LINEAR_FLOOR))``: the no-data zeros become -60 dB instead of ``-inf``. It does not
normalise: the finetuning engine resizes, flips and normalises on the device with ``dataset.stats`` (the
BENv1 statistics).

SEN12-FLOOD has only a train and a test split. ``split="val"`` reads ``OUT/val`` when it exists (make one
by moving some training sequences there) and otherwise falls back to ``OUT/test`` with a logged warning:
that reproduces the released finetuning, which selected on the test pairs, so say so when reporting.
Class counts per split: ``sarwmix.prep.sen12_data_prep.count_labels`` (no torch needed).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sarwmix.constants import DATASET_STATS
from sarwmix.data.sen12flood_pairs import PAIR_SHAPE, parse_pair_label
from sarwmix.errors import ConfigError, DataError
from sarwmix.sar.units import linear_to_db

logger = logging.getLogger(__name__)


_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def load_pair(path: Path) -> np.ndarray:
    """The array of one ``.npy`` pair file; DataError naming the file if it cannot be read as one array.

    An empty file (an interrupted write) raises EOFError in ``np.load`` and an ``.npz`` archive loads as
    an ``NpzFile``: both are reported like any other unreadable file.
    """
    try:
        power = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy pair file: {exc}") from exc
    if not isinstance(power, np.ndarray):
        power.close()
        raise DataError(f"{path} is not a readable .npy pair file: it holds an archive, not one array")
    return power


def split_folder(root: Path, split: str) -> Path:
    """The folder of ``split`` under ``root``; ``val`` falls back to ``test`` (with a warning) if absent."""
    if split not in _SPLIT_NAMES:
        raise ConfigError(f"SEN12-FLOOD split must be one of {sorted(_SPLIT_NAMES)}, got {split!r}")
    name = _SPLIT_NAMES[split]
    if name == "val" and not (Path(root) / "val").is_dir():
        logger.warning("SEN12-FLOOD has no validation split (%s/val is absent): 'val' reads the test pairs",
                       root)
        name = "test"
    return Path(root) / name


class Sen12FloodPairs(Dataset):
    """SEN12-FLOOD image pairs for flood change classification.

    Args:
        root: folder holding ``train/`` and ``test/`` (and optionally ``val/``) pair files.
        split: ``train``, ``val`` (or ``validation``) or ``test``.
        transform: optional function applied to the dB tensor ``(2, 2, 512, 512)`` (e.g. flips).

    Items are ``(pair_db, label)``: float32 ``(2 dates, 2 channels [VH, VV], 512, 512)`` in dB, not
    normalised, and an int64 scalar (1 = the second image shows a flood).

    Attributes:
        stats: ``{"name", "mean", "std"}`` in dB, order (VH, VV), for normalisation on the device.
        num_classes: 2.
        labels: the label of every item (for class counts and weighted sampling).
        files: the pair files, sorted.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        folder = split_folder(Path(root), split)
        if not folder.is_dir():
            raise DataError(f"SEN12-FLOOD split folder not found: {folder} (run scripts/prepare_sen12flood.sh)")
        self.files = sorted(folder.glob("*.npy"))
        if not self.files:
            raise DataError(f"SEN12-FLOOD split folder {folder} holds no .npy pair files")
        self.labels = [parse_pair_label(p) for p in self.files]
        self.transform = transform
        self.split = split
        self.num_classes = 2
        self.stats = {"name": "sen12flood", "mean": list(DATASET_STATS["sen12flood"]["mean"]),
                      "std": list(DATASET_STATS["sen12flood"]["std"])}

    def __len__(self) -> int:
        return len(self.files)

    def patch_name(self, index: int) -> str:
        """The pair file of item ``index`` (``<seq>__<file1>__<file2>__<label>.npy``)."""
        return self.files[index].name

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        power = load_pair(path)
        if power.shape != PAIR_SHAPE:
            raise DataError(f"{path} has shape {power.shape}; expected {PAIR_SHAPE} (dates, [VH, VV], H, W)")
        if power.dtype.kind != "f":
            raise DataError(f"{path} has dtype {power.dtype}; expected float32 linear power")
        if not np.isfinite(power).all():
            raise DataError(f"{path} holds non-finite values (NaN/Inf); expected finite linear power")
        pair_db = torch.from_numpy(linear_to_db(power))
        if self.transform is not None:
            pair_db = self.transform(pair_db)
        return pair_db, torch.tensor(self.labels[index], dtype=torch.int64)
