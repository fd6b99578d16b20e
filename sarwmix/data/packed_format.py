"""Packed format: memory-mapped .npy shards of whole patches, for data loading at GPU-cluster speed.

Layout of a packed folder::

    packed.json          format version, dtype, patch shape, statistics name, label set, shard list
    index.parquet        one row per patch: name (S1), split (train / val / test)
    targets.npy          uint8 (N, label_set) multi-hot, row-aligned with the index
    shard_00000.npy ...  (n_i, 2, 120, 120) float32 (or float16) dB, [VH, VV]; patch g is row
                         g % shard_size of shard g // shard_size

Why this and not sharded zarr or LMDB: reading a patch is one slice of a memory-mapped array, with no
file open, no decompression and no deserialisation, so one core delivers thousands of patches/s and
the page cache does the rest; ``.npy`` needs nothing beyond numpy to read. Shards (4096 patches, 236 MB
in float32) keep single files of a manageable size for copying to node-local disks.

Written by ``PackedWriter`` (``python -m sarwmix.data.packed convert``), read by ``PackedDataset``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sarwmix.constants import BEN_19_FROM_43, CHANNELS
from sarwmix.data.patches import PatchDataset
from sarwmix.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FORMAT_NAME = "sarwmix-packed"
FORMAT_VERSION = 1
PACKED_SPLITS = ("train", "val", "test")
# 43 -> 19 class merge as a (43, 19) 0/1 matrix, so a whole split converts with one matmul.
_MERGE_43_TO_19 = np.zeros((43, 19), np.float32)
for _j, _sources in enumerate(BEN_19_FROM_43):
    _MERGE_43_TO_19[list(_sources), _j] = 1.0


def read_meta(root: Path) -> dict:
    """Read and check ``packed.json``."""
    path = root / "packed.json"
    if not path.is_file():
        raise DataError(f"{root}: no packed.json (not a packed folder, or its conversion did not finish)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from err
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, got "
                        f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def _read_index(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and cross-check ``index.parquet`` (name, split) and ``targets.npy`` (N, label_set)."""
    try:
        index = pd.read_parquet(root / "index.parquet", columns=["name", "split"])
        targets = np.load(root / "targets.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{root}: missing or unreadable index.parquet / targets.npy ({err}); "
                        "re-run the conversion") from err
    if targets.ndim != 2 or len(targets) != len(index):
        raise DataError(f"{root}: targets.npy has shape {targets.shape}; expected ({len(index)}, label_set), "
                        "one row per row of index.parquet")
    return index, targets


