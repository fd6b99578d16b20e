"""The base class of every BigEarthNet-style reader and the helpers it shares: channel selection, resize.

Every reader returns ``(sar_db, target)``: raw dB float32 ``(C, input_size, input_size)`` in the channel
order of ``CHANNELS`` (or the requested subset) and a float32 multi-hot target. Nothing here normalises or
flips: the training engine does both on the device, from ``dataset.stats`` and a per-step seed, so a
resumed run sees exactly the same augmentations.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, CHANNELS, DATASET_STATS
from sarwmix.errors import ConfigError


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
    ``DataError`` naming the file for a bad patch (``sarwmix.data.bad_patches`` stops, skips or drops it).

    Args:
        input_size: side of the returned tensors.
        channels: subset and order of ``CHANNELS`` to return.
        stats_name: key of ``DATASET_STATS`` that normalises this data.
        label_set: 19 or 43 (length of the target).
    """

    def __init__(self, *, input_size: int, channels: tuple[str, ...], stats_name: str, label_set: int) -> None:
        if label_set not in (19, 43):
            raise ConfigError(f"label_set {label_set}: expected 19 or 43")
        self.input_size = input_size
        self.channels = tuple(channels)
        self._channel_index = list(channel_indices(self.channels))
        self.stats = channel_stats(stats_name, self.channels)
        self.num_classes = label_set
        self.class_names = BEN_19_CLASSES if label_set == 19 else BEN_43_CLASSES
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def patch_name(self, i: int) -> str:
        """The name of patch ``i`` (its folder, key or row name)."""
        return self.names[i]

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-size patch ``i``: (sar_db float32 (2, H, W) [VH, VV], target float32 (num_classes,))."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sar_db float32 (C, input_size, input_size), target float32 (num_classes,))."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        sar_db, target = self.read_patch(i % len(self))
        x = torch.from_numpy(np.ascontiguousarray(sar_db[self._channel_index]))
        return resize_db(x, self.input_size), torch.from_numpy(target)
