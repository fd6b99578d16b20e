"""Seeded synthetic Sentinel-1 patches that look like BigEarthNet-S1.

A patch is a Voronoi mosaic of land-cover "fields" with class-specific VV/VH backscatter, a shared
fine texture, and spatially correlated Gamma speckle applied in linear power, returned in dB with the
channel order ``[VH, VV]``. The class table below is the only place where backscatter levels live.

Command line: ``python -m sarwmix.data.synthetic write --format FORMAT --n N [--seed S] OUT`` writes such
patches in the real on-disk layouts (writers at the end of this module).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.crs import CRS

from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, BEN_43_TO_19, CHANNELS
from sarwmix.data import synthetic_structured as S
from sarwmix.data.bigearthnetv1 import (
    CLOUD_LIST,
    LABELS_JSON_SUFFIX,
    SNOW_LIST,
    V1_FOLDER,
    target_from_names,
    write_zarr_patch,
)
from sarwmix.data.bigearthnetv2 import (
    LMDB_FOLDER,
    METADATA_FILE,
    S1_FOLDER,
    SNOW_CLOUD_FILE,
    BenV2Folder,
    encode_lmdb_value,
)
from sarwmix.data.geotiff import utm_transform, write_band
from sarwmix.data.packed_format import PackedWriter
from sarwmix.data.patches import PatchDataset
from sarwmix.errors import ConfigError, SarwmixError

# Land cover -> (VV dB, VH dB, field-to-field spread dB, fine texture std dB, sampling weight).
# Levels are typical C-band values at ~35 deg incidence: open water dark (specular), urban bright
# (double bounce), forest bright in VH (volume scattering, small VV-VH gap), fields in between.
_COVER: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("Continuous urban fabric", -5.0, -11.5, 2.0, 3.0, 0.2),
    ("Discontinuous urban fabric", -8.0, -14.5, 1.8, 2.6, 0.8),
    ("Industrial or commercial units", -6.5, -13.0, 2.0, 3.0, 0.4),
    ("Non-irrigated arable land", -12.0, -18.5, 2.0, 1.4, 3.0),
    ("Permanently irrigated land", -11.5, -18.0, 2.0, 1.4, 0.2),
    ("Rice fields", -14.0, -21.0, 2.2, 1.4, 0.1),
    ("Vineyards", -10.5, -17.0, 1.5, 1.4, 0.2),
    ("Fruit trees and berry plantations", -10.0, -16.5, 1.5, 1.4, 0.2),
    ("Olive groves", -10.0, -16.5, 1.3, 1.4, 0.2),
    ("Pastures", -12.5, -19.5, 1.8, 1.2, 1.5),
    ("Complex cultivation patterns", -11.5, -18.0, 2.2, 1.6, 1.2),
    ("Land principally occupied by agriculture, with significant areas of natural vegetation",
     -10.5, -17.0, 2.0, 1.6, 1.2),
    ("Agro-forestry areas", -9.5, -16.0, 1.2, 1.3, 0.2),
    ("Broad-leaved forest", -8.5, -14.0, 0.8, 1.1, 1.4),
    ("Coniferous forest", -8.0, -13.5, 0.8, 1.1, 2.0),
    ("Mixed forest", -8.2, -13.7, 0.8, 1.1, 1.8),
    ("Natural grassland", -12.0, -19.0, 1.5, 1.3, 0.3),
    ("Moors and heathland", -11.0, -18.0, 1.3, 1.3, 0.2),
    ("Sclerophyllous vegetation", -10.0, -16.5, 1.3, 1.3, 0.2),
    ("Transitional woodland/shrub", -9.5, -15.5, 1.3, 1.3, 1.4),
    ("Beaches, dunes, sands", -16.0, -24.0, 1.5, 1.2, 0.1),
    ("Sparsely vegetated areas", -13.0, -20.0, 1.5, 1.3, 0.1),
    ("Inland marshes", -14.0, -21.5, 1.5, 1.5, 0.2),
    ("Peatbogs", -13.5, -20.5, 1.2, 1.2, 0.3),
    ("Salt marshes", -14.5, -22.0, 1.5, 1.5, 0.05),
    ("Water courses", -19.0, -28.0, 1.5, 1.0, 0.2),
    ("Water bodies", -21.0, -31.0, 1.5, 0.8, 0.5),
    ("Coastal lagoons", -20.0, -29.5, 1.5, 0.8, 0.05),
    ("Estuaries", -19.0, -28.0, 1.5, 1.0, 0.05),
    ("Sea and ocean", -21.0, -31.0, 2.0, 0.8, 0.4),
)
_COVER_WEIGHTS = np.array([row[5] for row in _COVER]) / sum(row[5] for row in _COVER)
_TABLE = np.array([row[1:5] for row in _COVER])  # (n_covers, 4): vv, vh, spread, texture
# Global scales of the table's field spread and texture, tuned so that the per-patch statistics land on
# the medians measured on real BigEarthNet-S1 patches (checked by tests/test_synthetic.py).
_FIELD_SCALE = 0.8
_TEXTURE_SCALE = 1.3

# Speckle: i.i.d. Gamma intensity smoothed with a [1, 2, 1]/4 separable kernel, which mimics the GRD
# resampling (10 m pixels, ~20 x 22 m resolution). Smoothing multiplies the number of looks by
# 1 / sum(w^2) = (16/6)^2, so the per-pixel draw uses L * sum(w^2) looks to end at L after it. L = 6 in
# the speckle alone gives an ENL of ~4.6 in 7x7 windows (real: 4.7), as the texture adds variance there.
_LOOKS = 6.0
_KERNEL_1D = np.array([0.25, 0.5, 0.25])
_SUM_W2 = float((_KERNEL_1D**2).sum() ** 2)


def _smooth_noise(rng: np.random.Generator, count: int, size: int, coarse: int) -> np.ndarray:
    """Smooth random fields by bilinear upsampling of a coarse unit Gaussian grid.

    Returns:
        float32 array (count, size, size); correlation length about size / coarse pixels.
    """
    grid = rng.standard_normal((count, coarse + 1, coarse + 1), dtype=np.float32)
    # Pixel-centre aligned positions on the coarse grid; gathers instead of a matmul, because small
    # BLAS calls are slow when threads are contended.
    pos = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0, coarse - 1)
    lo = pos.astype(int)
    frac = (pos - lo).astype(np.float32)
    rows = grid[:, lo] * (1 - frac)[:, None] + grid[:, lo + 1] * frac[:, None]
    return rows[:, :, lo] * (1 - frac) + rows[:, :, lo + 1] * frac


def _voronoi_cells(rng: np.random.Generator, size: int, n_cells: int) -> np.ndarray:
    """Cell index per pixel of a Voronoi mosaic with wobbly (noise-warped) boundaries.

    Returns:
        int array (size, size) with values in [0, n_cells).
    """
    centres = rng.uniform(0, size, (n_cells, 2, 1, 1)).astype(np.float32)
    warp = (_smooth_noise(rng, 2, size, 5) * (size / 12)).astype(np.float32)
    warp[0] += np.arange(size, dtype=np.float32)[:, None]
    warp[1] += np.arange(size, dtype=np.float32)[None, :]
    dist = np.square(warp[None, 0] - centres[:, 0]) + np.square(warp[None, 1] - centres[:, 1])
    return dist.argmin(axis=0)


def _correlated_speckle(rng: np.random.Generator, size: int, looks: float = _LOOKS) -> np.ndarray:
    """Unit-mean multiplicative speckle, marginal ~Gamma(L=looks), correlated over ~2 pixels.

    Returns:
        float32 array (2, size, size), independent between channels.
    """
    shape = looks * _SUM_W2
    raw = rng.standard_gamma(shape, (2, size + 2, size + 2), dtype=np.float32) / np.float32(shape)
    k = _KERNEL_1D.astype(np.float32)
    rows = k[0] * raw[:, :-2] + k[1] * raw[:, 1:-1] + k[2] * raw[:, 2:]
    return k[0] * rows[:, :, :-2] + k[1] * rows[:, :, 1:-1] + k[2] * rows[:, :, 2:]


SCENES: tuple[str, ...] = ("mosaic", "structured")


def generate_patch(seed: int, size: int = 120, scene: str = "mosaic") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One synthetic Sentinel-1 patch, deterministic in ``seed``.

    Args:
        seed: any non-negative integer; the same seed always gives the same patch.
        size: side length in pixels (BigEarthNet patches are 120).
        scene: ``mosaic`` (fields that differ in backscatter level and fine texture) or ``structured``
            (the same levels plus the spatial structure of each cover: street grids, parcels with rows,
            canopy, rivers and lakes; ``sarwmix.data.synthetic_structured``).

    Returns:
        sar_db: float32 (2, size, size), channel order [VH, VV], dB (roughly -35 .. +5).
        target: float32 (19,) multi-hot in ``BEN_19_CLASSES`` order.
        labels: the 43-class names present, in ``BEN_43_CLASSES`` order.
    """
    if scene not in SCENES:
        raise ConfigError(f"synthetic scene {scene!r}: expected one of {SCENES}")
    rng = np.random.default_rng(seed)
    if scene == "structured":
        vh, vv, present = _structured_levels(rng, size)
    else:
        vh, vv, present = _mosaic_levels(rng, size)
    looks = S.STRUCTURED_LOOKS if scene == "structured" else _LOOKS
    sar_db = _speckled_db(rng, vh, vv, looks)
    present = sorted(present, key=BEN_43_CLASSES.index)
    target = np.zeros(len(BEN_19_CLASSES), np.float32)
    for name in present:
        target[BEN_43_TO_19[BEN_43_CLASSES.index(name)]] = 1.0
    return sar_db, target, present


