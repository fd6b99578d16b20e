"""A Sentinel-1 scene on disk, read window by window: band identification, grid checks, units, nodata.

A scene is one acquisition's VH and VV backscatter on one grid: either one two-band GeoTIFF or two
one-band GeoTIFFs (VV and VH) with the same size, CRS and transform. Nothing here loads a whole scene:
``Scene.read`` returns one rectangle, in dB and in the channel order ``CHANNELS`` ([VH, VV]), with its
nodata mask; ``WindowGrid`` says which rectangles a tiled prediction reads and where its output cells lie;
``MapWriter`` writes the output rows as they are finished. Every way the input can be wrong is a
``DataError`` that names the file and what was expected.

Nodata: a pixel is nodata when any channel is not finite, equals its file's declared nodata value, or, in
linear power, is exactly 0 (the value GRD products give the pixels outside the swath). Linear power is
converted to dB as the training data were: ``10 * log10(max(lin, LINEAR_FLOOR))``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from sarwmix.constants import CHANNELS
from sarwmix.errors import ConfigError, DataError
from sarwmix.sar.units import linear_to_db

UNITS: tuple[str, ...] = ("auto", "db", "linear")
SAMPLE_SIDE = 512  # units are detected on a decimated read of at most this many pixels a side
POL_TOKEN = re.compile(r"(?<![A-Za-z])(VV|VH)(?![A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True)
class BandSource:
    """One polarisation of a scene: a file, a band index (1-based) and that band's declared nodata."""

    pol: str
    path: Path
    index: int
    nodata: float | None


