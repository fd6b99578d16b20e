"""Windows/s of scene prediction (predict.py) against the finetuned model's forward alone, and of the reader.

Three arms, timed in turn (``util.timing.round_robin_times``, one call of each per round, ``--rounds`` rounds):

- ``predict``: the whole pipeline on a synthetic scene: windowed GeoTIFF reads, nodata fill, batching, resize,
  normalisation, the model, averaging and writing the output GeoTIFF;
- ``forward``: the predictor on the same number of windows already in memory, in the same batches (the
  model's forward with its resize and normalisation: the step rate the reader has to keep up with);
- ``read``: the reader alone (windows read, nodata filled, no model).

The scene is written first (``--size`` px a side, seeded synthetic fields, float32 dB, like a GRD scene after
calibration), so the run needs no data. The model is ``--checkpoint`` or a freshly initialised ``--model``
BigEarthNet classifier (the forward costs the same whatever its weights).

    python -m benchmarks.bench_predict                          # mixmim_tiny at 128 px, 1200 px scene, CPU
    python -m benchmarks.bench_predict --write_scene /tmp/scene_10k.tif --size 10000   # only write a scene

The table gives the median windows/s of each arm and its spread (min-max over the rounds).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

import predict as P
from predictor import load_predictor
from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import CHANNELS, DATASET_STATS
from sarwmix.data.scene import Scene, WindowGrid
from sarwmix.data.synthetic import generate_patch
from tasks import get_task
from util.timing import round_robin_times

STRIP = 256  # rows written at a time: the scene is never whole in memory


def write_synthetic_scene(path: Path, size: int, seed: int = 0) -> Path:
    """A ``size`` x ``size`` two-band (VH, VV) float32 dB GeoTIFF of synthetic fields, 10 m, UTM 33N.

    16 seeded 256-px patches are tiled in a seeded random order, one strip of rows at a time.
    """
    tiles = [generate_patch(seed * 1000 + k, size=STRIP)[0] for k in range(16)]
    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "float32",
               "crs": "EPSG:32633", "transform": Affine(10.0, 0.0, 400_000.0, 0.0, -10.0, 5_300_000.0),
               "tiled": False, "blockysize": 16}
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, STRIP):
            strip = np.concatenate([tiles[k] for k in rng.integers(16, size=-(-size // STRIP))], axis=2)
            h = min(STRIP, size - row)
            dst.write(strip[:, :h, :size], window=Window(0, row, size, h))
        for i, pol in enumerate(CHANNELS, start=1):
            dst.set_band_description(i, pol)
    return path


def fresh_checkpoint(path: Path, model: str, input_size: int) -> Path:
    """A BigEarthNet checkpoint in main_finetune.py's format holding a freshly initialised ``model``."""
    config = SimpleNamespace(model=model, input_size=input_size)
    net = get_task("ben").finetune_model(config, 19, in_chans=2, drop_path_rate=0.0)
    args = {"task": "ben", "model": model, "input_size": input_size, "channels": list(CHANNELS)}
    torch.save({"model": net.state_dict(), "args": args, "stats": {"name": "benv1", **DATASET_STATS["benv1"]}},
               path)
    return path


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Seconds per call of each arm, one list entry per round."""
    scene_path = write_synthetic_scene(tmp / "scene.tif", args.size, args.seed)
    ckpt = args.checkpoint or fresh_checkpoint(tmp / "model.pth", args.model, args.input_size)
    predictor = load_predictor(ckpt, device=args.device, amp=args.amp)
    scene = Scene([scene_path])
    grid = WindowGrid(scene.height, scene.width, args.window or predictor.default_window,
                      args.stride or args.window or predictor.default_window)
    windows = np.concatenate([c.windows for c in P.read_chunks([scene], grid, predictor.channel_index, 0.5)])
    batches = [windows[i:i + args.batch_size] for i in range(0, len(windows), args.batch_size)]
    settings = {"bench": True}

    def pipeline() -> None:
        out = P.Outputs(tmp / "map.tif", scene, grid, predictor, False, settings, resume=False, overwrite=True)
        P.predict_scene(predictor, [scene], grid, out, 0.5, args.batch_size)
        out.finish()

    def forward() -> None:
        for b in batches:
            predictor(b)

    def read() -> None:
        for _ in P.read_chunks([scene], grid, predictor.channel_index, 0.5):
            pass

    runs = {"predict": pipeline, "forward": forward, "read": read}
    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else None
    times = round_robin_times(runs, steps=args.rounds, warmup=1, sync=sync)
    scene.close()
    print(f"scene {args.size} x {args.size} px, {len(windows)} windows of {grid.window} px every {grid.stride} px, "
          f"{predictor.model_name} at {predictor.input_size} px ({Path(ckpt).name}), batch {args.batch_size}, "
          f"{predictor.device}, amp {predictor.amp_dtype or 'off'}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    return {arm: [len(windows) / t for t in times[arm]] for arm in runs}


def table(rates: dict[str, list[float]]) -> str:
    """Median windows/s with the min-max spread, and each arm against the forward alone."""
    fwd = statistics.median(rates["forward"])
    lines = [f"| {'arm':<8} | {'windows/s':>9} | {'min':>7} | {'max':>7} | {'of forward':>10} |",
             f"|{'-' * 10}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 11}:|"]
    for arm, r in rates.items():
        med = statistics.median(r)
        lines.append(f"| {arm:<8} | {med:>9.1f} | {min(r):>7.1f} | {max(r):>7.1f} | {med / fwd:>9.2f}x |")
    read = statistics.median(rates["read"])
    verdict = "not the bottleneck" if read > fwd else "the bottleneck"
    lines.append(f"reader {read:.0f} windows/s = {read / fwd:.1f}x the forward alone: the reader is {verdict}; "
                 f"the whole pipeline runs at {statistics.median(rates['predict']) / fwd:.2f}x the forward")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a finetuned checkpoint (default: a fresh --model)")
    parser.add_argument("--model", default="mixmim_tiny")
    parser.add_argument("--input_size", type=count(1), default=128)
    parser.add_argument("--size", type=count(1), default=1200, help="scene side in pixels")
    parser.add_argument("--window", type=count(1), default=None, help="default: the predictor's (120)")
    parser.add_argument("--stride", type=count(1), default=None, help="default: --window")
    parser.add_argument("--batch_size", type=count(1), default=32)
    parser.add_argument("--rounds", type=count(1), default=5)
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--amp", default="off", choices=("auto", "bf16", "off"))
    parser.add_argument("--threads", type=count(0), default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_scene", default=None, metavar="TIF", help="only write a --size scene there")
    args = parser.parse_args(argv)
    if args.write_scene:
        print(f"wrote {write_synthetic_scene(Path(args.write_scene), args.size, args.seed)}")
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        print(table(measure(args, Path(tmp))))


if __name__ == "__main__":
    main()
