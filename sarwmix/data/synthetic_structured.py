"""Structured synthetic Sentinel-1 scenes: land cover with the spatial structure that tells it apart.

``sarwmix.data.synthetic`` draws a Voronoi mosaic of fields whose classes differ mostly in their backscatter
levels; this module keeps those levels (the class table there) and draws inside each cover the structure a
radar sees in real land cover:

- urban fabric and industrial units: street grids (dark streets, per-class block sizes) with bright
  double-bounce edges and point scatterers, large bright roofs for industrial units;
- arable land, pastures, complex cultivation: parcels (class-dependent sizes) with oriented row texture
  (stripes of per-parcel direction and period), hedgerows between small parcels;
- permanent crops: vine rows, or tree crowns on a lattice (orchards, olive groves);
- forests: clumpy canopy texture, fine for coniferous, coarse for broad-leaved, both for mixed;
- water: smooth dark interiors with sharp edges; rivers as thin meandering bands, lakes as blobs drawn over
  the other covers; wetlands as dark pools in vegetation.

Covers whose real backscatter overlaps share their first-order statistics here (``LEVEL_GROUPS``): every
cover of a group takes the group's level, field spread and texture (sampling-weighted means of its members'
class-table rows), and its structure map is de-meaned and scaled to the group's standard deviation
(``GROUP_STRUCTURE_STD``). So the dB histogram of a patch tells which groups are present (built-up, open
fields, woody vegetation, wetlands, water; a cover in no group, such as beaches, keeps its own row) but not
which covers of a group: that takes the spatial structure (street grids against scattered roofs, rows
against plain parcels, fine against coarse canopy, thin rivers against lakes against wind-streaked sea).
Labels are the covers present on at least ``MIN_COVER_FRACTION`` of the final map.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

MIN_COVER_FRACTION = 0.01
# Covers drawn as shapes over the mosaic (when the patch holds another cover), not as mosaic cells.
RIVER, LAKE = "Water courses", "Water bodies"
# Scale of the generic field texture in structured scenes: the structure adds within-window variance, so
# the generic texture is weaker than in the mosaic (realism checked by tests).
STRUCTURED_TEXTURE_SCALE = 0.45
# Looks of the speckle in structured scenes: more than the mosaic's 6 for the same reason; together they
# give a median ENL in 7x7 windows inside the real range.
STRUCTURED_LOOKS = 8.0
# Structure is weaker in VH (lower signal over the noise floor); this also keeps the VH-VV correlation of
# the patches inside the real range.
VH_GAIN = 0.85
# Smaller water areas (thin rivers, lakes inside other covers) make structured scenes ~0.45 dB brighter on
# average than mosaics (measured over 300 patches); this shift gives both the same mean level.
LEVEL_SHIFT_DB = -0.45

Renderer = Callable[[np.random.Generator, int, np.ndarray], np.ndarray]


def gaussian_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian random field with a Gaussian correlation of ``sigma`` pixels (periodic, FFT).

    Returns:
        float32 array (size, size), mean ~0, std 1.
    """
    white = rng.standard_normal((size, size))
    freq = np.fft.fftfreq(size)
    k2 = freq[:, None] ** 2 + freq[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2.0 * (np.pi * sigma) ** 2 * k2)).real
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row / column coordinates, float32 (size, size) each."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return rows, cols


