"""Seeded synthetic SEN12-FLOOD root in the real on-disk layout.

``write_sen12flood(out_dir, n_sequences, seed)`` writes ``out_dir/SEN12FLOOD/`` with

- one folder per sequence (``0001``, ``0002``, ...) holding S1 images
  ``<S1 product id>_corrected_VV.tif`` / ``_corrected_VH.tif`` (float32 **linear** power, EPSG:4326,
  ~580-690 px on a side at the real 8.98e-5 deg spacing, covering the S2 tile plus a margin) and S2 bands
  ``S2_<YYYY-MM-DD>_B01.tif`` ... ``_B12.tif`` (uint16, UTM, 10 m, 512x512);
- ``S1list.json`` and ``S2list.json`` keyed by sequence folder, with the general keys ``count``,
  ``folder`` and ``geo`` (GeoJSON polygon of the tile) and numbered entries ``"1"``, ``"2"``, ... carrying
  ``date``, ``filename``, ``FLOODING``, ``FULL-DATA-COVERAGE`` (S1 also ``orbit`` and ``url``).

The flood flags are fixed so that tests can predict the pairs by hand. Sequence ``i`` (0-based) follows
``FLOOD_PATTERNS[i % 4]`` in chronological order:

====  ==================  ===================================================================
i%4   FLOODING by date    particularities
====  ==================  ===================================================================
0     F, F, T, T          sequence 0 only: date 2 (index 1) has a no-data strip over 45 % of
                          the columns (>= 25 % zeros after alignment, so pruning drops its pairs)
1     F, F, F             FLOODING written as the strings "False"; JSON keys not in date order
                          (key "1" is the last date); date 1 has a thin no-data strip (~4 %)
2     F, T, T             flooded entries written as the string "True"; date 3 has a thin strip
3     T, T, T             flooded from the start: no pair can be formed
====  ==================  ===================================================================

Flooded dates replace the backscatter inside a sequence-wide flood mask (~40 % of the area) by open
water (about -21 dB VV / -31 dB VH), so a change detector has a real signal to learn.
Pixels are multiplicative Gamma speckle (L = 4.4 looks) on a smooth dB texture.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from sarwmix.errors import ConfigError

FLOOD_PATTERNS: tuple[tuple[bool, ...], ...] = (
    (False, False, True, True),
    (False, False, False),
    (False, True, True),
    (True, True, True),
)
S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_SIZE = 512
S2_PIXEL_M = 10.0
# The real SEN12-FLOOD S1 spacing in degrees (~10 m at the equator, the same in lon and lat).
S1_PIXEL_DEG = 8.983152841195215e-05
# S1 footprint = S2 footprint grown by this fraction on every side, as the real chips overhang the tile.
S1_MARGIN = 0.06
MOSTLY_ZERO_COLUMNS = 0.45
THIN_ZERO_COLUMNS = 0.09
LOOKS = 4.4
# Flood sites (lon, lat) in the regions the data set covers: West/East Africa, Middle-East, Australia.
_SITES: tuple[tuple[float, float], ...] = (
    (-5.55, 8.45), (32.65, -19.45), (44.35, 33.25), (146.85, -19.35), (35.05, -15.75), (-16.95, 13.45),
)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std field: a (cells+1)^2 Gaussian grid bilinearly upsampled to ``shape``."""
    coarse = rng.standard_normal((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, shape[0]), np.linspace(0, cells, shape[1])
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    field = top * (1 - fy) + bottom * fy
    return (field - field.mean()) / (field.std() + 1e-12)


def _grids(rng: np.random.Generator) -> dict:
    """Pick a site and build the S2 UTM grid and the S1 EPSG:4326 grid that covers it with a margin."""
    lon, lat = _SITES[int(rng.integers(len(_SITES)))]
    lon, lat = lon + rng.uniform(-0.2, 0.2), lat + rng.uniform(-0.2, 0.2)
    zone = int((lon + 180) // 6) + 1
    s2_crs = CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)
    xs, ys = warp_transform(CRS.from_epsg(4326), s2_crs, [lon], [lat])
    half = S2_SIZE * S2_PIXEL_M / 2
    x0, y0 = round((xs[0] - half) / S2_PIXEL_M) * S2_PIXEL_M, round((ys[0] + half) / S2_PIXEL_M) * S2_PIXEL_M
    s2_transform = Affine(S2_PIXEL_M, 0.0, x0, 0.0, -S2_PIXEL_M, y0)
    side = S2_SIZE * S2_PIXEL_M
    west, south, east, north = transform_bounds(s2_crs, "EPSG:4326", x0, y0 - side, x0 + side, y0,
                                                densify_pts=21)
    grow_x, grow_y = (east - west) * S1_MARGIN, (north - south) * S1_MARGIN
    west, east, south, north = west - grow_x, east + grow_x, south - grow_y, north + grow_y
    s1_shape = (math.ceil((north - south) / S1_PIXEL_DEG), math.ceil((east - west) / S1_PIXEL_DEG))
    s1_transform = Affine(S1_PIXEL_DEG, 0.0, west, 0.0, -S1_PIXEL_DEG, north)
    ring = [[west + grow_x, north - grow_y], [east - grow_x, north - grow_y], [east - grow_x, south + grow_y],
            [west + grow_x, south + grow_y], [west + grow_x, north - grow_y]]
    return {"s2_crs": s2_crs, "s2_transform": s2_transform, "s1_shape": s1_shape,
            "s1_transform": s1_transform, "geo": {"type": "Polygon", "coordinates": [ring]}}


def _dates(rng: np.random.Generator, n: int) -> list[dt.date]:
    """``n`` distinct chronological dates inside the data set's period (Dec 2018 - May 2019)."""
    day = dt.date(2018, 12, 1) + dt.timedelta(days=int(rng.integers(0, 90)))
    out = []
    for _ in range(n):
        out.append(day)
        day += dt.timedelta(days=int(rng.integers(3, 13)))
    return out


def _product_id(rng: np.random.Generator, day: dt.date, descending: bool) -> str:
    """A Sentinel-1 GRD product id like ``S1A_IW_GRDH_1SDV_20190218T030905_20190218T030930_025978_...``."""
    mission = "S1A" if rng.random() < 0.6 else "S1B"
    hour = int(rng.integers(2, 5)) if descending else int(rng.integers(15, 18))
    start = dt.datetime(day.year, day.month, day.day, hour, int(rng.integers(60)), int(rng.integers(60)))
    stop = start + dt.timedelta(seconds=25)
    # Absolute orbits advance ~14.6 per day; anchored on real S1A / S1B products of early 2019.
    anchor_day, anchor_orbit = (dt.date(2019, 2, 18), 25978) if mission == "S1A" else (dt.date(2019, 4, 1), 15607)
    orbit = anchor_orbit + round((day - anchor_day).days * 14.58)
    fmt = "%Y%m%dT%H%M%S"
    return (f"{mission}_IW_GRDH_1SDV_{start.strftime(fmt)}_{stop.strftime(fmt)}_{orbit:06d}_"
            f"{int(rng.integers(0x10000, 0x400000)):06X}_{int(rng.integers(0x10000)):04X}")


def _s1_image(rng: np.random.Generator, scene: dict, flooded: bool, zero_columns: float,
              zero_left: bool) -> np.ndarray:
    """One S1 acquisition as float32 linear power ``(2, H, W)`` in the order [VH, VV]."""
    vv_db = scene["vv_db"] + rng.normal(0.0, 0.3)
    vh_db = scene["vh_db"] + rng.normal(0.0, 0.3)
    if flooded:
        water = scene["flood_mask"]
        vv_db = np.where(water, -21.0 + 0.8 * scene["water_texture"], vv_db)
        vh_db = np.where(water, -31.0 + 0.8 * scene["water_texture"], vh_db)
    speckle = rng.gamma(LOOKS, 1.0 / LOOKS, size=(2,) + vv_db.shape)
    lin = (10.0 ** (np.stack([vh_db, vv_db]) / 10.0) * speckle).astype(np.float32)
    n_zero = round(zero_columns * lin.shape[-1])
    if n_zero:
        # The no-data wedge of a GRD scene edge: exact zeros in both polarisations.
        columns = slice(0, n_zero) if zero_left else slice(lin.shape[-1] - n_zero, None)
        lin[..., columns] = 0.0
    return lin


def _scene(rng: np.random.Generator, shape: tuple[int, int]) -> dict:
    """The sequence's land: a smooth dB texture (mean VV ~ N(-11, 1.5), VH ~ VV - 6.5) and a flood mask."""
    vv_db = rng.normal(-11.0, 1.5) + 2.5 * _smooth_field(rng, shape, 6) + 1.2 * _smooth_field(rng, shape, 24)
    vh_db = vv_db - rng.normal(6.5, 0.8) + 1.0 * _smooth_field(rng, shape, 16)
    flood_field = _smooth_field(rng, shape, 4)
    return {"vv_db": vv_db, "vh_db": vh_db, "flood_mask": flood_field > np.quantile(flood_field, 0.6),
            "water_texture": _smooth_field(rng, shape, 30)}


def _write_tif(path: Path, array: np.ndarray, crs: CRS, transform: Affine, compress: bool = False) -> None:
    """Write a one-band GeoTIFF."""
    profile = {"driver": "GTiff", "height": array.shape[0], "width": array.shape[1], "count": 1,
               "dtype": array.dtype.name, "crs": crs, "transform": transform}
    if compress:
        profile.update(compress="deflate", predictor=2)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _zero_plan(index: int, n_dates: int) -> list[tuple[float, bool]]:
    """Per date: (fraction of S1 columns set to no-data, strip on the left side)."""
    plan = [(0.0, True)] * n_dates
    kind = index % len(FLOOD_PATTERNS)
    if index == 0:
        plan[1] = (MOSTLY_ZERO_COLUMNS, True)
    elif kind == 1:
        plan[0] = (THIN_ZERO_COLUMNS, False)
    elif kind == 2:
        plan[2] = (THIN_ZERO_COLUMNS, True)
    return plan


def _flag(value: bool, kind: int) -> bool | str:
    """The FLOODING value as the real files spell it: kind 1 writes all, kind 2 the flooded, as strings."""
    if kind == 1 or (kind == 2 and value):
        return str(value)
    return value


def _uuid(rng: np.random.Generator) -> str:
    digits = "".join(f"{int(v):x}" for v in rng.integers(0, 16, size=32))
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _write_s1(rng: np.random.Generator, seq_dir: Path, index: int, grids: dict) -> list[dict]:
    """Write the S1 images of one sequence; return their JSON entries in chronological order."""
    kind = index % len(FLOOD_PATTERNS)
    pattern = FLOOD_PATTERNS[kind]
    scene = _scene(rng, grids["s1_shape"])
    descending = bool(rng.random() < 0.5)
    entries = []
    for day, flooded, (zeros, left) in zip(_dates(rng, len(pattern)), pattern, _zero_plan(index, len(pattern))):
        product = _product_id(rng, day, descending)
        lin = _s1_image(rng, scene, flooded, zeros, left)
        for band, name in enumerate(("VH", "VV")):
            _write_tif(seq_dir / f"{product}_corrected_{name}.tif", lin[band], CRS.from_epsg(4326),
                       grids["s1_transform"])
        entries.append({"date": day.isoformat(), "filename": product, "FLOODING": _flag(flooded, kind),
                        "FULL-DATA-COVERAGE": zeros == 0.0,
                        "orbit": "DESCENDING" if descending else "ASCENDING",
                        "url": f"https://scihub.copernicus.eu/dhus/odata/v1/Products('{_uuid(rng)}')/$value"})
    return entries


def _write_s2(rng: np.random.Generator, seq_dir: Path, grids: dict, s1_entries: list[dict],
              flood_start: dt.date | None) -> list[dict]:
    """Write two S2 dates (12 uint16 bands each) on the UTM grid; return their JSON entries."""
    first, last = (dt.date.fromisoformat(s1_entries[i]["date"]) for i in (0, -1))
    offsets = sorted(rng.choice(np.arange((last - first).days + 4), size=2, replace=False))
    entries = []
    for offset in offsets:
        day = first + dt.timedelta(days=int(offset))
        field = _smooth_field(rng, (S2_SIZE, S2_SIZE), 8)
        for b, band in enumerate(S2_BANDS):
            # Reflectance x 10000 as in L2A products; the bands only need to exist and carry the grid.
            values = np.clip(800 + 150 * b + 400 * field, 1, 10000).astype(np.uint16)
            _write_tif(seq_dir / f"S2_{day.isoformat()}_{band}.tif", values, grids["s2_crs"],
                       grids["s2_transform"], compress=True)
        entries.append({"date": day.isoformat(), "filename": f"S2_{day.isoformat()}",
                        "FLOODING": flood_start is not None and day >= flood_start,
                        "FULL-DATA-COVERAGE": True})
    return entries


def _listing(seq: str, geo: dict, entries: list[dict]) -> dict:
    """A sequence's JSON value: general keys, then the numbered entries."""
    value: dict = {"count": len(entries), "folder": seq, "geo": geo}
    value.update({str(k + 1): entry for k, entry in enumerate(entries)})
    return value


def write_sen12flood(out_dir: Path, n_sequences: int, seed: int) -> Path:
    """Write a seeded synthetic SEN12-FLOOD root (see the module docstring for its exact content).

    Args:
        out_dir: folder that receives ``SEN12FLOOD/`` (created if needed; the root must not exist yet).
        n_sequences: number of sequence folders (>= 1); sequence ``i`` follows ``FLOOD_PATTERNS[i % 4]``.
        seed: seed of the ``numpy.random.Generator`` of each sequence (``[seed, i]``), so the first
            sequences do not change when ``n_sequences`` grows.

    Returns:
        The root folder ``out_dir/SEN12FLOOD``.
    """
    if n_sequences < 1:
        raise ConfigError(f"n_sequences must be >= 1 for a SEN12-FLOOD root, got {n_sequences}")
    root = Path(out_dir) / "SEN12FLOOD"
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} already exists and is not empty; choose a new output folder")
    s1_list, s2_list = {}, {}
    for index in range(n_sequences):
        rng = np.random.default_rng([seed, index])
        seq = f"{index + 1:04d}"
        seq_dir = root / seq
        seq_dir.mkdir(parents=True)
        grids = _grids(rng)
        s1_entries = _write_s1(rng, seq_dir, index, grids)
        pattern = FLOOD_PATTERNS[index % len(FLOOD_PATTERNS)]
        flood_start = next((dt.date.fromisoformat(e["date"]) for e, f in zip(s1_entries, pattern) if f), None)
        s2_entries = _write_s2(rng, seq_dir, grids, s1_entries, flood_start)
        if index % len(FLOOD_PATTERNS) == 1:
            # Real listings are not always in date order: key "1" gets the last date here.
            s1_entries = s1_entries[-1:] + s1_entries[:-1]
        s1_list[seq] = _listing(seq, grids["geo"], s1_entries)
        s2_list[seq] = _listing(seq, grids["geo"], s2_entries)
    (root / "S1list.json").write_text(json.dumps(s1_list, indent=1))
    (root / "S2list.json").write_text(json.dumps(s2_list, indent=1))
    return root
