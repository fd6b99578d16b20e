"""SEN12-FLOOD pairs: read ``S1list.json``, pair the aligned S1 images of each sequence, split by sequence.

Pairing rule (the released SEN12-FLOOD recipe): in each sequence, every non-flood date is paired with every other date,
each unordered pair once, the non-flood image first; the label is ``FLOODING`` of the second image.
Flood-flood pairs are not formed, and two non-flood dates are ordered chronologically. A sequence with
dates d1 (no flood), d2 (no flood), d3 (flood), d4 (flood) gives (d1,d2)->0, (d1,d3)->1, (d1,d4)->1,
(d2,d3)->1, (d2,d4)->1. Pairs whose images are not 512x512 are skipped (and counted).

Each pair is stored as float32 ``(2 dates, 2 channels [VH, VV], 512, 512)`` in **linear** power, named
``<seq>__<file1>__<file2>__<label>.npy`` under ``OUT/train`` and ``OUT/test``. The split is by sequence:
either a list file of test sequences (one name per line; a CSV's first column works too) or a seeded
random fraction. The test sequences used are written to ``OUT/test_sequences.txt`` so a split can be
reused. (The released 262/68 split lists are not available to this project.)

    python -m sarwmix.prep.sen12_data_prep ALIGNED_ROOT S1LIST_JSON OUT [--test_sequences FILE | --test_fraction 0.2]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from sarwmix.cli import ArgumentParser
from sarwmix.constants import CHANNELS
from sarwmix.data.sen12flood_pairs import pair_name, parse_pair_label
from sarwmix.errors import ConfigError, DataError, SarwmixError

PAIR_SIZE = 512
SPLITS = ("train", "test")
ALIGN_REPORT = "align_report.json"
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


@dataclass(frozen=True)
class S1Entry:
    """One numbered entry of a sequence in ``S1list.json``."""

    key: str
    date: dt.date
    filename: str
    flooding: bool


def s1_path(folder: Path, filename: str, channel: str) -> Path:
    """Path of an S1 image: ``<folder>/<filename>_corrected_<VV|VH>.tif``."""
    return Path(folder) / f"{filename}_corrected_{channel}.tif"


def parse_bool(value: object, where: str) -> bool:
    """Parse a JSON flag that may be a bool, 0/1, or a string such as "True"/"false"/"1".

    Args:
        value: the raw JSON value.
        where: context for the error message (file, sequence, key, field).

    Returns:
        The boolean. Anything else raises ``DataError`` naming ``where`` and the value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: expected a boolean (true/false, \"True\"/\"False\" or 1/0), got {value!r}")


def read_s1_list(path: Path) -> dict[str, dict]:
    """Load ``S1list.json`` (or ``S2list.json``): a dict from sequence folder to its listing.

    Raises:
        DataError: the file is missing, not JSON, or not a dict of dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SEN12-FLOOD listing not found: {path} (expected S1list.json from the data set root)")
    try:
        listing = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(listing, dict) or not all(isinstance(v, dict) for v in listing.values()):
        raise DataError(f"{path}: expected an object mapping sequence folders to objects")
    return listing


def _parse_entry(value: object, where: str, key: str) -> S1Entry:
    """Validate one numbered entry and turn it into an ``S1Entry``."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object, got {type(value).__name__}")
    missing = [f for f in ("date", "filename", "FLOODING") if f not in value]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    try:
        date = dt.date.fromisoformat(str(value["date"])[:10])
    except ValueError as exc:
        raise DataError(f"{where}: date {value['date']!r} is not YYYY-MM-DD") from exc
    filename = value["filename"]
    if not isinstance(filename, str) or not filename or "/" in filename or "__" in filename:
        raise DataError(f"{where}: filename {filename!r} is not a plain S1 product prefix")
    return S1Entry(key, date, filename, parse_bool(value["FLOODING"], f"{where} field FLOODING"))


