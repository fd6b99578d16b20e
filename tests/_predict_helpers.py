"""Helpers of the scene-prediction tests: seeded synthetic scenes written as GeoTIFFs with a CRS and transform,
and checkpoints in this project's format holding freshly initialised (seeded) models."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine

from modes import MODES
from sarwmix.constants import CHANNELS, DATASET_STATS
from sarwmix.data.synthetic import generate_patch
from tasks import get_task

CRS = "EPSG:32633"
ORIGIN = Affine(10.0, 0.0, 400_000.0, 0.0, -10.0, 5_300_000.0)  # 10 m pixels, north up


def scene_db(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic scene of land-cover fields: float32 (2, height, width) dB [VH, VV], deterministic in seed."""
    side = max(height, width)
    return generate_patch(seed, size=side)[0][:, :height, :width].copy()


def write_scene(path: Path, sar_db: np.ndarray, *, order: Sequence[str] = CHANNELS, describe: bool = True,
                transform: Affine = ORIGIN, crs: str | None = CRS, nodata: float | None = None,
                dtype: str = "float32") -> Path:
    """One GeoTIFF holding the bands of ``sar_db`` ([VH, VV]) in ``order``, described with their polarisation."""
    profile = {"driver": "GTiff", "width": sar_db.shape[-1], "height": sar_db.shape[-2], "count": len(order),
               "dtype": dtype, "crs": crs, "transform": transform, "nodata": nodata}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for i, pol in enumerate(order, start=1):
            dst.write(sar_db[CHANNELS.index(pol)].astype(dtype), i)
            if describe:
                dst.set_band_description(i, pol)
    return path


def write_pol_files(folder: Path, sar_db: np.ndarray, **kwargs) -> tuple[Path, Path]:
    """``S1_VV.tif`` and ``S1_VH.tif``, one band each, undescribed (the name tells the polarisation)."""
    return (write_scene(folder / "S1_VV.tif", sar_db, order=("VV",), describe=False, **kwargs),
            write_scene(folder / "S1_VH.tif", sar_db, order=("VH",), describe=False, **kwargs))


def _save(path: Path, model: torch.nn.Module, args: dict) -> Path:
    stats = {"name": "benv1", **DATASET_STATS["benv1"]}
    torch.save({"model": model.state_dict(), "args": args, "stats": stats, "epoch": 0, "format_version": 1}, path)
    return path


def finetuned_checkpoint(path: Path, task: str = "ben", model: str = "mixmim_study", input_size: int = 64,
                         tile_size: int = 32, seed: int = 0) -> Path:
    """A ``main_finetune.py``-format checkpoint of a seeded, untrained model of ``task``."""
    config = SimpleNamespace(model=model, input_size=input_size, tile_size=tile_size, patch_op="avg")
    classes = 2 if task == "sen12flood" else 19
    torch.manual_seed(seed)
    net = get_task(task).finetune_model(config, classes, in_chans=2, drop_path_rate=0.0)
    args = {"task": task, "model": model, "input_size": input_size, "tile_size": tile_size, "patch_op": "avg",
            "channels": list(CHANNELS), "label_set": 19}
    return _save(path, net, args)


def pretrain_checkpoint(path: Path, model: str = "mixmim_study", input_size: int = 64, mode: str = "mixmim",
                        seed: int = 0) -> Path:
    """A ``main_pretrain.py``-format checkpoint of a seeded MixMIM or SimMIM model (decoder and mask token
    included)."""
    torch.manual_seed(seed)
    net = MODES[mode].build(model, input_size, 2)
    args = {"mode": mode, "model": model, "input_size": input_size, "channels": list(CHANNELS)}
    return _save(path, net, args)


def read_map(path: Path) -> tuple[np.ndarray, dict]:
    """(bands, rows, cols) values and the profile, descriptions and tags of an output GeoTIFF."""
    with rasterio.open(path) as src:
        return src.read(), {**src.profile, "descriptions": src.descriptions, "tags": src.tags()}