class PackedDataset(PatchDataset):
    """Reader of the packed format (see the module docstring).

    Args:
        data_path: the packed folder.
        split: ``train | val | test`` (``validation`` accepted).
        input_size, channels, label_set: see ``sarwmix.data.patches.PatchDataset``. ``label_set=19``
            works for every packed source; 43 only for v1 sources (stored with 43 classes).
    """

    def __init__(self, data_path: str | Path, split: str, *, input_size: int = 128,
                 channels: tuple[str, ...] = CHANNELS, label_set: int = 19) -> None:
        self.root = Path(data_path)
        self.meta = read_meta(self.root)
        super().__init__(input_size=input_size, channels=channels, stats_name=self.meta["stats"],
                         label_set=label_set)
        split = "val" if split == "validation" else split
        index, targets = _read_index(self.root)
        self.rows = np.flatnonzero(index["split"].to_numpy() == split)
        if len(self.rows) == 0:
            raise DataError(f"{self.root}: split {split!r} is empty (splits present: "
                            f"{sorted(index['split'].unique())})")
        self.names = index["name"].to_numpy()[self.rows].tolist()
        self.targets = self._targets(targets[self.rows])
        self._shards: tuple[int, dict[int, np.ndarray | str]] | None = None  # (pid, shard -> map or error)

    def _targets(self, stored: np.ndarray) -> np.ndarray:
        """Stored multi-hot (rows, stored label set) -> float32 (rows, label_set)."""
        stored = stored.astype(np.float32)
        if stored.shape[1] == self.num_classes:
            return stored
        if stored.shape[1] == 43 and self.num_classes == 19:
            return (stored @ _MERGE_43_TO_19 > 0).astype(np.float32)
        raise ConfigError(f"{self.root}: stores {stored.shape[1]}-class labels; label_set {self.num_classes} "
                          "cannot be derived from them")

    def _shard(self, k: int) -> np.ndarray:
        """Memory map of shard ``k``, opened on first use in each process.

        Shards open one by one, so a truncated or missing shard makes only its own patches bad (each read of
        one raises ``DataError`` naming the shard) while the other shards stay readable.
        """
        if self._shards is None or self._shards[0] != os.getpid():
            self._shards = (os.getpid(), {})
        opened = self._shards[1]
        if k not in opened:
            path = self.root / self.meta["shards"][k]
            try:
                opened[k] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                opened[k] = f"{path}: unreadable shard ({err})"
        if isinstance(opened[k], str):
            raise DataError(opened[k])
        return opened[k]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = None  # memory maps are reopened in each worker
        return state

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i``: (sar_db float32 (2, 120, 120) [VH, VV], target float32 (label_set,))."""
        g = int(self.rows[i])
        size = self.meta["shard_size"]
        sar_db = np.array(self._shard(g // size)[g % size], dtype=np.float32)
        if not np.isfinite(sar_db).all():
            raise DataError(f"{self.root / self.meta['shards'][g // size]}: patch {self.names[i]} (row "
                            f"{g % size}) has NaN/Inf pixels")
        return sar_db, self.targets[i]


class PackedWriter:
    """Append patches, then ``close()``: shards are written as they fill, ``packed.json`` last.

    Args:
        out: the packed folder to create (must not hold a finished packed folder already).
        dtype: ``float32`` (exact) or ``float16`` (half the size; ~0.01 dB rounding at -30 dB).
        shard_size: patches per shard.
    """

    def __init__(self, out: str | Path, dtype: str = "float32", shard_size: int = 4096) -> None:
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype {dtype!r}: expected float32 or float16")
        if shard_size < 1:
            raise ConfigError(f"--shard_size {shard_size}: expected a positive number")
        self.out, self.dtype, self.shard_size = Path(out), np.dtype(dtype), shard_size
        if (self.out / "packed.json").exists():
            raise ConfigError(f"{self.out}: already holds a packed data set; choose another output folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.splits: list[str] = []
        self.targets: list[np.ndarray] = []
        self.shards: list[str] = []
        self._buffer: list[np.ndarray] = []

    def add(self, name: str, split: str, sar_db: np.ndarray, target: np.ndarray) -> None:
        """Append one patch: sar_db float32 (2, 120, 120) [VH, VV], target multi-hot (label_set,)."""
        self.names.append(name)
        self.splits.append(split)
        self.targets.append(np.asarray(target, dtype=np.uint8))
        self._buffer.append(np.asarray(sar_db, dtype=self.dtype))
        if len(self._buffer) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            name = f"shard_{len(self.shards):05d}.npy"
            np.save(self.out / name, np.stack(self._buffer))
            self.shards.append(name)
            self._buffer = []

    def close(self, stats: str, source: str) -> Path:
        """Write the last shard, the index, the targets and finally ``packed.json``."""
        if not self.names:
            raise DataError(f"{self.out}: nothing to pack (every source split was empty or bad)")
        self._flush()
        pd.DataFrame({"name": self.names, "split": self.splits}).to_parquet(self.out / "index.parquet",
                                                                            index=False)
        np.save(self.out / "targets.npy", np.stack(self.targets))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": self.dtype.name,
                "patch_shape": list(self._shape()), "channels": list(CHANNELS), "stats": stats,
                "label_set": int(self.targets[0].shape[0]), "source": source, "n": len(self.names),
                "shard_size": self.shard_size, "shards": self.shards,
                "splits": {s: self.splits.count(s) for s in PACKED_SPLITS}}
        (self.out / "packed.json").write_text(json.dumps(meta, indent=1))
        return self.out

    def _shape(self) -> tuple[int, ...]:
        return np.load(self.out / self.shards[0], mmap_mode="r").shape[1:]
