"""Samples/s of one data-loader worker for each storage format, measured in one run.

A sample is read + decode + resize 120 -> 128 + normalise (the weight map is excluded: it is computed on
the device). The data are written by the synthetic writers into a temporary folder first, so the run
needs no download. One thread, one process, warm page cache (each format is read once before timing).

    python -m benchmarks.bench_data [--n 500] [--min_seconds 2]

``--workers N ...`` measures instead what the training loader (``engine.make_loader``: batches of
raw dB patches, the weight map being computed on the device) delivers from the packed format with N worker
processes, against the rate at which one GPU's step consumes images: ``--step_img_s`` or the fastest row
of a ``bench_pretrain.py`` table (``--step_table``). The packed set is ``--packed_path`` or ``--n`` synthetic
patches written by ``sarwmix.data.packed.convert_synthetic``. It answers how many loader workers a GPU needs:

    python -m benchmarks.bench_data --workers 1 2 4 8 --step_table out/bench_base.txt --n 2048
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one loader worker = one core; set before numpy/torch load

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from engine import make_loader
from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import BEN_19_CLASSES
from sarwmix.data.bigearthnetv2 import load_metadata, select_split, targets_from_labels
from sarwmix.data.datasets import build_dataset
from sarwmix.data.packed import convert, convert_synthetic
from sarwmix.data.synthetic import write_benv1, write_benv1_zarr, write_benv2, write_benv2_lmdb

# (label, dataset name, sub-folder written by the setup below)
FORMATS = (
    ("GeoTIFF folders (v1)", "benv1", "benv1"),
    ("GeoTIFF folders (v2)", "benv2", "benv2"),
    ("Zarr v2 container", "benv1_zarr", "zarr2"),
    ("Zarr v3 container", "benv1_zarr", "zarr3"),
    ("LMDB (safetensors)", "benv2_lmdb", "lmdb"),
    ("packed (memmap .npy)", "packed", "packed"),
)


def write_all(root: Path, n: int, seed: int) -> None:
    """Write the same ``n`` synthetic patches in every format under ``root``."""
    write_benv1(root / "benv1", n, seed)
    write_benv2(root / "benv2", n, seed)
    write_benv1_zarr(root / "zarr2", n, seed, zarr_format=2)
    write_benv1_zarr(root / "zarr3", n, seed, zarr_format=3)
    write_benv2_lmdb(root / "lmdb", n, seed)
    convert("benv1", root / "benv1", root / "packed")


def samples_per_second(dataset: torch.utils.data.Dataset, min_seconds: float) -> float:
    """Items/s of ``dataset[i]`` + normalisation, looping over the data set for at least ``min_seconds``."""
    mean = torch.tensor(dataset.stats["mean"]).view(-1, 1, 1)
    std = torch.tensor(dataset.stats["std"]).view(-1, 1, 1)
    for i in range(len(dataset)):  # warm-up pass: page cache, lazily opened handles
        dataset[i]
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in range(len(dataset)):
            x, _ = dataset[i]
            (x - mean) / std
        count += len(dataset)
    return count / (time.perf_counter() - start)


def time_v2_index(root: Path, rows: int, seed: int) -> dict[str, float]:
    """Seconds to load a ``rows``-row metadata parquet (real size: 480,038) and index its train split."""
    rng = np.random.default_rng(seed)
    # A pool of label combinations stands in for the real ones (a few thousand distinct lists).
    pool = [list(rng.choice(BEN_19_CLASSES, size=rng.integers(1, 6), replace=False)) for _ in range(4000)]
    names = pd.Series(np.arange(rows)).map("S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{}_0".format)
    table = pd.DataFrame({"patch_id": names.str.replace("S1A", "S2A"),
                          "labels": [pool[i] for i in rng.integers(len(pool), size=rows)],
                          "split": rng.choice(["train", "validation", "test"], size=rows, p=[0.5, 0.25, 0.25]),
                          "country": "Austria", "s1_name": names, "s2v1_name": names,
                          "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
    table.to_parquet(root / "big_metadata.parquet", index=False)
    start = time.perf_counter()
    meta = load_metadata(root / "big_metadata.parquet")
    loaded = time.perf_counter()
    train = select_split(meta, "train", include_snow_cloud=False)
    targets_from_labels(train["labels"], "big_metadata.parquet")
    return {"load": loaded - start, "index": time.perf_counter() - loaded, "train_rows": len(train)}


def loader_rate(dataset: torch.utils.data.Dataset, workers: int, batch_size: int, min_seconds: float,
                pin_memory: bool) -> float:
    """Samples/s the training loader delivers with ``workers`` processes, start-up excluded.

    Batches are drawn at random with replacement, as many as ``min_seconds`` allows, so a small packed set
    serves any duration; the first batch (worker start, first page-cache reads) is not timed.
    """
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    batches = iter(make_loader(dataset, sampler, batch_size, workers, pin_memory))
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        x = next(batches)[0]
        count += x.shape[0]
    rate = count / (time.perf_counter() - start)
    del batches  # stops the worker processes
    return rate


def step_rate_from_table(path: Path) -> tuple[float, str]:
    """The fastest measured row of a ``bench_pretrain.py`` table: (img/s, "model batch amp path")."""
    best: tuple[float, str] = (0.0, "")
    for line in path.read_text().splitlines():
        cols = line.split()
        if len(cols) > 5 and cols[2].isdigit():
            try:
                img_s = float(cols[5])
            except ValueError:  # a row saying where a batch sweep stopped
                continue
            best = max(best, (img_s, " ".join(cols[:5])))
    if not best[1]:
        raise SystemExit(f"--step_table {path}: no measured row of bench_pretrain.py found")
    return best


def workers_needed(rates: dict[int, float], step_img_s: float) -> str:
    """The smallest measured worker count that keeps up, else an extrapolation from the best per-worker rate."""
    enough = [w for w, r in sorted(rates.items()) if r >= step_img_s]
    if enough:
        where = " (0: loading in the training process itself)" if enough[0] == 0 else ""
        return f"{enough[0]}{where}, the smallest measured count at or above the step rate"
    per_worker = max(r / max(w, 1) for w, r in rates.items())
    return (f"about {math.ceil(step_img_s / per_worker)} (more than measured: step rate / best per-worker rate "
            f"{per_worker:.0f} samples/s; worker processes also compete for cores)")


def data_rate_check(args: argparse.Namespace, root: Path) -> None:
    """Print samples/s by worker count against the step rate of one GPU, and the workers it needs."""
    if args.step_table:
        step_img_s, source = step_rate_from_table(Path(args.step_table))
        source = f"fastest row of {args.step_table}: {source}"
    else:
        step_img_s, source = args.step_img_s, "--step_img_s"
    packed = Path(args.packed_path) if args.packed_path else convert_synthetic(root / "packed", args.n, args.seed)
    dataset = build_dataset("packed", data_path=str(packed), split="train", input_size=args.input_size)
    pin = torch.cuda.is_available()
    print(f"packed loader ({packed}, {len(dataset)} train patches), batch {args.batch_size}, {args.input_size} px, "
          f"pinned memory {'on' if pin else 'off'}; step rate {step_img_s:.4g} img/s per GPU ({source})")
    print(f"| {'workers':>7} | {'samples/s':>9} | {'per worker':>10} | {'of step rate':>12} |")
    print(f"|{'-' * 8}:|{'-' * 10}:|{'-' * 11}:|{'-' * 13}:|")
    rates = {}
    for w in args.workers:
        rates[w] = loader_rate(dataset, w, args.batch_size, args.min_seconds, pin)
        print(f"| {w:>7} | {rates[w]:>9.0f} | {rates[w] / max(w, 1):>10.0f} | {rates[w] / step_img_s:>11.2f}x |",
              flush=True)
    print(f"workers needed per GPU: {workers_needed(rates, step_img_s)}")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=count(1), default=500, help="synthetic patches written per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--min_seconds", type=float, default=2.0, help="timing duration per format")
    parser.add_argument("--data_dir", default=None, help="write the data here (default: a temp folder)")
    parser.add_argument("--index_rows", type=count(1), default=480_038, help="rows of the v2 index timing (0: skip)")
    rate = parser.add_argument_group("data-rate check (--workers)")
    rate.add_argument("--workers", nargs="+", type=count(0), default=None,
                      help="measure the packed training loader with each of these worker counts")
    rate.add_argument("--packed_path", default=None, help="packed set to read (default: --n synthetic patches)")
    rate.add_argument("--batch_size", type=count(1), default=256, help="loader batch (per GPU)")
    step = rate.add_mutually_exclusive_group()
    step.add_argument("--step_img_s", type=float, default=1000.0, help="images/s one GPU's step consumes")
    step.add_argument("--step_table", default=None, help="bench_pretrain.py output: its fastest row's img/s")
    args = parser.parse_args(argv)
    if args.workers is not None and args.step_img_s <= 0:
        parser.error(f"--step_img_s {args.step_img_s}: expected a step rate > 0")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(args.data_dir or tmp)
        if args.workers is not None:
            data_rate_check(args, root)
            return
        start = time.perf_counter()
        write_all(root, args.n, args.seed)
        print(f"wrote {args.n} patches in {len(FORMATS)} formats to {root} in {time.perf_counter() - start:.1f} s")
        results = []
        for label, name, folder in FORMATS:
            dataset = build_dataset(name, data_path=str(root / folder), split="train",
                                    input_size=args.input_size)
            results.append((label, len(dataset), samples_per_second(dataset, args.min_seconds)))
        index_time = time_v2_index(root, args.index_rows, args.seed) if args.index_rows else None
    base = results[0][2]
    print(f"\none loader worker, 1 thread, {args.input_size} px, read+decode+resize+normalise")
    print(f"| {'format':<22} | {'patches':>7} | {'samples/s':>9} | {'ms/sample':>9} | {'vs GeoTIFF v1':>13} |")
    print(f"|{'-' * 24}|{'-' * 8}:|{'-' * 10}:|{'-' * 10}:|{'-' * 14}:|")
    for label, patches, rate in results:
        print(f"| {label:<22} | {patches:>7} | {rate:>9.0f} | {1000 / rate:>9.3f} | {rate / base:>12.1f}x |")
    if index_time:
        print(f"\nv2 index of a {args.index_rows}-row metadata.parquet: read {index_time['load']:.2f} s, "
              f"train split + 19-class targets ({index_time['train_rows']} rows) {index_time['index']:.2f} s")


if __name__ == "__main__":
    main()
