"""Warp every SEN12-FLOOD S1 image onto the grid of an S2 band of the same sequence.

S1 comes in EPSG:4326 at ~8.98e-5 deg with a size that varies per acquisition; S2 is UTM, 10 m, 512x512.
Each S1 image listed in ``S1list.json`` is reprojected with ``rasterio.warp.reproject`` onto the CRS,
transform and shape of one S2 band of its sequence (the earliest ``*_B02.tif``, else the first band file
by name), and written under the same name into ``OUT/<seq>/``. ``S1list.json`` and ``S2list.json`` are
copied to ``OUT`` and ``OUT/align_report.json`` records what was skipped, for ``sen12_data_prep``.

Resampling: ``nearest`` by default. It is what ``gdalwarp`` does by default (the released preparation
warped with GDAL defaults), keeps the speckle statistics of the power values (bilinear averaging of
neighbouring pixels reduces their variance), and maps no-data zeros to exact zeros, which the pruning
step counts. ``--resampling bilinear`` is available; both declare 0 as no-data, so zeros never blend
into valid pixels and ground outside the S1 footprint becomes 0.

Sequences without any S2 band are reported and skipped. An S1 entry whose files are missing, unreadable
or hold non-finite values raises ``DataError`` naming the sequence and the file; with ``--skip_bad`` it
is skipped and counted instead.

    python -m sarwmix.prep.sen12_align_s1_to_s2 ROOT OUT [--resampling nearest|bilinear] [--skip_bad]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject
from tqdm import tqdm

from sarwmix.cli import ArgumentParser
from sarwmix.constants import CHANNELS
from sarwmix.errors import ConfigError, DataError, SarwmixError
from sarwmix.prep.sen12_data_prep import ALIGN_REPORT, read_s1_list, s1_path

RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear}


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and shape."""

    crs: CRS
    transform: Affine
    height: int
    width: int


def reference_band(folder: Path) -> Path | None:
    """The S2 band whose grid a sequence's S1 images are warped onto, or None if the folder has no S2."""
    bands = sorted(Path(folder).glob("S2_*_B*.tif"))
    b02 = [p for p in bands if p.name.endswith("_B02.tif")]
    return (b02 or bands or [None])[0]


def read_grid(path: Path) -> Grid:
    """The grid of a GeoTIFF; ``DataError`` if it is unreadable or has no CRS."""
    try:
        with rasterio.open(path) as src:
            grid = Grid(src.crs, src.transform, src.height, src.width)
    except RasterioIOError as exc:
        raise DataError(f"{path} is not a readable GeoTIFF: {exc}") from exc
    if grid.crs is None:
        raise DataError(f"{path} has no CRS; expected a georeferenced S2 band")
    return grid


def _read_s1(path: Path, seq: str) -> tuple[np.ndarray, Grid]:
    """Read one S1 polarisation (band 1, float32) with its grid, validating what the warp relies on."""
    if not path.is_file():
        raise DataError(f"sequence {seq}: S1 file {path} listed in S1list.json does not exist")
    try:
        with rasterio.open(path) as src:
            power, grid = src.read(1).astype(np.float32), Grid(src.crs, src.transform, src.height, src.width)
    except RasterioIOError as exc:
        raise DataError(f"sequence {seq}: {path} is not a readable GeoTIFF: {exc}") from exc
    if grid.crs is None:
        raise DataError(f"sequence {seq}: {path} has no CRS; expected EPSG:4326")
    if not np.isfinite(power).all():
        raise DataError(f"sequence {seq}: {path} holds non-finite pixels (NaN/Inf); expected linear power")
    return power, grid


def warp_to_grid(power: np.ndarray, src: Grid, dst: Grid, resampling: Resampling) -> np.ndarray:
    """Reproject a linear-power image ``(H, W)`` onto ``dst``; zeros are no-data in and out.

    Returns:
        float32 ``(dst.height, dst.width)``; ground outside the source footprint is 0.
    """
    out = np.zeros((dst.height, dst.width), dtype=np.float32)
    reproject(source=power, destination=out, src_transform=src.transform, src_crs=src.crs,
              dst_transform=dst.transform, dst_crs=dst.crs, resampling=resampling,
              src_nodata=0.0, dst_nodata=0.0)
    return out


