"""Masked reconstruction error of pretraining checkpoints on real Sentinel-1 patches, against two baselines.

Usage::

    python -m analysis.real_s1_check out/mixmim/checkpoint.pth out/simmim/checkpoint.pth --out figures/real_s1

Reads the real patches in place (``--data``, default ``$SARWMIX_REAL_S1``; they are not part of the repository): every
BigEarthNet v2 patch folder (``*_VH.tif``, ``*_VV.tif``, 120x120) and every SSL4EO-S12 acquisition
(``VH.tif``, ``VV.tif``, any size, cut into non-overlapping 120x120 crops). Each patch is resized to the
checkpoint's input size and normalised with its statistics, exactly as in pretraining (no flips).

Per checkpoint, with one seeded mask shared by the three predictors (MixMIM: one even batch, since its
mixing pairs image i with image B-1-i), the model's own loss on masked patches, unweighted and weighted
(``--weighting``, the same map for every checkpoint so rows compare), of:

- ``model``: the checkpoint;
- ``random_init``: the same architecture, freshly initialised (seeded);
- ``mean``: each masked patch predicted by the per-channel mean of the visible pixels of its image, in the
  target space of the loss (MixMIM with ``norm_pix_loss`` standardises each target patch, whose best
  constant is 0).

Writes ``real_s1_check.csv`` (checkpoint, mode, model, predictor, loss_unweighted, loss_weighted,
n_patches) and ``real_s1_check.md``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import pretraining
from models_mixmim import MixMIM
from models_simmim import SimMIM
from modes import get_mode
from sarwmix.cli import ArgumentParser
from sarwmix.constants import CHANNELS
from sarwmix.data.geotiff import read_band
from sarwmix.data.patches import resize_db
from sarwmix.errors import CheckpointError, DataError
from sarwmix.sar.weighting import WEIGHTINGS, WeightSpec, weight_map
from util.augment import normalize
from util.checkpoint import check_keys, check_shapes, checkpoint_args, load_checkpoint, model_state
from util.config import RunConfig
from util.masking import pixel_mask

log = logging.getLogger("sarwmix")
DATA_ENV = "SARWMIX_REAL_S1"  # the folder of the real samples, where --data is not given
CROP = 120
PREDICTORS: tuple[str, ...] = ("model", "random_init", "mean")


def _pair(vh: Path, vv: Path) -> np.ndarray:
    """(2, H, W) float32 dB in ``CHANNELS`` order from the two band files."""
    bands = {"VH": read_band(vh, expected_shape=None), "VV": read_band(vv, expected_shape=None)}
    if bands["VH"].shape != bands["VV"].shape:
        raise DataError(f"{vh.parent}: VH {bands['VH'].shape} and VV {bands['VV'].shape} differ in size")
    return np.stack([bands[c] for c in CHANNELS])


def _crops(image: np.ndarray, size: int = CROP) -> list[np.ndarray]:
    """Non-overlapping ``size`` x ``size`` crops of (C, H, W), row by row."""
    _, h, w = image.shape
    return [image[:, i:i + size, j:j + size] for i in range(0, h - size + 1, size)
            for j in range(0, w - size + 1, size)]


def read_real_patches(root: str | Path) -> tuple[np.ndarray, list[str]]:
    """All real patches under ``root``: (N, 2, 120, 120) float32 dB [VH, VV] and their names.

    Raises:
        DataError: no patch found under ``root``.
    """
    root = Path(root)
    patches, names, pairs = [], [], []
    for vh in sorted(root.rglob("*_VH.tif")):  # BigEarthNet v2: <s1_name>/<s1_name>_{VH,VV}.tif
        pairs.append((vh, vh.with_name(vh.name.replace("_VH.tif", "_VV.tif"))))
    for vh in sorted(root.rglob("VH.tif")):  # SSL4EO-S12: <id>/<product>/{VH,VV}.tif
        pairs.append((vh, vh.with_name("VV.tif")))
    for vh, vv in pairs:
        crops = _crops(_pair(vh, vv))
        patches += crops
        names += [f"{vh.parent.name}_crop{k}" for k in range(len(crops))]
    if not patches:
        raise DataError(f"{root}: no Sentinel-1 patch found (expected *_VH.tif/*_VV.tif or VH.tif/VV.tif pairs)")
    return np.stack(patches).astype(np.float32), names


def build_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, RunConfig, dict]:
    """The pretraining model of a ``checkpoint.pth`` (its recorded configuration, the command line's defaults
    for what it does not record), with its weights, in eval mode."""
    ckpt = load_checkpoint(path)
    saved = checkpoint_args(ckpt)
    if "model" not in saved or "stats" not in ckpt:
        raise CheckpointError(f"{path}: expected a pretraining checkpoint of this project (checkpoint.pth, "
                              f"with 'args' and 'stats'); got keys {sorted(ckpt)[:8]}")
    config = RunConfig({**vars(pretraining.parse_args([])), **saved.as_dict()})
    model = get_mode(config.mode).model(config)
    state = model_state(ckpt, path)
    check_shapes(model, state, path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval(), config, ckpt["stats"]


def mean_prediction(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean predictor in the layout of the model's prediction (what ``forward_loss`` takes).

    MixMIM: (2B, L, p*p*C); branch 1 predicts image i's cells where the mask is 1 (the visible pixels of
    image i are those where it is 0), branch 2 image B-1-i's cells where it is 0. SimMIM: (B, C, S, S).
    """
    if isinstance(model, SimMIM):
        m = pixel_mask(mask, model.mask_grid, model.img_size).to(x)  # (B, 1, S, S)
        vis = (x * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1)).clamp_min(1)
        return vis[..., None, None].expand_as(x)
    p, g = model.encoder_stride, model.img_size // model.encoder_stride
    cells = mask.shape[-1]
    if model.norm_pix_loss:
        return torch.zeros(2 * x.shape[0], cells, p * p * model.in_chans)
    m = pixel_mask(mask, g, model.img_size).to(x)  # (1, 1, S, S)
    hidden_where_1 = (x * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1)).clamp_min(1)  # visible: mask 0
    hidden_where_0 = (x * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1)
    rec1 = hidden_where_1.repeat(1, p * p)[:, None].expand(-1, cells, -1)  # pixel-major, channel fastest
    rec2 = hidden_where_0.flip(0).repeat(1, p * p)[:, None].expand(-1, cells, -1)
    return torch.cat([rec1, rec2])