@dataclass(frozen=True)
class WindowGrid:
    """The windows a tiled prediction reads and the output cells they cover.

    Output cells are ``stride`` x ``stride`` scene pixels, aligned with the scene's top-left corner: cell
    ``(i, j)`` covers pixels ``[i*stride, (i+1)*stride) x [j*stride, (j+1)*stride)``. Window ``(r, c)``
    has its top-left pixel at ``(r*stride, c*stride)`` and covers the ``n x n`` cells ``(r..r+n-1,
    c..c+n-1)``, ``n = window // stride``. Only whole windows inside the scene are read, so the output has
    ``height // stride`` x ``width // stride`` cells, every one covered by at least one window; the last
    ``height % stride`` rows and ``width % stride`` columns of the scene fall outside the output.
    """

    height: int
    width: int
    window: int
    stride: int

    def __post_init__(self) -> None:
        if self.stride < 1 or self.window < 1 or self.window % self.stride:
            raise ConfigError(f"--window {self.window} --stride {self.stride}: expected positive sizes with the "
                              f"window a multiple of the stride (e.g. --stride {self.window} or "
                              f"{self.window // 2 if self.window % 2 == 0 else self.window})")
        if self.window > min(self.height, self.width):
            raise DataError(f"the scene of {self.height} x {self.width} px is smaller than one window of "
                            f"{self.window} px")

    @property
    def n(self) -> int:
        """Cells along one side of a window."""
        return self.window // self.stride

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of output cells."""
        return self.height // self.stride, self.width // self.stride

    @property
    def windows(self) -> tuple[int, int]:
        """(rows, cols) of windows."""
        return (self.height - self.window) // self.stride + 1, (self.width - self.window) // self.stride + 1

    def transform(self, scene_transform: Affine) -> Affine:
        """The output's transform: the scene's, with pixels ``stride`` times larger."""
        return scene_transform @ Affine.scale(self.stride, self.stride)


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a Sentinel-1 GeoTIFF)")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise DataError(f"{path}: not a readable raster ({str(err).splitlines()[0]})") from None


def _pol_of_description(desc: str | None) -> str | None:
    found = {m.upper() for m in POL_TOKEN.findall(desc or "")}
    return found.pop() if len(found) == 1 else None


def identify_bands(paths: Sequence[Path], bands: Sequence[str] | None = None) -> list[BandSource]:
    """Which file and band hold VH and which VV.

    Args:
        paths: one two-band file, or two one-band files.
        bands: the polarisation of each band (one file) or of each file (two files), in order, e.g.
            ``("VV", "VH")``; None: from the band descriptions, then (two files) from a ``VV`` / ``VH`` token
            in the file name (``..._VV.tif``, ``vh.tif``).
    Returns:
        the sources in ``CHANNELS`` order.
    """
    paths = [Path(p) for p in paths]
    if len(paths) not in (1, 2):
        raise ConfigError(f"--input: {len(paths)} files given; expected one two-band GeoTIFF or two one-band "
                          f"GeoTIFFs (VV and VH)")
    slots: list[tuple[Path, int, str | None, float | None]] = []  # (path, band, description, nodata)
    for path in paths:
        with _open(path) as src:
            want = 2 if len(paths) == 1 else 1
            if src.count != want:
                expected = "2 bands (VH and VV)" if want == 2 else "1 band"
                hint = " (or give the VV and VH files)" if want == 2 else ""
                raise DataError(f"{path}: has {src.count} band(s), expected {expected}{hint}")
            for i in range(1, src.count + 1):
                slots.append((path, i, src.descriptions[i - 1], src.nodatavals[i - 1]))
    if bands is not None:
        pols = [b.upper() for b in bands]
        if len(pols) != len(slots):
            raise ConfigError(f"--bands {' '.join(bands)}: expected {len(slots)} names, one per "
                              f"{'band' if len(paths) == 1 else 'file'}")
    else:
        pols = [_pol_of_description(desc) for _, _, desc, _ in slots]
        if len(paths) == 2:
            pols = [p or _pol_of_description(path.name) for p, (path, *_) in zip(pols, slots)]
        if None in pols:
            what = f"{paths[0]}: its bands have" if len(paths) == 1 else "the files have"
            raise DataError(f"{what} no VV/VH description or name: say which is which with --bands, in input "
                            f"order (e.g. --bands VV VH)")
    if sorted(pols) != sorted(CHANNELS):
        raise DataError(f"{', '.join(str(p) for p in paths)}: polarisations {pols}; expected one VH and one VV")
    by_pol = {pol: BandSource(pol, path, i, nodata) for pol, (path, i, _, nodata) in zip(pols, slots)}
    return [by_pol[c] for c in CHANNELS]


def _grid_of(src) -> dict:
    return {"size": (src.height, src.width), "crs": src.crs, "transform": src.transform}


def check_same_grid(a: Path, grid_a: dict, b: Path, grid_b: dict) -> None:
    """Refuse two rasters whose size, CRS or transform differ, naming both values."""
    if grid_a["size"] != grid_b["size"]:
        raise DataError(f"{b}: {grid_b['size'][0]} x {grid_b['size'][1]} px, but {a} is {grid_a['size'][0]} x "
                        f"{grid_a['size'][1]}; expected the same grid (resample one onto the other)")
    if grid_a["crs"] != grid_b["crs"]:
        raise DataError(f"{b}: CRS {grid_b['crs']}, but {a} has {grid_a['crs']}; expected the same grid")
    if not grid_a["transform"].almost_equals(grid_b["transform"], precision=1e-6 * abs(grid_a["transform"].a)):
        raise DataError(f"{b}: transform {tuple(grid_b['transform'])[:6]}, but {a} has "
                        f"{tuple(grid_a['transform'])[:6]}; expected the same grid")


def detect_units(values: np.ndarray, where: str) -> str:
    """``db`` or ``linear`` from a sample of valid pixel values.

    Backscatter in dB of a Sentinel-1 scene is mostly negative (medians about -12 VV, -19 VH); linear power
    is never negative and mostly below 1. Anything else is ambiguous and refused.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise DataError(f"{where}: no valid pixel in the sample read to detect the units; pass --units")
    if (values < 0).any():
        return "db"
    positive = values[values > 0]
    if positive.size and np.median(positive) < 1.0:
        return "linear"
    raise DataError(f"{where}: cannot tell dB from linear power (no negative value, median "
                    f"{np.median(values):.3g}); pass --units db or --units linear")