def sequence_entries(listing: dict, seq: str, source: str = "S1list.json",
                     bad: list[str] | None = None) -> list[S1Entry]:
    """The numbered entries of one sequence, in chronological order (ties: by key number).

    Args:
        listing: the sequence's value in the JSON (general keys are ignored).
        seq: sequence folder name, for messages.
        source: JSON file name, for messages.
        bad: when given, invalid entries are described here and skipped instead of raising.

    Returns:
        Entries with distinct filenames (a repeated filename is an error: it cannot name two dates).
    """
    entries, seen = [], set()
    for key in sorted((k for k in listing if k.isdigit()), key=int):
        where = f"{source} sequence {seq} entry {key!r}"
        try:
            entry = _parse_entry(listing[key], where, key)
            if entry.filename in seen:
                raise DataError(f"{where}: filename {entry.filename} already listed in this sequence")
        except DataError as exc:
            if bad is None:
                raise
            bad.append(str(exc))
            continue
        seen.add(entry.filename)
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.date, int(e.key)))


def make_pairs(entries: list[S1Entry]) -> list[tuple[S1Entry, S1Entry, int]]:
    """Apply the pairing rule of the module docstring to chronologically sorted entries.

    Returns:
        ``(first, second, label)`` with ``first`` non-flooded and ``label = int(second.flooding)``.
    """
    pairs = []
    for i, early in enumerate(entries):
        for late in entries[i + 1:]:
            if not early.flooding:
                pairs.append((early, late, int(late.flooding)))
            elif not late.flooding:
                # A flood before a non-flood date (not monotone): the non-flood image still goes first.
                pairs.append((late, early, 1))
    return pairs


def count_labels(root: Path) -> dict[str, tuple[int, int]]:
    """``{split: (no-flood pairs, flood pairs)}`` for each of ``root/{train,val,test}`` that exists."""
    counts = {}
    for split in ("train", "val", "test"):
        if (Path(root) / split).is_dir():
            labels = [parse_pair_label(p) for p in (Path(root) / split).glob("*.npy")]
            counts[split] = (labels.count(0), labels.count(1))
    if not counts:
        raise DataError(f"{root} has no train/val/test folder of SEN12-FLOOD pairs")
    return counts


def print_class_counts(root: str | Path) -> int:
    """Print the class counts of a pair root, one line per split; return a process exit code."""
    try:
        counts = count_labels(Path(root))
    except SarwmixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, (no_flood, flood) in counts.items():
        print(f"{split}: {no_flood + flood} pairs (no flood {no_flood}, flood {flood})")
    return 0

def read_s1_image(folder: Path, filename: str) -> np.ndarray:
    """Read an aligned S1 acquisition as float32 ``(2, H, W)`` linear power, channels ``CHANNELS``.

    Raises:
        DataError: a polarisation file is missing or unreadable, VH/VV shapes differ, or a pixel is
            not finite.
    """
    bands = []
    for channel in CHANNELS:
        path = s1_path(folder, filename, channel)
        if not path.is_file():
            raise DataError(f"sequence {Path(folder).name}: S1 file {path} listed in the JSON does not exist")
        try:
            with rasterio.open(path) as src:
                bands.append(src.read(1).astype(np.float32))
        except RasterioIOError as exc:
            raise DataError(f"{path} is not a readable GeoTIFF: {exc}") from exc
        if not np.isfinite(bands[-1]).all():
            raise DataError(f"{path} holds non-finite pixels (NaN/Inf); expected finite linear power")
    if bands[0].shape != bands[1].shape:
        raise DataError(f"sequence {Path(folder).name}: {filename} VH {bands[0].shape} and VV "
                        f"{bands[1].shape} differ in shape")
    return np.stack(bands)


def read_sequence_list(path: Path) -> list[str]:
    """Sequence names from a list file: one per line, or a CSV whose first column is the name.

    Blank lines and lines starting with ``#`` are ignored. Numbers are matched to the folders by value
    later (``resolve_test_sequences``): spreadsheets drop the leading zeros of ``0001``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"test sequence list not found: {path}")
    names = []
    for line in path.read_text().splitlines():
        name = line.split(",")[0].strip().strip('"')
        if name and not name.startswith("#"):
            names.append(name)
    if not names:
        raise ConfigError(f"test sequence list {path} names no sequence")
    return names


def choose_test_sequences(sequences: list[str], test_fraction: float, seed: int) -> list[str]:
    """Seeded random test sequences: ``round(fraction * n)``, at least 1 and at most ``n - 1`` if n >= 2."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"--test_fraction must be in [0, 1), got {test_fraction}")
    n = len(sequences)
    n_test = round(test_fraction * n)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(sequences[i] for i in order[:n_test])


