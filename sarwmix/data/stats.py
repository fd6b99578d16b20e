"""Statistics of Sentinel-1 dB patches: normalisation mean/std and texture measures.

Command line::

    python -m sarwmix.data.stats --dataset benv1 --data_path /data/BigEarthNet-S1-v1.0 --split train [--json]

prints the per-channel mean and std in dB under both conventions: "global" (over all pixels of the split)
and "within" (the mean over patches of the within-patch std, the convention of the released BENv1 stats).
"""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import torch

from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import CHANNELS
from sarwmix.data.datasets import build_dataset, dataset_names
from sarwmix.errors import DataError, SarwmixError


def patch_texture_stats(sar_db: np.ndarray, window: int = 7) -> dict[str, list[float]]:
    """Per-patch measures used to compare synthetic with real patches.

    Args:
        sar_db: float array (2, H, W) in dB, channel order [VH, VV].
        window: side of the non-overlapping windows over which the ENL is measured.

    Returns:
        dict with per-channel lists ``mean``, ``std`` (within-patch, dB), ``enl`` (median over windows
        of mean^2 / var of linear power), ``lag1`` and ``lag4`` (dB autocorrelation, average of the
        horizontal and vertical lags), and one-element lists ``gap`` (mean VV - mean VH, dB) and
        ``corr`` (VH-VV pixel correlation).
    """
    x = np.asarray(sar_db, dtype=np.float64)
    out: dict[str, list[float]] = {key: [] for key in ("mean", "std", "enl", "lag1", "lag4")}
    for band in x:
        out["mean"].append(float(band.mean()))
        out["std"].append(float(band.std()))
        h, w = (band.shape[0] // window) * window, (band.shape[1] // window) * window
        lin = 10.0 ** (band[:h, :w] / 10.0)
        blocks = lin.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(-1, window * window)
        out["enl"].append(float(np.median(blocks.mean(1) ** 2 / blocks.var(1, ddof=1))))
        for lag in (1, 4):
            across = np.corrcoef(band[:, :-lag].ravel(), band[:, lag:].ravel())[0, 1]
            down = np.corrcoef(band[:-lag].ravel(), band[lag:].ravel())[0, 1]
            out[f"lag{lag}"].append(float((across + down) / 2))
    out["gap"] = [out["mean"][1] - out["mean"][0]]
    out["corr"] = [float(np.corrcoef(x[0].ravel(), x[1].ravel())[0, 1])]
    return out


def dataset_stats(dataset: torch.utils.data.Dataset, max_samples: int | None = None,
                  num_workers: int = 0, batch_size: int = 64) -> dict:
    """Per-channel mean / std in dB of a data set under both std conventions.

    Args:
        dataset: yields (sar_db (C, H, W), target), e.g. from ``sarwmix.data.datasets.build_dataset``.
        max_samples: use only ``max_samples`` items, evenly spaced over the data set (readers sort by
            patch name, so the first items would all come from a few acquisitions).
        num_workers: DataLoader worker processes.
        batch_size: items per batch.

    Returns:
        ``{"n_patches", "mean", "std_global", "std_within"}``: lists over channels. ``std_global`` is the
        spread over all pixels; ``std_within`` the mean over patches of each patch's own std (the
        convention of the released BENv1 statistics).
    """
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    subset = torch.utils.data.Subset(dataset, [i * len(dataset) // n for i in range(n)])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    total = total_sq = within = None
    pixels = 0
    for x, _ in loader:
        x = x.double()
        batch_sum, batch_sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        batch_within = x.std(dim=(2, 3), unbiased=False).sum(dim=0)
        total = batch_sum if total is None else total + batch_sum
        total_sq = batch_sq if total_sq is None else total_sq + batch_sq
        within = batch_within if within is None else within + batch_within
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    if not pixels:
        raise DataError("the data set is empty; nothing to measure")
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
    return {"n_patches": n, "mean": mean.tolist(), "std_global": std.tolist(), "std_within": (within / n).tolist()}


def main(argv: list[str] | None = None) -> int:
    """``python -m sarwmix.data.stats --dataset NAME --data_path P [--split train] [--input_size 128] [--json]``."""
    parser = ArgumentParser(prog="python -m sarwmix.data.stats",
                            description="Per-channel mean/std (dB) of a data set, both conventions.")
    parser.add_argument("--dataset", required=True, choices=dataset_names(pairs=False))
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--split_file", default=None)
    parser.add_argument("--input_size", type=int, default=128, help="resize before measuring (BENv2: 128)")
    parser.add_argument("--max_samples", type=count(1), default=None)
    parser.add_argument("--num_workers", type=count(0), default=0)
    parser.add_argument("--include_snow_cloud", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        dataset = build_dataset(args.dataset, data_path=args.data_path, split=args.split,
                                input_size=args.input_size, split_file=args.split_file,
                                include_snow_cloud=args.include_snow_cloud)
        stats = dataset_stats(dataset, args.max_samples, args.num_workers)
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats |= {"dataset": args.dataset, "split": args.split, "input_size": args.input_size,
              "channels": list(CHANNELS)}
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{args.dataset} {args.split}: {stats['n_patches']} patches at {args.input_size} px, dB")
    print(f"{'channel':<8} {'mean':>9} {'std global':>11} {'std within':>11}")
    for c, name in enumerate(CHANNELS):
        print(f"{name:<8} {stats['mean'][c]:>9.4f} {stats['std_global'][c]:>11.4f} {stats['std_within'][c]:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
