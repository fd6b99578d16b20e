"""BigEarthNet v2 / reBEN Sentinel-1: metadata parquet (or its CSV export), folder layout, LMDB.

- ``metadata.parquet``: one row per patch, columns ``patch_id`` (S2 name), ``labels`` (array of 19-class
  names), ``split`` (``train | validation | test``), ``country``, ``s1_name``, ``s2v1_name``,
  ``contains_seasonal_snow``, ``contains_cloud_or_shadow``. The flagged patches are in
  ``metadata_for_patches_with_snow_cloud_or_shadow.parquet``, read only with ``include_snow_cloud``.
  A CSV export with the same columns (labels as Python-list or numpy-array strings) is accepted too.
- Folder layout: ``BigEarthNet-S1/<first 5 "_"-tokens of s1_name>/<s1_name>/<s1_name>_{VV,VH}.tif``.
- LMDB of the reference tooling (rico-hdl): key = S1 name (bytes), value = safetensors-serialised dict
  ``{"VH": float32 (120, 120), "VV": float32 (120, 120)}``. Values are decoded with
  ``safetensors.numpy.load``; a pickled value (the v1 LMDB variant) is refused: unpickling runs
  arbitrary code.

The index of the 480,038-row parquet is built with vectorised pandas operations (about a second).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.numpy import load, save

from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, BEN_43_TO_19, CHANNELS
from sarwmix.data.bigearthnetv1 import list_subdirs
from sarwmix.data.geotiff import PATCH_SIZE, read_band, validate_band
from sarwmix.data.patches import PatchDataset
from sarwmix.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

S1_FOLDER = "BigEarthNet-S1"
LMDB_FOLDER = "BigEarthNet_LMDB"
METADATA_FILE = "metadata.parquet"
SNOW_CLOUD_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
METADATA_COLUMNS = ("patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                    "contains_seasonal_snow", "contains_cloud_or_shadow")
V2_SPLITS = ("train", "validation", "test")
_LABEL_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")  # one quoted class name of a labels cell
_LMDB_ENVS: dict[tuple[int, str], object] = {}  # (pid, path) -> open lmdb.Environment
# Any 19-class name, or a 43-class name with a 19-class counterpart, -> 19-class index; -1: no counterpart.
_CODE_19 = {name: i for i, name in enumerate(BEN_19_CLASSES)} | {
    name: -1 if BEN_43_TO_19[i] is None else BEN_43_TO_19[i] for i, name in enumerate(BEN_43_CLASSES)}


def load_metadata(path: str | Path) -> pd.DataFrame:
    """Read ``metadata.parquet`` or its CSV export; labels become lists/arrays of names.

    Raises:
        DataError: missing or unreadable file, or a required column absent.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found (expected {METADATA_FILE} or its CSV export)")
    try:
        if path.suffix == ".csv":
            meta = pd.read_csv(path)
        else:
            meta = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable {path.suffix[1:] or 'parquet'} file ({err})") from err
    missing = [c for c in ("labels", "split", "s1_name") if c not in meta.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; expected {list(METADATA_COLUMNS)}")
    if path.suffix == ".csv":
        # Parse each distinct string once: there are far fewer label combinations than rows.
        unique = pd.unique(meta["labels"])
        parsed = {text: _parse_label_list(text, path) for text in unique}
        meta["labels"] = meta["labels"].map(parsed)
    return meta


def _parse_label_list(text: object, path: Path) -> list[str]:
    """``"['Pastures', 'Mixed forest']"`` or ``"['Pastures' 'Mixed forest']"`` -> list; never eval.

    The second form (no commas, possibly wrapped over lines) is the numpy array repr that
    ``pd.read_parquet(...).to_csv(...)`` writes for the parquet's list column; ``literal_eval`` would
    silently join its adjacent strings into one name.
    """
    body = text.strip() if isinstance(text, str) else ""
    if body[:1] == "[" and body[-1:] == "]" and not _LABEL_QUOTED.sub("", body[1:-1]).strip(" ,\n\r\t"):
        return [single or double for single, double in _LABEL_QUOTED.findall(body[1:-1])]
    raise DataError(f"{path}: labels cell {text!r} is not a Python list of class names")


def targets_from_labels(labels: pd.Series, where: str) -> np.ndarray:
    """19-class multi-hot matrix from a column of label lists, without a per-row Python loop.

    Args:
        labels: one list/array of class names per row.
        where: file named in the error message.

    Returns:
        float32 (len(labels), 19).

    Raises:
        DataError: a name outside the 19- and 43-class nomenclatures.
    """
    exploded = labels.reset_index(drop=True).explode()
    codes = exploded.map(_CODE_19)
    unknown = exploded.notna() & codes.isna()
    if unknown.any():
        name = exploded[unknown].iloc[0]
        raise DataError(f"{where}: unknown label {name!r} ({int(unknown.sum())} unknown entries); expected "
                        "19-class BigEarthNet names (sarwmix.constants.BEN_19_CLASSES)")
    keep = codes.notna() & (codes >= 0)
    targets = np.zeros((len(labels), len(BEN_19_CLASSES)), np.float32)
    targets[exploded.index[keep].to_numpy(), codes[keep].to_numpy(dtype=np.int64)] = 1.0
    return targets


def select_split(meta: pd.DataFrame, split: str, include_snow_cloud: bool) -> pd.DataFrame:
    """Rows of ``split`` (``val`` accepted for ``validation``), snow/cloud rows dropped unless asked."""
    split = "validation" if split == "val" else split
    if split not in V2_SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {V2_SPLITS} (or 'val')")
    keep = meta["split"].to_numpy() == split
    if not include_snow_cloud:
        for flag in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
            if flag in meta.columns:
                keep &= ~meta[flag].fillna(False).to_numpy(dtype=bool)
    return meta[keep].reset_index(drop=True)


def find_metadata(data_path: Path, metadata_file: str | None) -> Path:
    """``metadata_file`` if given, else ``metadata.parquet`` (or ``.csv``) in ``data_path`` or its parent."""
    if metadata_file:
        return Path(metadata_file)
    for folder in (data_path, data_path.parent):
        for name in (METADATA_FILE, "metadata.csv"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{data_path}: no {METADATA_FILE} found here or in the parent; pass --split_file")


class _BenV2Base(PatchDataset):
    """Shared index building: metadata -> split rows -> present rows -> names and targets."""

    def __init__(self, data_path: str | Path, split: str, *, metadata_file: str | None, input_size: int,
                 channels: tuple[str, ...], include_snow_cloud: bool, label_set: int) -> None:
        if label_set != 19:
            raise ConfigError(f"label_set {label_set}: BigEarthNet v2 has 19-class labels only")
        super().__init__(input_size=input_size, channels=channels, stats_name="benv2", label_set=19)
        self.data_path = Path(data_path)
        meta_path = find_metadata(self.data_path, metadata_file)
        meta = load_metadata(meta_path)
        extra = meta_path.parent / SNOW_CLOUD_FILE
        if include_snow_cloud and extra.is_file():
            meta = pd.concat([meta, load_metadata(extra)], ignore_index=True)
        rows = select_split(meta, split, include_snow_cloud)
        if rows.empty:
            raise DataError(f"{meta_path}: split {split!r} has no rows")
        present = self.present_names(rows["s1_name"])
        missing = int((~present).sum())
        if missing == len(rows):
            raise DataError(f"{meta_path}: none of the {len(rows)} {split} patches is in {self.data_path}")
        if missing:
            logger.warning("%s: %d of %d %s patches are not in %s; skipping them", meta_path, missing,
                           len(rows), split, self.data_path)
            rows = rows[present].reset_index(drop=True)
        self.names = rows["s1_name"].tolist()
        self.targets = targets_from_labels(rows["labels"], str(meta_path))

    def present_names(self, s1_names: pd.Series) -> np.ndarray:
        """Boolean mask of the names present in the store."""
        raise NotImplementedError


class BenV2Folder(_BenV2Base):
    """BigEarthNet v2 S1 patches in the official folder layout, indexed by ``metadata.parquet``.

    Args:
        data_path: folder holding ``BigEarthNet-S1/`` (or that folder itself); metadata beside it.
        split: ``train | validation | test`` (``val`` accepted).
        metadata_file: explicit metadata parquet/CSV.
        include_snow_cloud: also read the snow/cloud metadata file and keep flagged patches.
        input_size, channels, label_set: see ``sarwmix.data.patches.PatchDataset``.
    """

    def __init__(self, data_path: str | Path, split: str, *, metadata_file: str | None = None,
                 input_size: int = 128, channels: tuple[str, ...] = CHANNELS,
                 include_snow_cloud: bool = False, label_set: int = 19) -> None:
        path = Path(data_path)
        self.root = path / S1_FOLDER if (path / S1_FOLDER).is_dir() else path
        if not self.root.is_dir():
            raise DataError(f"{self.root}: BigEarthNet-S1 folder not found")
        super().__init__(path, split, metadata_file=metadata_file, input_size=input_size,
                         channels=channels, include_snow_cloud=include_snow_cloud, label_set=label_set)

    @staticmethod
    def product_folder(s1_name: str) -> str:
        """``S1A_IW_GRDH_1SDV_20170613T165043_33UUP_70_48`` -> ``S1A_IW_GRDH_1SDV_20170613T165043``."""
        return "_".join(s1_name.split("_")[:5])

    def present_names(self, s1_names: pd.Series) -> np.ndarray:
        """One directory scan per product folder, not one stat per patch."""
        products = s1_names.map(self.product_folder)
        on_disk: set[str] = set()
        for product in pd.unique(products):
            if (self.root / product).is_dir():
                on_disk.update(list_subdirs(self.root / product))
        return s1_names.isin(on_disk).to_numpy()

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i``: (sar_db float32 (2, 120, 120) [VH, VV], target float32 (19,))."""
        name = self.names[i]
        folder = self.root / self.product_folder(name) / name
        return np.stack([read_band(folder / f"{name}_{band}.tif") for band in CHANNELS]), self.targets[i]


def decode_lmdb_value(value: bytes, where: str) -> np.ndarray:
    """Decode one LMDB value (safetensors dict of bands) into float32 (2, 120, 120) [VH, VV].

    Raises:
        DataError: a pickled value (refused), a malformed value, or missing / malformed bands.
    """
    try:
        bands = load(bytes(value))
    except SafetensorError as err:
        # Checked only after safetensors failed: a valid safetensors header length can start with 0x80 too.
        if value[:1] == b"\x80":
            raise DataError(f"{where}: the value is a Python pickle (the BigEarthNet v1 LMDB variant); "
                            "refusing to unpickle it because unpickling can run arbitrary code. Expected a "
                            "safetensors dict of bands (rico-hdl format); rebuild the LMDB or use the GeoTIFF "
                            "folders.") from err
        raise DataError(f"{where}: not a safetensors value ({err})") from err
    missing = [band for band in CHANNELS if band not in bands]
    if missing:
        raise DataError(f"{where}: bands {missing} missing; found {sorted(bands)}, expected VH and VV")
    return np.stack([validate_band(bands[band], f"{where}/{band}", (PATCH_SIZE, PATCH_SIZE))
                     for band in CHANNELS])


def find_lmdb(data_path: Path) -> Path:
    """The LMDB folder (one holding ``data.mdb``): ``data_path`` itself, else its one subfolder that is one."""
    if (data_path / "data.mdb").is_file():
        return data_path
    subfolders = list_subdirs(data_path) if data_path.is_dir() else []
    found = [data_path / name for name in subfolders if (data_path / name / "data.mdb").is_file()]
    if len(found) > 1:
        raise DataError(f"{data_path}: {len(found)} LMDB folders ({', '.join(d.name for d in found)}); "
                        "pass the one to read as --data_path")
    if not found:
        raise DataError(f"{data_path}: no LMDB here or in a subfolder (a folder holding data.mdb)")
    return found[0]


def close_lmdb_environments() -> None:
    """Close every LMDB environment this process opened. For a long-lived process (a notebook, a test session)
    that deletes the folders it read: py-lmdb refuses a new environment whose files reuse the inode of one still
    open in the process, and the lock file of a deleted folder is not held open, so its inode is free for reuse."""
    while _LMDB_ENVS:
        _LMDB_ENVS.popitem()[1].close()


class BenV2Lmdb(_BenV2Base):
    """BigEarthNet v2 S1 patches from the rico-hdl LMDB (safetensors values keyed by S1 name).

    Args: as ``BenV2Folder``, with ``data_path`` the folder holding the metadata and one LMDB folder of any
    name (``BigEarthNet_LMDB/``, ``Encoded-BigEarthNet/``, ...), or the LMDB folder itself; the metadata is
    looked up beside it.
    """

    def __init__(self, data_path: str | Path, split: str, *, metadata_file: str | None = None,
                 input_size: int = 128, channels: tuple[str, ...] = CHANNELS,
                 include_snow_cloud: bool = False, label_set: int = 19) -> None:
        path = Path(data_path)
        self.lmdb_path = find_lmdb(path)
        super().__init__(path, split, metadata_file=metadata_file, input_size=input_size, channels=channels,
                         include_snow_cloud=include_snow_cloud, label_set=label_set)

    def _open(self):
        """The LMDB environment of this process (LMDB allows one per path per process, and its handles
        must not cross a fork, hence the cache keyed by pid and path)."""
        import lmdb

        key = (os.getpid(), str(self.lmdb_path.resolve()))
        if key not in _LMDB_ENVS:
            # A forked DataLoader worker inherits the parent's environment: unusable here, and py-lmdb
            # refuses to open the same files again while it is open. Closing it affects this process only.
            # An environment whose folder was deleted goes too: py-lmdb remembers the (device, inode) of its
            # lock file, which it does not hold open (lock=False), so a new file may reuse that inode and
            # an unrelated environment would be refused as "already open in this process".
            for stale in [k for k in _LMDB_ENVS if k[1] == key[1] or not os.path.isdir(k[1])]:
                _LMDB_ENVS.pop(stale).close()
            try:
                _LMDB_ENVS[key] = lmdb.open(key[1], readonly=True, lock=False, readahead=False,
                                            meminit=False, max_readers=512)
            except lmdb.Error as err:
                raise DataError(f"{self.lmdb_path}: not a readable LMDB ({err})") from err
        return _LMDB_ENVS[key]

    def present_names(self, s1_names: pd.Series) -> np.ndarray:
        """One pass over the keys (no values read)."""
        with self._open().begin() as txn:
            keys = {key.decode("utf-8", "replace") for key in txn.cursor().iternext(keys=True, values=False)}
        return s1_names.isin(keys).to_numpy()

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i``: (sar_db float32 (2, 120, 120) [VH, VV], target float32 (19,))."""
        name = self.names[i]
        with self._open().begin(buffers=True) as txn:
            value = txn.get(name.encode())
            if value is None:
                raise DataError(f"{self.lmdb_path}: key {name!r} not found")
            sar_db = decode_lmdb_value(bytes(value), f"{self.lmdb_path}[{name}]")
        return sar_db, self.targets[i]


def encode_lmdb_value(sar_db: np.ndarray) -> bytes:
    """float32 (2, 120, 120) [VH, VV] -> the safetensors value of the rico-hdl LMDB."""
    return save({band: np.ascontiguousarray(sar_db[c], dtype=np.float32) for c, band in enumerate(CHANNELS)})
