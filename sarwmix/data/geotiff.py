"""Reading and writing one-band GeoTIFFs, and the cheap checks every band passes at read time.

BigEarthNet stores each polarisation as its own one-band float32 GeoTIFF (uncompressed, 120x120, UTM,
10 m pixels, no nodata). These helpers turn every way such a file can be wrong into a ``DataError``
that names the file and what was expected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.transform import Affine

from sarwmix.errors import DataError

PATCH_SIZE = 120  # BigEarthNet patch side in pixels (1.2 km at 10 m)
PIXEL_SIZE_M = 10.0


def validate_band(band: np.ndarray, where: str, expected_shape: tuple[int, int] | None = None,
                  check_finite: bool = True) -> np.ndarray:
    """Check one 2-D band and return it as float32.

    Args:
        band: the pixel array.
        where: file or key named in the error message.
        expected_shape: (H, W) the band must have, or None to accept any 2-D shape.
        check_finite: reject NaN / Inf pixels (dB data has none; a NaN would poison the loss).

    Returns:
        float32 array (H, W).

    Raises:
        DataError: wrong number of dimensions, wrong shape, non-float pixels or non-finite pixels.
    """
    if band.ndim != 2:
        raise DataError(f"{where}: expected a 2-D band, got an array of shape {band.shape}")
    if expected_shape is not None and band.shape != tuple(expected_shape):
        raise DataError(f"{where}: expected shape {tuple(expected_shape)}, got {band.shape}")
    if not np.issubdtype(band.dtype, np.floating):
        # Integer pixels are not dB backscatter (e.g. a Sentinel-2 band or a scaled export): refuse, not cast.
        raise DataError(f"{where}: pixels are {band.dtype}; expected float32 dB backscatter")
    band = band.astype(np.float32, copy=False)
    if check_finite:
        finite = np.isfinite(band)
        if not finite.all():
            raise DataError(f"{where}: {band.size - int(finite.sum())} NaN/Inf pixels; expected finite dB")
    return band


def read_band(path: str | Path, expected_shape: tuple[int, int] | None = (PATCH_SIZE, PATCH_SIZE),
              check_finite: bool = True) -> np.ndarray:
    """Read a one-band GeoTIFF as a float32 array.

    Args:
        path: the .tif file.
        expected_shape: (H, W) the band must have, or None to accept any size (e.g. SEN12-FLOOD).
        check_finite: reject NaN / Inf pixels.

    Returns:
        float32 array (H, W).

    Raises:
        DataError: missing, unreadable, truncated or non-GeoTIFF file, band count other than 1, wrong
            shape, non-float or non-finite pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a one-band GeoTIFF)")
    try:
        with rasterio.open(path) as src:
            if src.driver != "GTiff":
                raise DataError(f"{path}: is a {src.driver} file, expected a GeoTIFF")
            if src.count != 1:
                raise DataError(f"{path}: has {src.count} bands, expected 1")
            band = src.read(1)
    except RasterioError as err:
        # Truncated files open but fail on read; non-TIFF files fail on open. Both land here.
        raise DataError(f"{path}: not a readable GeoTIFF ({err})") from err
    return validate_band(band, str(path), expected_shape, check_finite)


def utm_transform(ulx: float, uly: float, pixel_size: float = PIXEL_SIZE_M) -> Affine:
    """North-up affine transform with its upper-left corner at (ulx, uly) in metres."""
    return Affine(pixel_size, 0.0, ulx, 0.0, -pixel_size, uly)


def write_band(path: str | Path, band: np.ndarray, crs: str = "EPSG:32633",
               transform: Affine | None = None, nodata: float | None = None) -> None:
    """Write a 2-D array as a one-band uncompressed GeoTIFF, the way BigEarthNet and SEN12-FLOOD ship.

    Args:
        path: output .tif file (parent folders are created).
        band: array (H, W); its dtype is kept (float32 for SAR, uint16 for Sentinel-2).
        crs: any CRS string rasterio accepts, e.g. "EPSG:32633" or "EPSG:4326".
        transform: affine pixel -> CRS transform; default a 10 m grid at an arbitrary UTM origin.
        nodata: nodata value to declare, or None (BigEarthNet declares none).
    """
    if band.ndim != 2:
        raise ValueError(f"write_band expects a 2-D array, got shape {band.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "dtype": band.dtype.name, "width": band.shape[1], "height": band.shape[0],
        "count": 1, "crs": crs, "transform": transform or utm_transform(400_000.0, 5_300_000.0),
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(band, 1)
