"""Quicklook of a prediction map: the scene in dB beside the map drawn over it, with a legend.

For a person to look before opening a GIS. Three kinds of map: a class map (one colour per class, the
classes present in the legend), a probability (a colour ramp with its colour bar) and embeddings (their
first three principal components as RGB). matplotlib is imported inside the functions, so importing this
module costs nothing to code that never draws.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

NO_CLASS = 255  # the class map's nodata value


def class_colours(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA (0-255) of classes 0..n-1: matplotlib's tab20, tab20b and tab20c in turn (60 distinct colours)."""
    from matplotlib import colormaps

    table = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return [tuple(int(round(255 * c)) for c in table[k % len(table)]) for k in range(n)]


def stretch(db: np.ndarray) -> np.ndarray:
    """dB (H, W) with NaN for nodata -> [0, 1] between its 2nd and 98th percentiles (NaN stays NaN)."""
    finite = db[np.isfinite(db)]
    if finite.size == 0:
        return db
    lo, hi = np.percentile(finite, [2, 98])
    return np.clip((db - lo) / max(hi - lo, 1e-6), 0, 1)


def pca_rgb(values: np.ndarray) -> np.ndarray:
    """(D, H, W) embeddings (NaN: nodata) -> (H, W, 4) RGBA of their first three principal components."""
    d, h, w = values.shape
    flat = values.reshape(d, -1).T
    ok = np.isfinite(flat).all(1)
    rgba = np.zeros((h * w, 4))
    if ok.sum() >= 2:
        x = flat[ok] - flat[ok].mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        comps = x @ vt[:3].T
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
        lo, hi = np.percentile(comps, [2, 98], axis=0)
        rgba[ok, :3] = np.clip((comps - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
        rgba[ok, 3] = 1.0
    return rgba.reshape(h, w, 4)


def save_quicklook(path: str | Path, scene_db: np.ndarray, map_values: np.ndarray, kind: str,
                   names: Sequence[str], title: str, alpha: float = 0.55) -> Path:
    """Write the quicklook PNG.

    Args:
        scene_db: (H, W) dB of one polarisation (NaN: nodata), decimated to screen size.
        map_values: ``class``: (rows, cols) int class indices (``NO_CLASS``: nodata); ``probability``:
            (rows, cols) in [0, 1] (NaN: nodata); ``embedding``: (D, rows, cols) (NaN: nodata). The map covers
            the same extent as ``scene_db``.
        kind: ``class``, ``probability`` or ``embedding``.
        names: class names (``class``), the name of the probability (``probability``); unused otherwise.
        title: the figure's title (the input and the checkpoint).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    h, w = scene_db.shape
    extent = (0, w, h, 0)
    grey = stretch(scene_db)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5 * h / max(w, 1) + 1.2), squeeze=True)
    for ax in axes:
        ax.imshow(grey, cmap="gray", extent=extent, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("scene, VV (dB)")
    if kind == "class":
        colours = np.array(class_colours(len(names)), float) / 255
        present = [int(k) for k in np.unique(map_values) if k != NO_CLASS]
        rgba = np.zeros((*map_values.shape, 4))
        for k in present:
            rgba[map_values == k] = (*colours[k][:3], alpha)
        axes[1].imshow(rgba, extent=extent, interpolation="nearest")
        handles = [Patch(color=colours[k][:3], label=names[k]) for k in present]
        axes[1].set_title("most probable class")
        fig.legend(handles=handles, loc="lower center", ncol=min(3, max(1, len(handles))), fontsize=8,
                   frameon=False)
    elif kind == "probability":
        shown = np.ma.masked_invalid(map_values)
        im = axes[1].imshow(shown, extent=extent, cmap="viridis", vmin=0, vmax=1, alpha=alpha,
                            interpolation="nearest")
        fig.colorbar(im, ax=axes[1], fraction=0.04, label=f"P({names[0]})")
        axes[1].set_title(f"probability of {names[0]}")
    elif kind == "embedding":
        rgba = pca_rgb(map_values)
        rgba[..., 3] *= alpha
        axes[1].imshow(rgba, extent=extent, interpolation="nearest")
        axes[1].set_title("embeddings: first 3 principal components as RGB")
    else:
        raise ValueError(f"quicklook kind {kind!r}: expected class, probability or embedding")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if kind == "class" else 0, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
