"""Helpers for the BigEarthNet / packed tests: corrupting files the ways real data goes wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sarwmix.data.geotiff import write_band


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a written data set so a test can corrupt its own copy."""
    shutil.copytree(src, dst)
    return dst


def v1_files(root: Path, name: str) -> dict[str, Path]:
    """Paths of the VH, VV and labels JSON files of v1 patch ``name`` under the patch folder ``root``."""
    folder = root / name
    return {"VH": folder / f"{name}_VH.tif", "VV": folder / f"{name}_VV.tif",
            "json": folder / f"{name}_labels_metadata.json"}


def truncate(path: Path, keep: int = 3000) -> None:
    """Cut a file short, as an interrupted download or copy does."""
    path.write_bytes(path.read_bytes()[:keep])


def write_wrong_shape(path: Path) -> None:
    write_band(path, np.full((100, 100), -12.0, np.float32))


def write_two_bands(path: Path) -> None:
    """A 2-band GeoTIFF where a one-band file is expected."""
    import rasterio

    from sarwmix.data.geotiff import utm_transform

    profile = {"driver": "GTiff", "dtype": "float32", "width": 120, "height": 120, "count": 2,
               "crs": "EPSG:32633", "transform": utm_transform(400000.0, 5300000.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((2, 120, 120), -12.0, np.float32))


def poke_nan(path: Path) -> None:
    """Rewrite a GeoTIFF with one NaN pixel."""
    from sarwmix.data.geotiff import read_band

    band = read_band(path)
    band[5, 7] = np.nan
    write_band(path, band)


def set_json(path: Path, **changes: object) -> None:
    """Edit keys of a labels JSON (a value of None deletes the key)."""
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
