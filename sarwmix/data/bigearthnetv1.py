"""BigEarthNet-S1 v1.0: folder layout, official split and exclusion lists, Zarr container.

Folder layout: ``BigEarthNet-S1-v1.0/<s1 name>/<s1 name>_{VV,VH}.tif`` (one-band float32 dB GeoTIFFs)
plus ``<s1 name>_labels_metadata.json``. The official split lists name **S2** patches (CRLF line
endings); the multimodal CSVs have two columns ``S2 name,S1 name``. S2 names are mapped to S1 names
through the two-column CSV when given, otherwise through ``corresponding_s2_patch`` of every labels JSON
(one pass over the data set; pass the two-column CSV or convert to ``packed`` to avoid it).

Split lists, in order of precedence: ``split_file``; ``<split>.csv`` in ``splits/`` beside or inside the
patch folder; the official lists shipped in the repository's ``datasets/`` (``<split>.csv.gz``, two
columns ``S2 name,S1 name``, derived by ``scripts/derive_datasets.py``). The shipped lists are skipped
when none of their patches is on disk (not BigEarthNet-S1 v1.0 names, e.g. synthetic data): then
``train`` means every patch on disk and val/test need a list. Exclusion lists
(``patches_with_seasonal_snow.csv``, ``patches_with_cloud_and_shadow.csv``, and for 19 classes
``patches_without_19_class_labels.csv``) are looked up beside the data, then in ``datasets/``.

Zarr container of the released code: ``sentinel1/<s1 name>/{VH,VV}`` 2-D arrays and the 43 label names
in the group attribute ``labels``. Converter (resumable, zarr format 2 or 3)::

    python -m sarwmix.data.bigearthnetv1 to-zarr SRC OUT [--zarr_format 3]
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sarwmix.cli import ArgumentParser
from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, BEN_43_TO_19, CHANNELS
from sarwmix.data.geotiff import PATCH_SIZE, read_band, validate_band
from sarwmix.data.patches import PatchDataset
from sarwmix.errors import ConfigError, DataError, SarwmixError

logger = logging.getLogger(__name__)

V1_FOLDER = "BigEarthNet-S1-v1.0"
LABELS_JSON_SUFFIX = "_labels_metadata.json"
LABELS_JSON_KEYS = ("labels", "coordinates", "projection", "corresponding_s2_patch", "scene_source",
                    "acquisition_time")
SNOW_LIST = "patches_with_seasonal_snow.csv"
CLOUD_LIST = "patches_with_cloud_and_shadow.csv"
NO_LABEL_LIST = "patches_without_19_class_labels.csv"
# The official split and exclusion lists, gzip-compressed, shipped with the repository.
SHIPPED_LISTS = Path(__file__).resolve().parents[2] / "datasets"
_INDEX_43 = {name: i for i, name in enumerate(BEN_43_CLASSES)}
_INDEX_19 = {name: i for i, name in enumerate(BEN_19_CLASSES)}


def target_from_names(names: Iterable[str], label_set: int, where: str) -> np.ndarray:
    """Multi-hot target from BigEarthNet label names.

    Args:
        names: 43-class CORINE names (v1), or 19-class names (v2, only with ``label_set=19``).
        label_set: 19 (43-class names are merged by ``BEN_43_TO_19``) or 43.
        where: file or key named in the error message.

    Returns:
        float32 (label_set,); a 43-class name without a 19-class counterpart sets nothing.
    """
    target = np.zeros(label_set, np.float32)
    for name in names:
        if name in _INDEX_43:
            index = _INDEX_43[name] if label_set == 43 else BEN_43_TO_19[_INDEX_43[name]]
            if index is not None:
                target[index] = 1.0
        elif label_set == 19 and name in _INDEX_19:
            target[_INDEX_19[name]] = 1.0
        else:
            kind = "43-class" if label_set == 43 else "43- or 19-class"
            raise DataError(f"{where}: unknown label {name!r}; expected a name of the {kind} BigEarthNet "
                            "nomenclature (sarwmix.constants)")
    return target


def read_name_list(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Read a split or exclusion list: one patch name per line, or two columns ``S2 name,S1 name``.

    Handles CRLF endings, blank lines, a header row (a row whose cells are not patch names) and gzip
    compression (a name ending in ``.gz``).

    Returns:
        (first column, second column or None). For two columns the S1 column comes second even when
        the file has them the other way round.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the name list ({err})") from err
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]
    if rows and not all("_" in cell for cell in rows[0]):
        rows = rows[1:]
    if not rows:
        return [], None
    width = len(rows[0])
    if width not in (1, 2) or any(len(row) != width for row in rows):
        raise DataError(f"{path}: expected one name per line or two columns 'S2 name,S1 name'")
    first = [row[0] for row in rows]
    if width == 1:
        return first, None
    second = [row[1] for row in rows]
    return (second, first) if first[0].startswith("S1") else (first, second)


def read_labels_json(path: str | Path) -> dict:
    """Read and check a ``<patch>_labels_metadata.json``; it must hold a list under ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels JSON not found (expected beside the VV/VH GeoTIFFs)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise DataError(f"{path}: expected a JSON object with a list under 'labels'")
    return meta