def _write(path: Path, power: np.ndarray, grid: Grid) -> None:
    profile = {"driver": "GTiff", "height": grid.height, "width": grid.width, "count": 1,
               "dtype": "float32", "crs": grid.crs, "transform": grid.transform, "nodata": 0.0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(power, 1)


def entry_filenames(listing: dict, seq: str, skipped: list[dict] | None = None) -> list[str]:
    """The S1 file prefixes of a sequence's numbered entries, in key order.

    Args:
        listing: the sequence's value in ``S1list.json``.
        seq: the sequence folder, for messages.
        skipped: when given, malformed entries are recorded here instead of raising ``DataError``.
    """
    names = []
    for key in sorted((k for k in listing if k.isdigit()), key=int):
        entry = listing[key]
        if isinstance(entry, dict) and isinstance(entry.get("filename"), str) and entry["filename"]:
            names.append(entry["filename"])
            continue
        message = f"S1list.json sequence {seq} entry {key!r}: expected an object with a 'filename'"
        if skipped is None:
            raise DataError(message)
        skipped.append({"sequence": seq, "filename": None, "reason": message})
    return names


def align_sequence(folder: Path, out_folder: Path, filenames: list[str], grid: Grid,
                   resampling: Resampling, skipped: list[dict] | None = None) -> int:
    """Warp the VH and VV files of each listed acquisition onto ``grid``; return how many were aligned.

    Args:
        folder: the sequence folder of the raw data set.
        out_folder: receives the aligned GeoTIFFs under their original names.
        filenames: S1 product prefixes from ``S1list.json``.
        grid: the S2 band's grid.
        resampling: a ``rasterio.enums.Resampling`` member.
        skipped: when given, bad acquisitions are recorded here instead of raising ``DataError``.
    """
    out_folder.mkdir(parents=True, exist_ok=True)
    aligned = 0
    for name in filenames:
        try:
            images = [_read_s1(s1_path(folder, name, channel), folder.name) for channel in CHANNELS]
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append({"sequence": folder.name, "filename": name, "reason": str(exc)})
            continue
        for channel, (power, src) in zip(CHANNELS, images):
            _write(s1_path(out_folder, name, channel), warp_to_grid(power, src, grid, resampling), grid)
        aligned += 1
    return aligned


def align_dataset(root: Path, out: Path, s1_list: Path | None = None, resampling: str = "nearest",
                  skip_bad: bool = False) -> dict:
    """Align every sequence of ``S1list.json`` and write ``OUT/align_report.json``.

    Args:
        root: the SEN12-FLOOD root (sequence folders, ``S1list.json``, ``S2list.json``).
        out: output root (same folder structure); must differ from ``root``.
        s1_list: the listing to follow (default ``root/S1list.json``).
        resampling: ``nearest`` (default) or ``bilinear``.
        skip_bad: record and skip missing folders and bad entries instead of raising ``DataError``.

    Returns:
        The report: ``aligned_images``, ``reference_bands`` {seq: band file}, ``skipped_no_s2``,
        ``skipped_missing_folder`` (lists of sequences) and ``skipped_entries`` (sequence, filename, reason).
    """
    root, out = Path(root), Path(out)
    if resampling not in RESAMPLING:
        raise ConfigError(f"--resampling must be one of {sorted(RESAMPLING)}, got {resampling!r}")
    if root.resolve() == out.resolve():
        raise ConfigError(f"OUT must differ from ROOT ({root}): aligned files keep the original names")
    s1_list = Path(s1_list) if s1_list else root / "S1list.json"
    listing = read_s1_list(s1_list)
    report: dict = {"resampling": resampling, "aligned_images": 0, "reference_bands": {},
                    "skipped_no_s2": [], "skipped_missing_folder": [], "skipped_entries": []}
    skipped = report["skipped_entries"] if skip_bad else None
    for seq in tqdm(sorted(listing), desc="align", unit="seq", disable=None):
        folder = root / seq
        if not folder.is_dir():
            if not skip_bad:
                raise DataError(f"sequence {seq} of {s1_list} has no folder {folder}")
            report["skipped_missing_folder"].append(seq)
            continue
        band = reference_band(folder)
        if band is None:
            report["skipped_no_s2"].append(seq)
            continue
        report["reference_bands"][seq] = band.name
        names = entry_filenames(listing[seq], seq, skipped)
        report["aligned_images"] += align_sequence(folder, out / seq, names, read_grid(band),
                                                   RESAMPLING[resampling], skipped)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s1_list, out / "S1list.json")
    if (root / "S2list.json").is_file():
        shutil.copyfile(root / "S2list.json", out / "S2list.json")
    (out / ALIGN_REPORT).write_text(json.dumps(report, indent=1))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Warp SEN12-FLOOD S1 images onto an S2 band grid.")
    parser.add_argument("root", type=Path, help="SEN12-FLOOD root with sequence folders and S1list.json")
    parser.add_argument("out", type=Path, help="output root for the aligned GeoTIFFs")
    parser.add_argument("--s1_list", type=Path, default=None, help="listing to follow (default ROOT/S1list.json)")
    parser.add_argument("--resampling", choices=sorted(RESAMPLING), default="nearest",
                        help="warp resampling of the linear power (default nearest, as gdalwarp)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip and count missing or bad S1 files instead of failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = align_dataset(args.root, args.out, args.s1_list, args.resampling, args.skip_bad)
    except SarwmixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"aligned {report['aligned_images']} S1 images of {len(report['reference_bands'])} sequences "
          f"into {args.out} ({args.resampling})")
    no_s2, missing = report["skipped_no_s2"], report["skipped_missing_folder"]
    print(f"skipped {len(no_s2)} sequences without any S2 band: {no_s2}")
    if missing:
        print(f"skipped {len(missing)} sequences without a folder (--skip_bad): {missing}")
    for entry in report["skipped_entries"]:
        print(f"skipped (--skip_bad): {entry['reason']}")
    print(f"skipped {len(report['skipped_entries'])} bad S1 entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
