"""Derive ``datasets/`` (BigEarthNet-19 label map, BigEarthNet-S1 v1 split and exclusion lists) from the
``bigearthnet-common`` 2.8.0 package of the BigEarthNet team (Apache-2.0), without importing it.

    pip download bigearthnet-common==2.8.0 --no-deps -d /tmp/bec
    python scripts/derive_datasets.py /tmp/bec/bigearthnet_common-2.8.0-py3-none-any.whl

The argument is the wheel, the folder it was unpacked into, or its ``bigearthnet_common/`` folder. The
package holds the official lists as bz2 CSVs of **S2** names (train, val, test; seasonal snow, cloud or
shadow, no 19-class label) and the S1 <-> S2 name table of all 590,326 patches
(``s1_s2_name_country_season.csv.bz2``). Each list is written as a two-column ``S2 name,S1 name`` CSV
without header, gzip-compressed with a fixed header (no name, mtime 0) so the bytes depend on the content
only; ``label_indices.json`` is built from the package's 43 -> 19 table (``constants.py``, read as text).
It prints one Markdown row per file (rows, bytes, SHA-256) for ``THIRD_PARTY.md``.
"""
from __future__ import annotations

import argparse
import ast
import bz2
import csv
import gzip
import hashlib
import io
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "bigearthnet_common"
# output name -> list in the package; the output names are those the BENv1 loader looks up.
LISTS = {
    "train.csv.gz": "train.csv.bz2",
    "val.csv.gz": "val.csv.bz2",
    "test.csv.gz": "test.csv.bz2",
    "patches_with_seasonal_snow.csv.gz": "patches_with_seasonal_snow.csv.bz2",
    "patches_with_cloud_and_shadow.csv.gz": "patches_with_cloud_and_shadow.csv.bz2",
    "patches_without_19_class_labels.csv.gz": "patches_with_no_19_class_targets.csv.bz2",
}
NAME_TABLE = "s1_s2_name_country_season.csv.bz2"
LABEL_JSON = "label_indices.json"


class DeriveError(Exception):
    """The package does not hold what this script expects."""


def package_reader(path: Path) -> Callable[[str], bytes]:
    """A function ``name -> bytes`` reading ``bigearthnet_common/<name>`` from a wheel or unpacked folder."""
    if path.is_file() and zipfile.is_zipfile(path):
        wheel = zipfile.ZipFile(path)
        return lambda name: wheel.read(f"{PACKAGE}/{name}")
    folder = path / PACKAGE if (path / PACKAGE).is_dir() else path
    if not (folder / "constants.py").is_file():
        raise DeriveError(f"{path}: neither a wheel nor a folder holding {PACKAGE}/constants.py")
    return lambda name: (folder / name).read_bytes()


def read_names(raw_bz2: bytes) -> list[str]:
    """One patch name per line (CRLF or LF), file order kept."""
    return [line.strip() for line in bz2.decompress(raw_bz2).decode().splitlines() if line.strip()]


def read_s2_to_s1(raw_bz2: bytes) -> dict[str, str]:
    """S2 name -> S1 name from the package's name table (header ``s1_name,s2_name,country,season``)."""
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw_bz2).decode()))
    mapping = {row["s2_name"]: row["s1_name"] for row in rows}
    if len(set(mapping.values())) != len(mapping):
        raise DeriveError(f"{NAME_TABLE}: the S2 -> S1 mapping is not one to one")
    return mapping


def label_indices(constants_py: str) -> dict:
    """``label_indices.json`` content: 43 names -> index, the 19 classes' source indices, 19 names -> index.

    Read from ``OLD2NEW_LABELS_DICT`` (43 names in their original order -> 19-class name or None) and
    ``NEW_LABELS_ORIGINAL_ORDER`` of the package's ``constants.py``, parsed as literals.
    """
    literals = {}
    for node in ast.parse(constants_py).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("OLD2NEW_LABELS_DICT", "NEW_LABELS_ORIGINAL_ORDER"):
                literals[node.targets[0].id] = ast.literal_eval(node.value)
    if len(literals) != 2:
        raise DeriveError("constants.py: OLD2NEW_LABELS_DICT or NEW_LABELS_ORIGINAL_ORDER not found")
    old2new, new = literals["OLD2NEW_LABELS_DICT"], list(literals["NEW_LABELS_ORIGINAL_ORDER"])
    original = list(old2new)
    if (len(original), len(new)) != (43, 19) or not set(old2new.values()) - {None} <= set(new):
        raise DeriveError(f"constants.py: expected 43 -> 19 classes, got {len(original)} -> {len(new)}")
    conversion = [[i for i, name in enumerate(original) if old2new[name] == target] for target in new]
    return {"original_labels": {name: i for i, name in enumerate(original)},
            "label_conversion": conversion,
            "BigEarthNet-19_labels": {name: i for i, name in enumerate(new)}}


def pairs_csv_gz(names: list[str], s2_to_s1: dict[str, str], source: str) -> bytes:
    """Gzip bytes of ``S2,S1`` lines (LF); the same names always give the same bytes."""
    missing = [name for name in names if name not in s2_to_s1]
    if missing:
        raise DeriveError(f"{source}: {len(missing)} S2 names without an S1 partner, e.g. {missing[0]}")
    text = "".join(f"{name},{s2_to_s1[name]}\n" for name in names)
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def check_disjoint(lists: dict[str, list[str]]) -> None:
    """The three splits are disjoint and hold no excluded patch."""
    splits = ("train.csv.gz", "val.csv.gz", "test.csv.gz")
    seen: dict[str, str] = {}
    for out in splits:
        for name in lists[out]:
            if name in seen:
                raise DeriveError(f"{name} is in both {seen[name]} and {out}")
            seen[name] = out
    for out in set(lists) - set(splits):
        inside = [name for name in lists[out] if name in seen]
        if inside:
            raise DeriveError(f"{len(inside)} patches of {out} are in a split, e.g. {inside[0]}")


def derive(package: Path, out: Path) -> dict[str, tuple[str, bytes]]:
    """Write every file of ``datasets/`` into ``out``; returns name -> (content in words, bytes written)."""
    read = package_reader(package)
    s2_to_s1 = read_s2_to_s1(read(NAME_TABLE))
    lists = {output: read_names(read(source)) for output, source in LISTS.items()}
    check_disjoint(lists)
    files = {output: (f"{len(names):,} rows", pairs_csv_gz(names, s2_to_s1, LISTS[output]))
             for output, names in lists.items()}
    labels = label_indices(read("constants.py").decode())
    files[LABEL_JSON] = ("43 -> 19 classes", (json.dumps(labels, indent=2, ensure_ascii=False) + "\n").encode())
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, data) in files.items():
        (out / name).write_bytes(data)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="bigearthnet_common-2.8.0 wheel or its unpacked folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets")
    args = parser.parse_args(argv)
    try:
        files = derive(args.package, args.out)
    except (DeriveError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| File | Content | Bytes | SHA-256 |\n|---|---|---|---|")
    for name, (rows, data) in files.items():
        print(f"| `datasets/{name}` | {rows} | {len(data):,} | `{hashlib.sha256(data).hexdigest()}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