@torch.no_grad()
def check_checkpoint(path: str | Path, patches: np.ndarray, *, weighting: str = "per_channel",
                     seed: int = 0) -> list[dict]:
    """Rows (one per predictor) of masked reconstruction loss, unweighted and weighted, on ``patches``."""
    model, config, stats = build_from_checkpoint(path)
    idx = [CHANNELS.index(c) for c in config.channels]
    sar_db = torch.stack([resize_db(torch.from_numpy(p[idx]), config.input_size) for p in patches])
    if isinstance(model, MixMIM) and len(sar_db) % 2:  # an odd batch would mix its middle image with itself
        sar_db = sar_db[:-1]
    x = normalize(sar_db, torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    w = weight_map(sar_db, WeightSpec(weighting))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_model = get_mode(config.mode).model(config).eval()
    mask = model(x, generator=torch.Generator().manual_seed(seed)).mask
    rows = []
    for name in PREDICTORS:
        losses = []
        for weights in (None, w):
            if name == "mean":
                losses.append(float(model.forward_loss(x, mean_prediction(model, x, mask), mask, weights)[0]))
            else:
                net = model if name == "model" else random_model
                # the pixel term only: a spectral target's term has no counterpart in the mean predictor
                losses.append(float(net(x, weights=weights, mask=mask).terms["pixel_loss"]))
        rows.append({"checkpoint": str(path), "mode": config.mode, "model": config.model, "predictor": name,
                     "loss_unweighted": losses[0], "loss_weighted": losses[1], "n_patches": len(x)})
    return rows


def markdown(table: pd.DataFrame) -> str:
    """A pipe table, floats with four decimals."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="pretraining checkpoint.pth files")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder of the real Sentinel-1 patches (default: ${DATA_ENV})")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
    parser.add_argument("--weighting", default="per_channel", choices=WEIGHTINGS,
                        help="weight map of the weighted loss, the same for every checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask and of the random-init model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = args.data or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if data is None:
        print(f"error: no real patches given: pass --data FOLDER or set {DATA_ENV}", file=sys.stderr)
        return 2
    try:
        patches, names = read_real_patches(data)
        rows = [r for c in args.checkpoints for r in check_checkpoint(c, patches, weighting=args.weighting,
                                                                      seed=args.seed)]
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "real_s1_check.csv", index=False)
    (args.out / "real_s1_check.md").write_text(markdown(table))
    print(f"{len(patches)} real patches of {CROP} px ({', '.join(names[:3])}, ...)")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