def find_patch_root(data_path: str | Path) -> Path:
    """The folder holding the patch folders: ``data_path`` or its ``BigEarthNet-S1-v1.0`` child."""
    root = Path(data_path)
    if (root / V1_FOLDER).is_dir():
        root = root / V1_FOLDER
    if not root.is_dir():
        raise DataError(f"{root}: BigEarthNet-S1 v1.0 folder not found")
    return root


def list_subdirs(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (one directory scan, no per-patch stat)."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def find_list(root: Path, filename: str) -> Path | None:
    """``filename`` in ``root/../splits``, ``root/splits``, ``root/..`` or ``root``, whichever exists first."""
    for folder in (root.parent / "splits", root / "splits", root.parent, root):
        if (folder / filename).is_file():
            return folder / filename
    return None


def shipped_list(filename: str) -> Path | None:
    """``datasets/<filename>.gz`` of the repository, if present (absent from a non-editable install)."""
    path = SHIPPED_LISTS / f"{filename}.gz"
    return path if path.is_file() else None


def locate_list(root: Path, filename: str, explicit: str | None = None) -> tuple[Path | None, str]:
    """The list to use and where it came from: ``explicit`` > beside the data > shipped in ``datasets/``."""
    if explicit:
        return Path(explicit), "--split_file"
    beside = find_list(root, filename)
    if beside is not None:
        return beside, "beside the data"
    shipped = shipped_list(filename)
    return (shipped, "shipped official list") if shipped is not None else (None, "none")


def _names_to_s1(names: list[str], s1_column: list[str] | None,
                 s2_to_s1: Callable[[], dict[str, str]]) -> list[str]:
    """S1 names of a list: the S1 column, the names themselves if S1, else mapped from S2."""
    if s1_column is not None:
        return s1_column
    if not names or names[0].startswith("S1"):
        return names
    mapping = s2_to_s1()
    return [mapping.get(name, name) for name in names]


def _present(names: list[str], available: Sequence[str], list_path: Path, root: Path) -> list[str]:
    """The listed names present in ``available``; missing ones are counted in a warning, all missing fails."""
    if not names:
        raise DataError(f"{list_path}: split list is empty")
    present = set(available)
    missing = sum(name not in present for name in names)
    if missing == len(names):
        raise DataError(f"{list_path}: none of its {len(names)} patches is in {root} (S2 names are matched "
                        "through corresponding_s2_patch; a two-column 'S2,S1' list needs no matching)")
    if missing:
        logger.warning("%s: %d of %d listed patches are not in %s; skipping them",
                       list_path, missing, len(names), root)
    return [name for name in names if name in present]


def _listed_names(available: Sequence[str], root: Path, split: str, split_file: str | None,
                  mapping: Callable[[], dict[str, str]]) -> list[str] | None:
    """S1 names of the split list that applies and are present; None when no list applies."""
    list_path, source = locate_list(root, f"{split}.csv", split_file)
    if list_path is None:
        return None
    names = _names_to_s1(*read_name_list(list_path), mapping)
    if source == "shipped official list" and set(names).isdisjoint(available):
        logger.info("%s: none of its %d patches is in %s (not BigEarthNet-S1 v1.0 patch names); not using it",
                    list_path, len(names), root)
        return None
    logger.info("BigEarthNet-S1 v1 %s split: %s (%s)", split, list_path, source)
    return _present(names, available, list_path, root)


def resolve_split(available: Sequence[str], root: Path, split: str, split_file: str | None,
                  exclusions: Sequence[str], s2_to_s1: Callable[[], dict[str, str]]) -> list[str]:
    """S1 names of a split that are present, after exclusions; missing ones are counted and logged.

    Args:
        available: S1 names present in the store.
        root: patch folder (or container) next to which lists are searched.
        split: ``train | val | test``.
        split_file: explicit list; None searches ``<split>.csv`` beside the data, then the shipped lists.
        exclusions: file names of exclusion lists to apply when found (beside the data, else shipped).
        s2_to_s1: builds the S2 -> S1 mapping (called at most once, only when a list has S2 names).

    Raises:
        DataError: empty split, or none of its patches on disk. ConfigError: no list for val/test.
    """
    mapping_cache: dict[str, str] = {}

    def mapping() -> dict[str, str]:
        if not mapping_cache:
            mapping_cache.update(s2_to_s1())
        return mapping_cache

    names = _listed_names(available, root, split, split_file, mapping)
    if names is None and split != "train":
        raise ConfigError(f"no split list {split}.csv found next to {root}, and no shipped official list "
                          "names its patches; pass --split_file")
    if names is None:
        logger.info("no train.csv found next to %s: using all %d patches on disk", root, len(available))
        names = list(available)
    excluded: set[str] = set()
    for filename in exclusions:
        path, _ = locate_list(root, filename)
        if path is not None:
            excluded.update(_names_to_s1(*read_name_list(path), mapping))
    kept = [name for name in names if name not in excluded]
    if not kept:
        raise DataError(f"split {split!r} of {root} is empty after exclusions")
    return kept


def exclusion_lists(include_snow_cloud: bool, label_set: int) -> tuple[str, ...]:
    """Names of the exclusion lists that apply."""
    lists = () if include_snow_cloud else (SNOW_LIST, CLOUD_LIST)
    return lists + ((NO_LABEL_LIST,) if label_set == 19 else ())


class BenV1Folder(PatchDataset):
    """BigEarthNet-S1 v1.0 in its folder layout (GeoTIFF pair + labels JSON per patch).

    Args:
        data_path: ``BigEarthNet-S1-v1.0`` or the folder holding it.
        split: ``train | val | test``.
        split_file: explicit split list (S2 names, S1 names, or two-column S2,S1 CSV).
        include_snow_cloud: keep patches of the seasonal-snow and cloud/shadow lists.
        input_size, channels, label_set: see ``sarwmix.data.patches.PatchDataset``.
    """

    def __init__(self, data_path: str | Path, split: str, *, input_size: int = 128,
                 channels: tuple[str, ...] = CHANNELS, split_file: str | None = None,
                 include_snow_cloud: bool = False, label_set: int = 19) -> None:
        super().__init__(input_size=input_size, channels=channels, stats_name="benv1", label_set=label_set)
        self.root = find_patch_root(data_path)
        available = list_subdirs(self.root)
        self.names = resolve_split(available, self.root, split, split_file,
                                   exclusion_lists(include_snow_cloud, label_set),
                                   lambda: s2_to_s1_from_json(self.root, available))

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i``: (sar_db float32 (2, 120, 120) [VH, VV], target float32 (label_set,))."""
        folder = self.root / self.names[i]
        sar_db = np.stack([read_band(folder / f"{self.names[i]}_{band}.tif") for band in CHANNELS])
        json_path = folder / f"{self.names[i]}{LABELS_JSON_SUFFIX}"
        return sar_db, target_from_names(read_labels_json(json_path)["labels"], self.num_classes,
                                         str(json_path))


def s2_to_s1_from_json(root: Path, s1_names: Sequence[str]) -> dict[str, str]:
    """S2 -> S1 name mapping from ``corresponding_s2_patch`` of each labels JSON (one pass, with progress)."""
    mapping = {}
    for name in tqdm(s1_names, desc="S2->S1 names from labels JSON", disable=len(s1_names) < 5000):
        path = root / name / f"{name}{LABELS_JSON_SUFFIX}"
        try:
            mapping[read_labels_json(path).get("corresponding_s2_patch", "")] = name
        except DataError as err:
            logger.warning("S2 name of %s unknown: %s", name, err)
    return mapping


def _zarr_patch_names(group, path: Path) -> list[str]:
    """Patch groups under ``sentinel1``; a directory scan on local stores (listing via zarr reads every
    group's metadata, minutes for 590k patches)."""
    if (path / "sentinel1").is_dir():
        return list_subdirs(path / "sentinel1")
    return sorted(group["sentinel1"].group_keys())


class BenV1Zarr(PatchDataset):
    """The BigEarthNet v1 Zarr container (zarr format 2 or 3): ``sentinel1/<s1 name>/{VH,VV}`` + ``labels``.

    Args: as ``BenV1Folder``, with ``data_path`` the ``.zarr`` store. Split lists are searched beside it.
    """

    def __init__(self, data_path: str | Path, split: str, *, input_size: int = 128,
                 channels: tuple[str, ...] = CHANNELS, split_file: str | None = None,
                 include_snow_cloud: bool = False, label_set: int = 19) -> None:
        super().__init__(input_size=input_size, channels=channels, stats_name="benv1", label_set=label_set)
        self.path = Path(data_path)
        if (self.path / f"{V1_FOLDER}.zarr").is_dir():
            self.path = self.path / f"{V1_FOLDER}.zarr"
        self._opened: tuple[int, object] | None = None
        available = _zarr_patch_names(self._group(), self.path)
        self.names = resolve_split(available, self.path, split, split_file,
                                   exclusion_lists(include_snow_cloud, label_set),
                                   lambda: self._s2_to_s1(available))

    def _group(self):
        """The ``sentinel1``-holding root group, opened once per process (safe under fork)."""
        import zarr

        if self._opened is None or self._opened[0] != os.getpid():
            try:
                self._opened = (os.getpid(), zarr.open_group(str(self.path), mode="r"))
            except (FileNotFoundError, ValueError, OSError) as err:
                raise DataError(f"{self.path}: not a readable zarr store ({err})") from err
            if "sentinel1" not in self._opened[1]:
                raise DataError(f"{self.path}: zarr store has no 'sentinel1' group")
        return self._opened[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_opened"] = None  # reopened in the worker
        return state

    def _s2_to_s1(self, s1_names: Sequence[str]) -> dict[str, str]:
        """S2 -> S1 mapping from the ``corresponding_s2_patch`` attribute our converter stores."""
        patches = self._group()["sentinel1"]
        return {patches[name].attrs.get("corresponding_s2_patch", ""): name for name in s1_names}

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``i``: (sar_db float32 (2, 120, 120) [VH, VV], target float32 (label_set,))."""
        where = f"{self.path}/sentinel1/{self.names[i]}"
        try:
            group = self._group()["sentinel1"][self.names[i]]
            bands = [validate_band(np.asarray(group[band][:]), f"{where}/{band}", (PATCH_SIZE, PATCH_SIZE))
                     for band in CHANNELS]
            labels = group.attrs["labels"]
        except KeyError as err:
            raise DataError(f"{where}: missing {err} (expected arrays VH, VV and attribute 'labels')") from err
        return np.stack(bands), target_from_names(labels, self.num_classes, where)


def _zarr_complete(patches, name: str) -> bool:
    """A converted patch is complete when both arrays exist and ``labels`` (written last) is set."""
    try:
        group = patches[name]
        return "labels" in group.attrs and all(group[band].shape == (PATCH_SIZE, PATCH_SIZE)
                                               for band in CHANNELS)
    except KeyError:
        return False


def write_zarr_patch(patches, name: str, sar_db: np.ndarray, meta: dict) -> None:
    """Write one patch group ``<name>/{VH,VV}`` (chunk = whole band) with ``labels`` written last.

    Args:
        patches: the open ``sentinel1`` group.
        name: S1 patch name.
        sar_db: float32 (2, 120, 120) [VH, VV] dB.
        meta: the labels JSON content (``labels`` and, if present, ``corresponding_s2_patch``).
    """
    group = patches.require_group(name)
    for band, pixels in zip(CHANNELS, sar_db, strict=True):
        array = group.create_array(band, shape=pixels.shape, dtype="float32", chunks=pixels.shape,
                                   overwrite=True)
        array[:] = pixels
    if meta.get("corresponding_s2_patch"):
        group.attrs["corresponding_s2_patch"] = meta["corresponding_s2_patch"]
    group.attrs["labels"] = list(meta["labels"])


def split_list(split_file: str, split: str) -> str:
    """The list of ``split`` for a finetuning run: v1 needs one list per split, so its ``--split_file`` names the
    folder of train/val/test.csv, or of their ``.csv.gz`` (the layout of the shipped ``datasets/``)."""
    folder = Path(split_file)
    if not folder.is_dir():
        raise ConfigError(f"--split_file {folder}: for BigEarthNet v1 finetuning give the folder holding "
                          f"train.csv, val.csv and test.csv (one list cannot define three splits)")
    compressed = folder / f"{split}.csv.gz"
    return str(compressed if compressed.is_file() and not (folder / f"{split}.csv").is_file()
               else folder / f"{split}.csv")


def to_zarr(src: str | Path, out: str | Path, zarr_format: int = 3, skip_bad: bool = False) -> dict[str, int]:
    """Convert the v1 folder layout into the Zarr container; patches already complete in ``out`` are kept.

    Args:
        src: ``BigEarthNet-S1-v1.0`` or its parent.
        out: the ``.zarr`` store to create or complete.
        zarr_format: 2 or 3 (format of a new store; an existing store keeps its own).
        skip_bad: skip (and count) bad patches instead of stopping at the first.

    Returns:
        counts ``{"written", "kept", "skipped"}``.
    """
    import zarr

    if zarr_format not in (2, 3):
        raise ConfigError(f"--zarr_format {zarr_format}: expected 2 or 3")
    root = find_patch_root(src)
    store = zarr.open_group(str(out), mode="a", zarr_format=zarr_format)
    patches = store.require_group("sentinel1")
    counts = {"written": 0, "kept": 0, "skipped": 0}
    for name in tqdm(list_subdirs(root), desc=f"to zarr v{zarr_format}", unit="patch"):
        if _zarr_complete(patches, name):
            counts["kept"] += 1
            continue
        folder = root / name
        try:
            sar_db = np.stack([read_band(folder / f"{name}_{band}.tif") for band in CHANNELS])
            meta = read_labels_json(folder / f"{name}{LABELS_JSON_SUFFIX}")
            target_from_names(meta["labels"], 43, str(folder / f"{name}{LABELS_JSON_SUFFIX}"))
        except DataError as err:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            logger.warning("to-zarr: skipped %s: %s", name, err)
            continue
        write_zarr_patch(patches, name, sar_db, meta)
        counts["written"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m sarwmix.data.bigearthnetv1 to-zarr SRC OUT [--zarr_format 2|3] [--skip_bad]``."""
    parser = ArgumentParser(prog="python -m sarwmix.data.bigearthnetv1", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("to-zarr", help="folder layout -> Zarr container (resumable)")
    convert.add_argument("src", help="BigEarthNet-S1-v1.0 folder (or its parent)")
    convert.add_argument("out", help="output .zarr store")
    convert.add_argument("--zarr_format", type=int, default=3, choices=(2, 3))
    convert.add_argument("--skip_bad", action="store_true", help="skip and count bad patches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        counts = to_zarr(args.src, args.out, args.zarr_format, args.skip_bad)
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['written']} written, {counts['kept']} already complete, "
          f"{counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