class Scene:
    """VH and VV of one acquisition, opened for windowed reading (use as a context manager).

    Args:
        paths: one two-band GeoTIFF or two one-band GeoTIFFs (see ``identify_bands``).
        bands: polarisation of each band or file in order, or None to read them from the files.
        units: ``auto`` (detected on a decimated sample), ``db`` or ``linear``.
    Attributes:
        height, width, crs, transform: the grid; units: ``db`` or ``linear``; sources: the bands in
        ``CHANNELS`` order.
    """

    def __init__(self, paths: Sequence[str | Path], bands: Sequence[str] | None = None, units: str = "auto") -> None:
        if units not in UNITS:
            raise ConfigError(f"--units {units!r}: expected one of {UNITS}")
        self.sources = identify_bands([Path(p) for p in paths], bands)
        self._files = {}
        for s in self.sources:
            if s.path not in self._files:
                self._files[s.path] = _open(s.path)
        first = self.sources[0].path
        grids = {p: _grid_of(f) for p, f in self._files.items()}
        for path, grid in grids.items():
            check_same_grid(first, grids[first], path, grid)
        src = self._files[first]
        self.height, self.width, self.crs, self.transform = src.height, src.width, src.crs, src.transform
        self.name = ", ".join(str(p) for p in self._files)
        if self.crs is None:
            raise DataError(f"{first}: has no CRS; expected a georeferenced GeoTIFF (the output map needs one)")
        for s in self.sources:
            dtype = np.dtype(self._files[s.path].dtypes[s.index - 1])
            if not np.issubdtype(dtype, np.floating):
                raise DataError(f"{s.path}: {s.pol} pixels are {dtype}; expected calibrated float backscatter "
                                f"(sigma0 or gamma0, linear power or dB), not digital numbers")
        self.units = units if units != "auto" else self._detect_units()

    def _detect_units(self) -> str:
        found = {}
        for s in self.sources:
            scale = max(self.height, self.width) / SAMPLE_SIDE
            shape = (max(1, round(self.height / max(scale, 1))), max(1, round(self.width / max(scale, 1))))
            sample = self._files[s.path].read(s.index, out_shape=shape).astype(np.float64)
            keep = np.isfinite(sample) & (sample != 0)
            if s.nodata is not None and not np.isnan(s.nodata):
                keep &= sample != s.nodata
            found[s.pol] = detect_units(sample[keep], f"{s.path} ({s.pol})")
        if len(set(found.values())) > 1:
            raise DataError(f"{self.name}: VH looks like {found['VH']}, VV like {found['VV']}; expected both in "
                            f"the same units (or pass --units)")
        return found[CHANNELS[0]]

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """One rectangle of the scene.

        Returns:
            sar_db: float32 (2, height, width) dB in ``CHANNELS`` order (nodata pixels hold any value);
            valid: bool (height, width), False where any channel is nodata.
        """
        window = Window(col, row, width, height)
        out = np.empty((len(self.sources), height, width), np.float32)
        valid = np.ones((height, width), bool)
        for k, s in enumerate(self.sources):
            try:
                band = self._files[s.path].read(s.index, window=window, out_dtype=np.float32)
            except RasterioError as err:
                raise DataError(f"{s.path}: read failed at row {row}, col {col} ({err})") from None
            out[k], ok = self._to_db(band, s)
            valid &= ok
        return out, valid

    def pixel_size_m(self) -> float | None:
        """The pixel's larger side in metres (degrees converted at the scene's centre latitude); None when
        the CRS's unit is neither."""
        t = self.transform
        side = max(abs(t.a), abs(t.e))
        if self.crs.is_geographic:
            lat = np.radians(t.f + t.e * self.height / 2)
            return max(abs(t.a) * 111_320 * np.cos(lat), abs(t.e) * 110_570)
        factor = self.crs.linear_units_factor[1] if self.crs.is_projected else None
        return side * factor if factor else None

    def grid(self) -> dict:
        """Size, CRS and transform (what ``check_same_grid`` compares)."""
        return {"size": (self.height, self.width), "crs": self.crs, "transform": self.transform}

    def overview(self, height: int, width: int, max_side: int = 1024) -> np.ndarray:
        """The top-left ``height`` x ``width`` pixels decimated to at most ``max_side`` a side (nearest
        pixel: a decimated read, never the whole scene in memory).

        Returns:
            float32 (2, h, w) dB in ``CHANNELS`` order, NaN where nodata.
        """
        scale = max(height, width) / max_side
        shape = (max(1, round(height / max(scale, 1))), max(1, round(width / max(scale, 1))))
        out = np.empty((len(self.sources), *shape), np.float32)
        valid = np.ones(shape, bool)
        for k, s in enumerate(self.sources):
            band = self._files[s.path].read(s.index, window=Window(0, 0, width, height), out_shape=shape,
                                            out_dtype=np.float32)
            out[k], ok = self._to_db(band, s)
            valid &= ok
        out[:, ~valid] = np.nan
        return out

    def _to_db(self, band: np.ndarray, source: BandSource) -> tuple[np.ndarray, np.ndarray]:
        """One band as read -> (dB, valid mask); ``band`` is overwritten."""
        valid = np.isfinite(band)
        if source.nodata is not None and not np.isnan(source.nodata):
            valid &= band != np.float32(source.nodata)
        if self.units == "linear":
            valid &= band != 0
            band = linear_to_db(band)
        return band, valid

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fill_nodata(windows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace the nodata pixels of each window by the mean of its valid pixels, per channel, in place.

    Args:
        windows: float32 (N, C, S, S) dB.
        valid: bool (N, S, S).
    Returns:
        ``windows``; a window without any valid pixel is left as it is (the caller skips it).
    """
    v = valid[:, None]
    counts = v.sum((-2, -1), keepdims=True)
    means = np.where(v, windows, 0).sum((-2, -1), keepdims=True) / np.maximum(counts, 1)
    np.copyto(windows, np.broadcast_to(means, windows.shape), where=~v)
    return windows


def block_mean(mask: np.ndarray, cell: int) -> np.ndarray:
    """Mean of a (H, W) array over ``cell`` x ``cell`` blocks: (H // cell, W // cell) (remainders dropped)."""
    h, w = mask.shape[0] // cell, mask.shape[1] // cell
    return mask[:h * cell, :w * cell].reshape(h, cell, w, cell).mean((1, 3))


class MapWriter:
    """An output GeoTIFF on the output cells' grid, written one row of cells at a time, top to bottom.

    Strips of one row, deflate-compressed, bands interleaved by pixel (all values of a cell together).

    Args:
        path: the .tif to write (an existing file is replaced, unless ``resume``).
        scene: its CRS and transform; ``grid``: the output cells.
        descriptions: one per band (class names, or ``embedding_<k>``).
        dtype, nodata: of the bands (``nan`` for float maps).
        colormap: optional {value: (r, g, b, a)} for a one-band class map.
        resume: open the existing file to fill in the rows not written yet.
    """

    def __init__(self, path: str | Path, scene: Scene, grid: WindowGrid, descriptions: Sequence[str],
                 dtype: str = "float32", nodata: float = float("nan"), colormap: dict | None = None,
                 tags: dict | None = None, resume: bool = False) -> None:
        self.path = Path(path)
        rows, cols = grid.shape
        if resume:
            self.dst = rasterio.open(self.path, "r+")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "width": cols, "height": rows, "count": len(descriptions), "dtype": dtype,
                   "crs": scene.crs, "transform": grid.transform(scene.transform), "nodata": nodata,
                   "compress": "deflate", "interleave": "pixel", "tiled": False, "blockysize": 1}
        self.dst = rasterio.open(self.path, "w", **profile)
        for i, desc in enumerate(descriptions, start=1):
            self.dst.set_band_description(i, desc)
        if colormap is not None:
            self.dst.write_colormap(1, colormap)
        if tags:
            self.dst.update_tags(**{k: json.dumps(v) if not isinstance(v, str) else v for k, v in tags.items()})

    def write_row(self, row: int, values: np.ndarray) -> None:
        """Write cell row ``row``: values (bands, cols)."""
        self.dst.write(values[:, None, :].astype(self.dst.dtypes[0], copy=False),
                       window=Window(0, row, values.shape[1], 1))

    def close(self) -> None:
        self.dst.close()

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