def _rotated(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) of every pixel in a frame rotated by ``angle`` radians, float32 (size, size)."""
    rows, cols = _grid(size)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return cols * c + rows * s, -cols * s + rows * c


def parcels(rng: np.random.Generator, size: int, mean_side: float) -> np.ndarray:
    """Voronoi parcel index per pixel, about ``(size / mean_side)^2`` parcels: int (size, size)."""
    n = int(np.clip(round((size / mean_side) ** 2), 2, 150))
    centres = rng.uniform(0, size, (n, 2)).astype(np.float32)
    rows, cols = _grid(size)
    dist = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    return dist.argmin(axis=0)


def parcel_edges(index: np.ndarray) -> np.ndarray:
    """True on pixels whose right or lower neighbour lies in another parcel: bool (size, size)."""
    edge = np.zeros(index.shape, bool)
    edge[:, :-1] |= index[:, 1:] != index[:, :-1]
    edge[:-1] |= index[1:] != index[:-1]
    return edge


def render_urban(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Street grid: p = (block side px, street width px, street dB, point density, point dB, roof spread dB)."""
    block, street, street_db, density, point_db, roof = p
    block = block * rng.uniform(0.8, 1.2)
    u, v = _rotated(size, rng.uniform(0, np.pi / 2))
    u, v = u + rng.uniform(0, block), v + rng.uniform(0, block)
    fu, fv = np.mod(u, block), np.mod(v, block)
    out = np.zeros((size, size), np.float32)
    # One roof level per block (industrial: metal roofs of very different brightness).
    ids = (np.floor(u / block) * 7919 + np.floor(v / block)).astype(np.int64)
    out += (rng.standard_normal(4096).astype(np.float32) * roof)[ids % 4096]
    # Double bounce: the building wall facing the street, one or two pixels after each street.
    wall = ((fu >= street) & (fu < street + 1.5)) | ((fv >= street) & (fv < street + 1.5))
    out[wall] += point_db * 0.6
    points = rng.random((size, size)) < density
    out[points] += point_db
    out[(fu < street) | (fv < street)] = street_db
    return out