def _speckled_db(rng: np.random.Generator, vh: np.ndarray, vv: np.ndarray, looks: float = _LOOKS) -> np.ndarray:
    """Noise-free VH and VV dB maps (size, size) -> float32 (2, size, size) dB [VH, VV] with speckle applied in
    linear power."""
    power = 10.0 ** (np.stack([vh, vv]) / 10.0) * _correlated_speckle(rng, vh.shape[-1], looks)
    return (10.0 * np.log10(np.maximum(power, 1e-5))).astype(np.float32)


COVERS: tuple[str, ...] = tuple(row[0] for row in _COVER)  # the 43-class names the generator draws


def cover_patch(cover: str, seed: int, size: int = 120) -> np.ndarray:
    """A patch of one land cover only: one field of ``cover`` with the level, fine texture and speckle a
    mosaic patch gives it (``generate_patch``), deterministic in ``seed``. Test scenes of known covers are
    laid out from such patches.

    Args:
        cover: one of ``COVERS`` (a 43-class name, e.g. ``"Sea and ocean"``).
        size: side in pixels (any size: a field of a whole scene).
    Returns:
        float32 (2, size, size), channel order [VH, VV], dB.
    """
    if cover not in COVERS:
        raise ConfigError(f"cover {cover!r}: expected one of the synthetic covers {list(COVERS)}")
    rng = np.random.default_rng(seed)
    field = np.zeros((size, size), dtype=int)
    vh, vv, table = _field_levels(rng, np.array([COVERS.index(cover)]), field)
    tex = _smooth_noise(rng, 3, size, max(size // 3, 1)) * (_TEXTURE_SCALE * table[0, 3])
    return _speckled_db(rng, vh + tex[0] + 0.5 * tex[2], vv + tex[0] + 0.5 * tex[1])


def _draw_classes(rng: np.random.Generator) -> np.ndarray:
    """1-4 distinct cover indices of one patch, drawn with the class table's sampling weights."""
    n_classes = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
    return rng.choice(len(_COVER), size=n_classes, replace=False, p=_COVER_WEIGHTS)


def _grouped_table() -> np.ndarray:
    """Class-table rows (vv, vh, spread, texture) of the structured scenes: (n_covers, 4). A cover of one of
    ``LEVEL_GROUPS`` takes the sampling-weighted mean row of its group; any other cover keeps its own row."""
    names = [row[0] for row in _COVER]
    out = _TABLE.copy()
    for members in S.LEVEL_GROUPS.values():
        idx = [names.index(name) for name in members]
        out[idx] = np.average(_TABLE[idx], axis=0, weights=_COVER_WEIGHTS[idx])
    return out


_GROUPED_TABLE = _grouped_table()  # built once: every structured patch reads it


def _field_levels(rng: np.random.Generator, field_cover: np.ndarray, field_id: np.ndarray,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free VH and VV dB maps of fields with covers ``field_cover`` (n_fields,) laid out as
    ``field_id`` (size, size), and the class-table rows of the fields (n_fields, 4). ``rows``: the class
    table (n_covers, 4) of (vv, vh, spread, texture) to use instead of the module's own."""
    table = (_TABLE if rows is None else rows)[field_cover]
    n_fields = len(field_cover)
    field = rng.standard_normal(n_fields) * table[:, 2] * _FIELD_SCALE  # one offset per field, both channels
    # Per-patch offsets: incidence angle / moisture (both channels) and a small gap change.
    offset = rng.normal(-1.2, 2.5)
    gap_jitter = rng.normal(0.3, 0.6)
    # VV reacts more to soil moisture and roughness than VH, hence the larger field contrast.
    vv = (table[:, 0] + 1.3 * field)[field_id] + offset
    vh = (table[:, 1] + field + rng.normal(0, 0.5, n_fields))[field_id] + offset + gap_jitter
    return vh, vv, table


def _mosaic_levels(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """VH and VV dB (size, size) of a Voronoi mosaic of fields before speckle, and the covers present."""
    classes = _draw_classes(rng)
    n_classes = len(classes)
    n_cells = int(rng.integers(max(3, n_classes), 14))
    cell_class = np.concatenate([classes, rng.choice(classes, n_cells - n_classes)])
    cell_class = cell_class[rng.permutation(n_cells)]
    cells = _voronoi_cells(rng, size, n_cells)
    vh, vv, table = _field_levels(rng, cell_class, cells)
    # Fine texture (crowns, furrows, buildings), mostly shared between channels.
    tex = _smooth_noise(rng, 3, size, size // 3) * (_TEXTURE_SCALE * table[:, 3])[cells]
    return vh + tex[0] + 0.5 * tex[2], vv + tex[0] + 0.5 * tex[1], {_COVER[i][0] for i in classes}


def _structured_levels(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """VH and VV dB (size, size) of a structured scene before speckle, and the covers present.

    Fields of a Voronoi mosaic (fewer and larger than in the mosaic scene, so structure has room), rivers
    and lakes drawn over them, each cover's structure map added inside its area.
    """
    classes = [int(i) for i in _draw_classes(rng)]
    overlay = [i for i in classes if _COVER[i][0] in (S.RIVER, S.LAKE)]
    base = [i for i in classes if i not in overlay] or classes
    overlay = [i for i in overlay if i not in base]
    n_cells = int(rng.integers(max(2, len(base)), 9))
    cell_class = np.array(base + list(rng.choice(base, n_cells - len(base))))[rng.permutation(n_cells)]
    field_id = _voronoi_cells(rng, size, n_cells)
    cover = cell_class[field_id]
    for k, i in enumerate(overlay):
        mask = (S.river_mask if _COVER[i][0] == S.RIVER else S.lake_mask)(rng, size)
        cover[mask], field_id[mask] = i, n_cells + k
    vh, vv, table = _field_levels(rng, np.concatenate([cell_class, overlay]).astype(int), field_id,
                                  _GROUPED_TABLE)
    tex = _smooth_noise(rng, 3, size, size // 3) * (_TEXTURE_SCALE * S.STRUCTURED_TEXTURE_SCALE
                                                     * table[:, 3])[field_id]
    vh = vh + tex[0] + 0.5 * tex[2] + S.LEVEL_SHIFT_DB
    vv = vv + tex[0] + 0.5 * tex[1] + S.LEVEL_SHIFT_DB
    present = set()
    for i in np.unique(cover):
        name = _COVER[int(i)][0]
        kind, params, gain_vv, gain_vh = S.STRUCTURE[name]
        where = cover == i
        structure = S.RENDERERS[kind](rng, size, np.array(params, dtype=np.float32))
        structure = S.matched_structure(structure, name)[where]  # keeps the group's mean level
        vv[where] += gain_vv * structure
        vh[where] += S.VH_GAIN * gain_vh * structure
        if where.mean() >= S.MIN_COVER_FRACTION:
            present.add(name)
    return vh, vv, present


class SyntheticS1(PatchDataset):
    """The built-in data set: ``n`` generated patches, resized to ``input_size``, raw dB.

    Item ``i`` comes from seed ``seed * 1_000_003 + i``, so it does not depend on the worker that
    draws it. No flips here: the training engine flips on the device, seeded per step.

    Args:
        n: number of patches.
        input_size: side of the returned tensors (bilinear resize from ``patch_size``).
        seed: data-set seed (use different seeds for train / val / test).
        patch_size: side of the generated patch (120 like BigEarthNet).
        channels: subset and order of ``CHANNELS`` to return, e.g. ``("VV",)``.
        scene: ``mosaic`` or ``structured`` (see ``generate_patch``).
    """

    def __init__(self, n: int = 512, input_size: int = 128, seed: int = 0, patch_size: int = 120,
                 channels: tuple[str, ...] = CHANNELS, scene: str = "mosaic") -> None:
        if scene not in SCENES:
            raise ConfigError(f"synthetic scene {scene!r}: expected one of {SCENES}")
        super().__init__(input_size=input_size, channels=channels, stats_name="benv1", label_set=19)
        self.n, self.seed, self.patch_size, self.scene = n, seed, patch_size, scene
        self.names = [f"synthetic_{seed}_{i}" for i in range(n)]

    def patch_seed(self, i: int) -> int:
        """Seed of item ``i`` (independent of the worker that draws it)."""
        return self.seed * 1_000_003 + i

    def read_patch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-size patch ``i``: (sar_db float32 (2, patch_size, patch_size), target float32 (19,))."""
        sar_db, target, _ = generate_patch(self.patch_seed(i), self.patch_size, self.scene)
        return sar_db, target


# ---------------------------------------------------------------------------------------------------
# Writers: synthetic patches in the real on-disk layouts (BigEarthNet v1 and v2).

# (S2 tile, country, UTM EPSG, upper-left easting / northing of the tile) for plausible coordinates.
_TILES = (
    ("33UUP", "Austria", 32633, 399960.0, 5400000.0), ("31UFS", "Belgium", 32631, 600000.0, 5700000.0),
    ("35VNL", "Finland", 32635, 499980.0, 6800040.0), ("29UPV", "Ireland", 32629, 600000.0, 5900040.0),
    ("29TNE", "Portugal", 32629, 499980.0, 4500000.0), ("32TLT", "Switzerland", 32632, 300000.0, 5200020.0),
)


def _stamp(time: np.datetime64) -> str:
    """``2017-06-13T16:50:43`` -> ``20170613T165043`` (the time stamp inside product names)."""
    return str(time)[:19].replace("-", "").replace(":", "")


def _scene(rng: np.random.Generator, index: int) -> dict:
    """One S1 acquisition over one S2 tile, with the names of both products."""
    tile, country, epsg, x0, y0 = _TILES[int(rng.integers(len(_TILES)))]
    # Evening S1 pass (16-17 h UTC) and the morning S2 pass of the same day (~10 h UTC).
    s1_start = (np.datetime64("2017-06-01T16:00:00") + np.timedelta64(int(rng.integers(365)), "D")
                + np.timedelta64(int(rng.integers(7200)), "s"))
    s2_start = s1_start - np.timedelta64(6 * 3600 + int(rng.integers(1800)), "s")
    s1_product = f"{rng.choice(['S1A', 'S1B'])}_IW_GRDH_1SDV_{_stamp(s1_start)}"
    s2_prefix = f"{rng.choice(['S2A', 'S2B'])}_MSIL2A_{_stamp(s2_start)}"
    source = (f"{s1_product}_{_stamp(s1_start + np.timedelta64(25, 's'))}_{int(rng.integers(1, 40000)):06d}"
              f"_{int(rng.integers(2**24)):06X}_{int(rng.integers(2**16)):04X}")
    return {"tile": tile, "country": country, "epsg": epsg, "x0": x0, "y0": y0, "s1_product": s1_product,
            "s2_prefix": s2_prefix, "orbit": 22 + index % 100, "scene_source": source,
            "acquisition_time": str(s1_start)[:19]}


def patch_records(n: int, seed: int) -> list[dict]:
    """Names, geography, split and flags of ``n`` synthetic BigEarthNet patches (40 per scene).

    Returns:
        one dict per patch: ``s1_name``, ``s2_name`` (v1 S2 name), ``patch_id`` (v2 S2 name), ``country``,
        ``epsg``, ``ulx``, ``uly``, ``scene_source``, ``acquisition_time``, ``split`` (train / val /
        test; v1 lists leave flagged patches out), ``snow``, ``cloud``, ``seed`` (of ``generate_patch``).
    """
    rng = np.random.default_rng([seed, 7])
    records: list[dict] = []
    while len(records) < n:
        scene = _scene(rng, len(records) // 40)
        # Patch grid cells of the 109.8 km tile (90 x 90 patches of 1.2 km), distinct within a scene.
        for cell in rng.choice(90 * 90, size=min(40, n - len(records)), replace=False):
            row, col = divmod(int(cell), 90)
            snow, cloud = (bool(flag) for flag in rng.random(2) < (0.05, 0.03))
            split = str(rng.choice(["train", "val", "test"], p=[0.5, 0.25, 0.25]))
            records.append({
                "s1_name": f"{scene['s1_product']}_{scene['tile']}_{row}_{col}",
                "s2_name": f"{scene['s2_prefix']}_{row}_{col}",
                # v2 re-gridded the S2 patches, so its patch_id has its own row / col.
                "patch_id": f"{scene['s2_prefix']}_N9999_R{scene['orbit']:03d}_T{scene['tile']}_"
                            f"{(row + 7) % 90}_{col}",
                "country": scene["country"], "epsg": scene["epsg"], "ulx": scene["x0"] + 1200.0 * col,
                "uly": scene["y0"] - 1200.0 * row, "scene_source": scene["scene_source"],
                "acquisition_time": scene["acquisition_time"], "split": split, "snow": snow, "cloud": cloud,
                "seed": seed * 1_000_003 + len(records),
            })
    return records


def _write_lines(path: Path, rows: list[str]) -> None:
    """Text list with CRLF line endings, like the official BigEarthNet lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{row}\r\n" for row in rows).encode())


def write_v1_lists(out: Path, records: list[dict]) -> None:
    """Official-style lists: ``splits/<split>.csv`` (S2 names), ``splits/<split>_s2_s1.csv`` (two columns)
    and the snow / cloud exclusion lists (S2 names) in ``out``."""
    for split in ("train", "val", "test"):
        rows = [r for r in records if r["split"] == split and not (r["snow"] or r["cloud"])]
        _write_lines(out / "splits" / f"{split}.csv", [r["s2_name"] for r in rows])
        _write_lines(out / "splits" / f"{split}_s2_s1.csv", [f"{r['s2_name']},{r['s1_name']}" for r in rows])
    _write_lines(out / SNOW_LIST, [r["s2_name"] for r in records if r["snow"]])
    _write_lines(out / CLOUD_LIST, [r["s2_name"] for r in records if r["cloud"]])


def v1_labels_json(record: dict, labels: list[str]) -> dict:
    """The ``<patch>_labels_metadata.json`` content of a record (every key of the real files)."""
    ulx, uly = record["ulx"], record["uly"]
    return {"labels": labels,
            "coordinates": {"ulx": ulx, "uly": uly, "lrx": ulx + 1200.0, "lry": uly - 1200.0},
            "projection": CRS.from_epsg(record["epsg"]).to_wkt(),
            "corresponding_s2_patch": record["s2_name"], "scene_source": record["scene_source"],
            "acquisition_time": record["acquisition_time"]}


def _patches(records: list[dict], scene: str = "mosaic"):
    """Yield (record, sar_db, 43-class label names) for each record."""
    for record in records:
        sar_db, _, labels = generate_patch(record["seed"], scene=scene)
        yield record, sar_db, labels


def write_benv1(out: Path, n: int, seed: int = 0, scene: str = "mosaic") -> Path:
    """BigEarthNet-S1 v1.0 folder layout + labels JSON + split and exclusion lists under ``out``.

    Returns:
        the patch folder ``out/BigEarthNet-S1-v1.0``.
    """
    root = Path(out) / V1_FOLDER
    records = patch_records(n, seed)
    for record, sar_db, labels in _patches(records, scene):
        folder = root / record["s1_name"]
        transform = utm_transform(record["ulx"], record["uly"])
        for band, pixels in zip(CHANNELS, sar_db, strict=True):
            write_band(folder / f"{record['s1_name']}_{band}.tif", pixels, f"EPSG:{record['epsg']}", transform)
        meta = v1_labels_json(record, labels)
        (folder / f"{record['s1_name']}{LABELS_JSON_SUFFIX}").write_text(json.dumps(meta, indent=1))
    write_v1_lists(Path(out), records)
    return root


def write_benv1_zarr(out: Path, n: int, seed: int = 0, zarr_format: int = 3, scene: str = "mosaic") -> Path:
    """The BigEarthNet v1 Zarr container (``out/BigEarthNet-S1-v1.0.zarr``) + split and exclusion lists."""
    import zarr


    path = Path(out) / f"{V1_FOLDER}.zarr"
    patches = zarr.open_group(str(path), mode="w", zarr_format=zarr_format).require_group("sentinel1")
    records = patch_records(n, seed)
    for record, sar_db, labels in _patches(records, scene):
        write_zarr_patch(patches, record["s1_name"], sar_db, v1_labels_json(record, labels))
    write_v1_lists(Path(out), records)
    return path


def write_v2_metadata(out: Path, records: list[dict], labels19: list[list[str]]) -> None:
    """``metadata.parquet`` (unflagged patches) and the snow/cloud parquet (flagged ones) in ``out``."""
    table = pd.DataFrame({
        "patch_id": [r["patch_id"] for r in records], "labels": labels19,
        "split": [{"val": "validation"}.get(r["split"], r["split"]) for r in records],
        "country": [r["country"] for r in records], "s1_name": [r["s1_name"] for r in records],
        "s2v1_name": [r["s2_name"] for r in records],
        "contains_seasonal_snow": [r["snow"] for r in records],
        "contains_cloud_or_shadow": [r["cloud"] for r in records],
    })
    flagged = table["contains_seasonal_snow"] | table["contains_cloud_or_shadow"]
    Path(out).mkdir(parents=True, exist_ok=True)
    table[~flagged].to_parquet(Path(out) / METADATA_FILE, index=False)
    table[flagged].to_parquet(Path(out) / SNOW_CLOUD_FILE, index=False)


def _v2_labels(labels43: list[str]) -> list[str]:
    """19-class names (the v2 ``labels`` column) of a list of 43-class names, in 19-class order."""
    merged = {BEN_43_TO_19[BEN_43_CLASSES.index(name)] for name in labels43} - {None}
    return [BEN_19_CLASSES[j] for j in sorted(merged)]


def write_benv2(out: Path, n: int, seed: int = 0, scene: str = "mosaic") -> Path:
    """BigEarthNet v2 S1 folder layout (``out/BigEarthNet-S1/<product>/<patch>/``) + metadata parquet files."""
    records, labels19 = patch_records(n, seed), []
    for record, sar_db, labels in _patches(records, scene):
        folder = Path(out) / S1_FOLDER / BenV2Folder.product_folder(record["s1_name"]) / record["s1_name"]
        transform = utm_transform(record["ulx"], record["uly"])
        for band, pixels in zip(CHANNELS, sar_db, strict=True):
            write_band(folder / f"{record['s1_name']}_{band}.tif", pixels, f"EPSG:{record['epsg']}", transform)
        labels19.append(_v2_labels(labels))
    write_v2_metadata(Path(out), records, labels19)
    return Path(out)


def write_benv2_lmdb(out: Path, n: int, seed: int = 0, scene: str = "mosaic") -> Path:
    """The rico-hdl LMDB (``out/BigEarthNet_LMDB``, safetensors values keyed by S1 name) + metadata."""
    import lmdb

    records, labels19 = patch_records(n, seed), []
    Path(out).mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(Path(out) / LMDB_FOLDER), map_size=max(n, 1) * 200_000 + 2**24)
    with env.begin(write=True) as txn:
        for record, sar_db, labels in _patches(records, scene):
            txn.put(record["s1_name"].encode(), encode_lmdb_value(sar_db))
            labels19.append(_v2_labels(labels))
    env.close()
    write_v2_metadata(Path(out), records, labels19)
    return Path(out)


def convert_synthetic(out: str | Path, n: int, seed: int = 0, dtype: str = "float32",
                      shard_size: int = 4096, scene: str = "mosaic") -> Path:
    """Pack ``n`` synthetic patches with the names, splits and flags of ``sarwmix.data.synthetic.patch_records``
    (snow/cloud-flagged ones left out, as in the v1 lists), 43-class labels, BENv1 statistics; ``scene``
    as in ``sarwmix.data.synthetic.generate_patch``."""
    writer = PackedWriter(out, dtype, shard_size)
    for record in patch_records(n, seed):
        if record["snow"] or record["cloud"]:
            continue
        sar_db, _, labels = generate_patch(record["seed"], scene=scene)
        writer.add(record["s1_name"], record["split"], sar_db, target_from_names(labels, 43, "synthetic"))
    source = f"synthetic:n={n},seed={seed}" + (f",scene={scene}" if scene != "mosaic" else "")
    return writer.close(stats="benv1", source=source)


def main(argv: list[str] | None = None) -> int:
    """``python -m sarwmix.data.synthetic write --format FORMAT --n N [--seed S] OUT``.

    The formats are the data sets of ``sarwmix.data.datasets.DATASETS`` that have a writer; the table is read
    here, in the command line only (it lists this module's writers, so a module-level import would be a cycle).
    """
    from sarwmix.data.datasets import dataset_spec, writable_formats, write_format

    parser = ArgumentParser(prog="python -m sarwmix.data.synthetic",
                            description="Write seeded synthetic Sentinel-1 data in a real layout.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write N patches (sen12flood: N sequences) into OUT")
    write.add_argument("--format", required=True, choices=writable_formats())
    write.add_argument("--n", type=count(1), default=64)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--scene", default="mosaic", choices=SCENES,
                       help="mosaic (levels and fine texture) or structured (plus each cover's spatial structure)")
    write.add_argument("out")
    args = parser.parse_args(argv)
    try:
        path = write_format(args.format, Path(args.out), args.n, args.seed, args.scene)
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = dataset_spec(args.format)
    print(f"wrote {args.n} synthetic {args.format} {'sequences' if spec.pairs else 'patches'} to {path}"
          + spec.write_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