def _read_align_report(aligned_root: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Sequences and (sequence, filename) entries that the alignment step skipped, if it left a report."""
    path = Path(aligned_root) / ALIGN_REPORT
    if not path.is_file():
        return set(), set()
    report = json.loads(path.read_text())
    entries = {(e["sequence"], e["filename"]) for e in report.get("skipped_entries", [])}
    return set(report.get("skipped_no_s2", [])) | set(report.get("skipped_missing_folder", [])), entries


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``OUT/train`` and ``OUT/test``; refuse to mix with pairs of an earlier run."""
    for split in SPLITS:
        folder = Path(out) / split
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(folder.glob("*.npy"))
        if old and not overwrite:
            raise ConfigError(f"{folder} already holds {len(old)} pair files; use an empty OUT or --overwrite")
        for path in old:
            path.unlink()


def _load_sequence(folder: Path, entries: list[S1Entry], bad: list[str] | None) -> dict[str, np.ndarray]:
    """Read every entry's image once (each image serves several pairs); skip bad ones if ``bad`` is given."""
    images = {}
    for entry in entries:
        try:
            images[entry.filename] = read_s1_image(folder, entry.filename)
        except DataError as exc:
            if bad is None:
                raise
            bad.append(str(exc))
    return images


def _write_sequence(folder: Path, entries: list[S1Entry], out_dir: Path, counts: dict[str, int],
                    bad: list[str] | None) -> None:
    """Write the pairs of one sequence into ``out_dir`` and update the counters."""
    images = _load_sequence(folder, entries, bad)
    split = out_dir.name
    for first, second, label in make_pairs(entries):
        if first.filename not in images or second.filename not in images:
            counts["skipped_bad_pairs"] += 1
            continue
        a, b = images[first.filename], images[second.filename]
        if a.shape[1:] != (PAIR_SIZE, PAIR_SIZE) or b.shape[1:] != (PAIR_SIZE, PAIR_SIZE):
            print(f"skip pair {folder.name}: {first.filename} {a.shape[1:]} / {second.filename} "
                  f"{b.shape[1:]} is not {PAIR_SIZE}x{PAIR_SIZE}")
            counts["skipped_size"] += 1
            continue
        np.save(out_dir / pair_name(folder.name, first.filename, second.filename, label), np.stack([a, b]))
        counts[split] += 1
        counts[f"{split}_flood"] += label


def prepare_pairs(aligned_root: Path, s1_list: Path, out: Path, test_sequences: list[str],
                  skip_bad: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Build the SEN12-FLOOD pair files of every sequence in ``s1_list``.

    Args:
        aligned_root: output of ``sen12_align_s1_to_s2`` (sequence folders of aligned S1 GeoTIFFs).
        s1_list: path of ``S1list.json``.
        out: receives ``train/`` and ``test/`` (created; must hold no pairs unless ``overwrite``).
        test_sequences: sequence folders that go to ``test``; all others go to ``train``.
        skip_bad: skip (and count) invalid entries, missing files and sequence folders instead of raising.
        overwrite: delete pair files left in ``out/train`` and ``out/test`` by an earlier run.

    Returns:
        Counters: ``train``, ``test`` (pairs written), ``train_flood``, ``test_flood`` (label 1),
        ``skipped_size`` (not 512x512), ``skipped_bad_pairs``, ``skipped_bad_entries``,
        ``skipped_sequences`` (no aligned folder: alignment skipped them, or ``skip_bad``).
    """
    aligned_root, out = Path(aligned_root), Path(out)
    if not aligned_root.is_dir():
        raise DataError(f"aligned root not found: {aligned_root} (run python -m sarwmix.prep.sen12_align_s1_to_s2)")
    listing = read_s1_list(s1_list)
    no_s2, skipped_entries = _read_align_report(aligned_root)
    _prepare_out(out, overwrite)
    counts = dict.fromkeys(("train", "test", "train_flood", "test_flood", "skipped_size",
                            "skipped_bad_pairs", "skipped_bad_entries", "skipped_sequences"), 0)
    bad: list[str] | None = [] if skip_bad else None
    test = set(test_sequences)
    for seq in sorted(listing):
        folder = aligned_root / seq
        if seq in no_s2 or (skip_bad and not folder.is_dir()):
            print(f"skip sequence {seq}: no aligned folder (no S2 band, or missing in the data set)")
            counts["skipped_sequences"] += 1
            continue
        if not folder.is_dir():
            raise DataError(f"sequence {seq} of {s1_list} has no folder {folder} (did alignment run?)")
        entries = [e for e in sequence_entries(listing[seq], seq, Path(s1_list).name, bad)
                   if (seq, e.filename) not in skipped_entries]
        _write_sequence(folder, entries, out / ("test" if seq in test else "train"), counts, bad)
    for message in bad or []:
        print(f"skipped (--skip_bad): {message}")
    counts["skipped_bad_entries"] = len(bad or []) + len(skipped_entries)
    return counts


def resolve_test_sequences(sequences: list[str], list_file: Path | None, test_fraction: float,
                           seed: int) -> list[str]:
    """Test sequences from ``list_file`` (names unknown to the JSON are reported) or a seeded fraction."""
    if list_file is None:
        return choose_test_sequences(sorted(sequences), test_fraction, seed)
    def key(name: str) -> str:  # "0001", "001" and "1" name the same numbered folder
        return str(int(name)) if name.isdigit() else name

    folder_of = {key(s): s for s in sequences}
    names = read_sequence_list(list_file)
    unknown = [n for n in names if key(n) not in folder_of]
    if len(unknown) == len(names):
        raise ConfigError(f"none of the {len(names)} sequences in {list_file} is in S1list.json "
                          f"(first: {names[0]!r}; expected folder names such as {min(sequences)!r})")
    if unknown:
        print(f"warning: {len(unknown)} sequences of {list_file} are not in S1list.json: {unknown[:10]}")
    return sorted({folder_of[key(n)] for n in names if n not in unknown})


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Build SEN12-FLOOD image pairs from aligned S1.")
    parser.add_argument("aligned_root", type=Path, help="output folder of sarwmix.prep.sen12_align_s1_to_s2")
    parser.add_argument("s1_list", type=Path, help="S1list.json of the data set")
    parser.add_argument("out", type=Path, help="receives train/ and test/ pair files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--test_sequences", type=Path, default=None,
                       help="file listing the test sequences (one per line or a CSV's first column)")
    group.add_argument("--test_fraction", type=float, default=0.2,
                       help="fraction of sequences drawn (seeded) for test when no list is given")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sequence split")
    parser.add_argument("--skip_bad", action="store_true", help="skip and count bad entries instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="delete pair files of an earlier run in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        sequences = list(read_s1_list(args.s1_list))
        test = resolve_test_sequences(sequences, args.test_sequences, args.test_fraction, args.seed)
        counts = prepare_pairs(args.aligned_root, args.s1_list, args.out, test, args.skip_bad, args.overwrite)
    except SarwmixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "test_sequences.txt").write_text("".join(f"{s}\n" for s in test))
    print(f"sequences: {len(sequences)} ({len(test)} test, list in {args.out / 'test_sequences.txt'})")
    for split in SPLITS:
        print(f"{split}: {counts[split]} pairs ({counts[f'{split}_flood']} flood, "
              f"{counts[split] - counts[f'{split}_flood']} no flood)")
    print(f"skipped: {counts['skipped_size']} pairs not {PAIR_SIZE}x{PAIR_SIZE}, {counts['skipped_bad_pairs']} "
          f"pairs with a bad image, {counts['skipped_bad_entries']} bad entries, "
          f"{counts['skipped_sequences']} sequences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