def render_parcels(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Fields with row texture: p = (parcel side px, stripe probability, period lo, period hi, stripe dB,
    parcel spread dB, hedge dB)."""
    side, p_stripes, lo, hi, amp, spread, hedge = p
    index = parcels(rng, size, side)
    n = int(index.max()) + 1
    angle = rng.uniform(0, np.pi, n).astype(np.float32)[index]
    period = rng.uniform(lo, hi, n).astype(np.float32)[index]
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[index]
    striped = (rng.random(n) < p_stripes)[index]
    rows, cols = _grid(size)
    wave = np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period + phase)
    out = (rng.standard_normal(n).astype(np.float32) * spread)[index]
    out += np.where(striped, amp * np.tanh(2.0 * wave), 0.0).astype(np.float32)
    if hedge:
        out[parcel_edges(index)] += hedge
    return out


def render_orchard(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Tree crowns on a rotated lattice: p = (spacing px, crown radius px, crown dB, parcel side px)."""
    spacing, radius, amp, side = p
    index = parcels(rng, size, side)
    n = int(index.max()) + 1
    angle = rng.uniform(0, np.pi / 2, n).astype(np.float32)[index]
    rows, cols = _grid(size)
    u = cols * np.cos(angle) + rows * np.sin(angle)
    v = -cols * np.sin(angle) + rows * np.cos(angle)
    du = np.mod(u, spacing) - spacing / 2
    dv = np.mod(v, spacing) - spacing / 2
    return (amp * np.exp(-(du**2 + dv**2) / (2 * radius**2))).astype(np.float32)


def render_canopy(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Clumpy crowns: p = (fine sigma px, fine dB, coarse sigma px, coarse dB, cover threshold)."""
    fine_sigma, fine_db, coarse_sigma, coarse_db, threshold = p
    out = np.zeros((size, size), np.float32)
    for sigma, amp in ((fine_sigma, fine_db), (coarse_sigma, coarse_db)):
        if amp:
            field = gaussian_noise(rng, size, sigma)
            # Crowns are bright bumps, gaps between them dark: a soft threshold makes the clumps.
            out += amp * np.tanh(2.0 * (field - threshold))
    return out


def render_pools(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Dark open-water pools in vegetation: p = (sigma px, pool fraction, pool dB, vegetation dB)."""
    sigma, fraction, pool_db, veg_db = p
    field = gaussian_noise(rng, size, sigma)
    pools = field > np.quantile(field, 1 - fraction)
    return np.where(pools, pool_db, veg_db * gaussian_noise(rng, size, 1.5)).astype(np.float32)


def render_smooth(rng: np.random.Generator, size: int, p: np.ndarray) -> np.ndarray:
    """Gentle texture (grassland, sand, sea): p = (sigma px, dB, wave period px, wave dB)."""
    sigma, amp, period, wave_db = p
    out = amp * gaussian_noise(rng, size, sigma)
    if wave_db:  # wind streaks on open water
        u, _ = _rotated(size, rng.uniform(0, np.pi))
        out += wave_db * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    return out.astype(np.float32)


RENDERERS: dict[str, Renderer] = {
    "urban": render_urban, "parcels": render_parcels, "orchard": render_orchard, "canopy": render_canopy,
    "pools": render_pools, "smooth": render_smooth,
}

# Cover -> (renderer, parameters, VV gain, VH gain). Double bounce is a co-polarised (VV) mechanism, volume
# scattering in canopies a cross-polarised (VH) one; row and parcel structure shows in both.
STRUCTURE: dict[str, tuple[str, tuple[float, ...], float, float]] = {
    "Continuous urban fabric": ("urban", (8, 2, -6, 0.04, 9, 1.0), 1.0, 0.8),
    "Discontinuous urban fabric": ("urban", (14, 2, -5, 0.015, 8, 1.5), 1.0, 0.8),
    "Industrial or commercial units": ("urban", (26, 3, -6, 0.006, 10, 4.0), 1.0, 0.8),
    "Non-irrigated arable land": ("parcels", (40, 0.9, 6, 9, 2.5, 2.0, 0), 1.0, 0.9),
    "Permanently irrigated land": ("parcels", (30, 0.9, 4, 6, 2.5, 2.0, 0), 1.0, 0.9),
    "Rice fields": ("parcels", (18, 0.2, 6, 9, 1.5, 4.0, 0), 1.0, 1.0),
    "Vineyards": ("parcels", (22, 1.0, 3.5, 4.5, 3.0, 1.0, 0), 1.0, 0.9),
    "Fruit trees and berry plantations": ("orchard", (6, 1.3, 4.5, 30), 0.8, 1.0),
    "Olive groves": ("orchard", (9, 1.8, 4.5, 40), 0.8, 1.0),
    "Pastures": ("parcels", (36, 0.0, 6, 9, 0.0, 1.5, 0), 1.0, 1.0),
    "Complex cultivation patterns": ("parcels", (11, 0.6, 4, 7, 2.5, 2.5, 4), 1.0, 0.9),
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        ("parcels", (20, 0.4, 5, 8, 2.0, 2.0, 0), 1.0, 0.9),
    "Agro-forestry areas": ("canopy", (0, 0, 3.0, 3.0, 1.2), 0.8, 1.0),
    "Broad-leaved forest": ("canopy", (0, 0, 3.0, 2.5, 0.0), 0.8, 1.0),
    "Coniferous forest": ("canopy", (1.2, 2.5, 0, 0, 0.0), 0.8, 1.0),
    "Mixed forest": ("canopy", (1.2, 1.8, 3.0, 1.8, 0.0), 0.8, 1.0),
    "Natural grassland": ("smooth", (6, 0.8, 1, 0), 1.0, 1.0),
    "Moors and heathland": ("canopy", (0, 0, 1.5, 1.2, 0.0), 1.0, 1.0),
    "Sclerophyllous vegetation": ("canopy", (0, 0, 2.0, 1.5, 0.5), 1.0, 1.0),
    "Transitional woodland/shrub": ("canopy", (0, 0, 2.0, 2.5, 0.6), 0.8, 1.0),
    "Beaches, dunes, sands": ("smooth", (8, 1.0, 12, 1.0), 1.0, 1.0),
    "Sparsely vegetated areas": ("smooth", (3, 1.0, 1, 0), 1.0, 1.0),
    "Inland marshes": ("pools", (3.0, 0.3, -7, 1.0), 1.0, 1.0),
    "Peatbogs": ("pools", (2.0, 0.2, -5, 0.8), 1.0, 1.0),
    "Salt marshes": ("pools", (4.0, 0.4, -8, 1.0), 1.0, 1.0),
    "Water courses": ("smooth", (10, 0.3, 1, 0), 1.0, 1.0),
    "Water bodies": ("smooth", (10, 0.3, 1, 0), 1.0, 1.0),
    "Coastal lagoons": ("smooth", (10, 0.3, 25, 0.6), 1.0, 1.0),
    "Estuaries": ("smooth", (10, 0.4, 20, 0.8), 1.0, 1.0),
    "Sea and ocean": ("smooth", (12, 0.3, 18, 1.2), 1.0, 1.0),
}


# Groups of covers that share their first-order statistics in structured scenes (a cover in no group keeps
# its own class-table row). Real C-band backscatter of the members of a group overlaps by more than the
# field-to-field spread; what tells them apart is geometry and texture.
LEVEL_GROUPS: dict[str, tuple[str, ...]] = {
    "built-up": ("Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units"),
    "open fields": ("Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
                    "Pastures", "Complex cultivation patterns",
                    "Land principally occupied by agriculture, with significant areas of natural vegetation",
                    "Natural grassland", "Sparsely vegetated areas"),
    "woody": ("Fruit trees and berry plantations", "Olive groves", "Agro-forestry areas", "Broad-leaved forest",
              "Coniferous forest", "Mixed forest", "Moors and heathland", "Sclerophyllous vegetation",
              "Transitional woodland/shrub"),
    "wetlands": ("Inland marshes", "Peatbogs", "Salt marshes"),
    "water": ("Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean"),
}
GROUP_OF: dict[str, str] = {name: group for group, names in LEVEL_GROUPS.items() for name in names}
# Standard deviation (dB) of every structure map of a group, about the sampling-weighted mean of its
# members' own structure maps (so the patches keep their texture statistics).
GROUP_STRUCTURE_STD: dict[str, float] = {"built-up": 4.2, "open fields": 2.5, "woody": 1.8, "wetlands": 2.8,
                                         "water": 0.5}


def matched_structure(structure: np.ndarray, name: str) -> np.ndarray:
    """A cover's structure map de-meaned, and scaled to its group's standard deviation when it has a group.

    Args:
        structure: float32 (size, size) structure map of cover ``name`` over the whole patch.
    Returns:
        float32 (size, size), mean 0.
    """
    out = structure - structure.mean()
    group = GROUP_OF.get(name)
    if group is not None:
        out = out * np.float32(GROUP_STRUCTURE_STD[group] / max(float(out.std()), 1e-6))
    return out.astype(np.float32)


def river_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin meandering band across the patch (half-width 2-5 px): bool (size, size)."""
    u, v = _rotated(size, rng.uniform(0, np.pi))
    wavelength = rng.uniform(40, 90)
    meander = rng.uniform(4, 14) * np.sin(2 * np.pi * u / wavelength + rng.uniform(0, 2 * np.pi))
    meander += rng.uniform(1, 5) * np.sin(2 * np.pi * u / (wavelength / 2.7) + rng.uniform(0, 2 * np.pi))
    across = v - np.median(v) - rng.uniform(-0.25, 0.25) * size
    return np.abs(across - meander) < rng.uniform(2.0, 5.0)


def lake_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blob with a wobbly shore (radii 12-35 px): bool (size, size)."""
    rows, cols = _grid(size)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    a, b = rng.uniform(12, 35, 2)
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    du, dv = (cols - cx) * c + (rows - cy) * s, -(cols - cx) * s + (rows - cy) * c
    shore = 1.0 + 0.25 * gaussian_noise(rng, size, 8.0)
    return (du / a) ** 2 + (dv / b) ** 2 < shore
