"""Apply a model to a whole Sentinel-1 scene: tiled inference from GeoTIFF to a georeferenced map.

    python predict.py CHECKPOINT --input scene.tif --out map.tif                   # one two-band file
    python predict.py CHECKPOINT --input S1_VV.tif S1_VH.tif --out map.tif --stride 60 --class_map
    python predict.py sen12_best.pth --input before.tif --after after.tif --out flood.tif
    python predict.py checkpoint_64.pth --input scene.tif --out embeddings.tif     # a pretraining checkpoint

The checkpoint says what is written (``predictor``): a BigEarthNet model gives one band of class
probability per class (band descriptions = class names), a SEN12-FLOOD model the probabilities of no flood
and flood between two dates, a pretraining checkpoint the encoder's pooled embedding (one band per feature).
Windows of ``--window`` pixels are read every ``--stride`` pixels (``sarwmix.data.scene.WindowGrid``), resized to
the model's input size and normalised with the checkpoint's statistics, as in training. An output cell is
``stride`` x ``stride`` scene pixels and holds the mean of the windows that cover it; windows with more than
``--max_nodata`` nodata are skipped, and cells that are mostly nodata or covered by no kept window are
nodata. Rows of cells are written as they are finished; the file is closed every ``BLOCK_ROWS`` rows and a
``<out>.progress.json`` records how far it got, so ``--resume`` finishes an interrupted run. A quicklook
PNG (scene in dB, map over it, legend) is written beside the output.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from tqdm import tqdm

from predictor import ENCODER, Predictor, load_predictor
from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import CHANNELS
from sarwmix.data.scene import UNITS, MapWriter, Scene, WindowGrid, block_mean, check_same_grid, fill_nodata
from sarwmix.errors import ConfigError, DataError
from tasks import TASKS
from util.config import run_cli
from util.quicklook import NO_CLASS, class_colours, save_quicklook

log = logging.getLogger("sarwmix")
CHUNK_WINDOWS = 64  # windows read together along a row of windows: bounds memory whatever the scene's width
BLOCK_ROWS = 32  # rows of output cells between two restart points
# GDAL's block cache (MB). Its default, 5 % of the RAM, fills up as a large scene is read and makes the peak
# memory grow with the scene; windows are read in order, each pixel row in consecutive strips, so a small
# cache loses nothing.
GDAL_CACHE_MB = 64


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("python predict.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="main_finetune.py checkpoint (BigEarthNet, SEN12-FLOOD) or pretraining one")
    p.add_argument("--input", nargs="+", required=True, metavar="TIF",
                   help="one two-band GeoTIFF, or the VV and VH GeoTIFFs of one grid")
    p.add_argument("--after", nargs="+", default=None, metavar="TIF",
                   help="SEN12-FLOOD models: the second date, on the same grid as --input")
    p.add_argument("--bands", nargs="+", default=None, metavar="POL",
                   help="polarisation of each band (one file) or file (two), in order, e.g. VV VH "
                        "(default: from band descriptions, then file names)")
    p.add_argument("--units", default="auto", choices=UNITS, help="backscatter units of the input (auto: detected)")
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--window", type=count(1), default=None,
                   help="window side in scene pixels (default: 120, the BigEarthNet patch, for one-image models; "
                        "the model's input size for SEN12-FLOOD)")
    p.add_argument("--stride", type=count(1), default=None, help="pixels between windows (default: --window)")
    p.add_argument("--max_nodata", type=float, default=0.5, help="skip windows (and blank cells) with more nodata")
    p.add_argument("--class_map", action="store_true",
                   help="also write <out>_class.tif: the most probable class, with a colour table")
    p.add_argument("--task", default=None, choices=(*TASKS, ENCODER),
                   help="what the checkpoint must be (default: what it records)")
    p.add_argument("--stats", default=None, help="benv1, benv2 or sen12flood: statistics for a checkpoint that "
                                                 "records none (the released files)")
    p.add_argument("--checkpoint_sha256", default=None, help="expected SHA-256 of the checkpoint")
    p.add_argument("--batch_size", type=count(1), default=32)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="auto: bf16 on a GPU")
    p.add_argument("--num_threads", type=count(0), default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted run that wrote --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quicklook", action=argparse.BooleanOptionalAction, default=True, help="<out>.png beside --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


# --- reading: windows of every date, nodata filled ----------------------------------------------------

@dataclass
class Chunk:
    """Windows ``(row, col .. col+m-1)`` of one row of windows, read together."""

    row: int
    col: int
    windows: np.ndarray  # (m, dates, C, window, window) dB, nodata filled
    keep: np.ndarray  # (m,) bool: valid enough to predict
    cell_valid: np.ndarray  # (n, m + n - 1): valid fraction of the cells these windows cover


def read_chunks(scenes: list[Scene], grid: WindowGrid, channels: list[int], max_nodata: float,
                start_row: int = 0) -> Iterator[Chunk]:
    """The windows of ``grid`` from window row ``start_row`` on, ``CHUNK_WINDOWS`` at a time, row by row."""
    s, win = grid.stride, grid.window
    rows, cols = grid.windows
    for r in range(start_row, rows):
        for c0 in range(0, cols, CHUNK_WINDOWS):
            m = min(CHUNK_WINDOWS, cols - c0)
            reads = [sc.read(r * s, c0 * s, win, (m - 1) * s + win) for sc in scenes]
            valid = np.logical_and.reduce([v for _, v in reads])
            strip = np.stack([db[channels] for db, _ in reads])  # (dates, C, win, width)
            view = np.lib.stride_tricks.sliding_window_view(strip, win, axis=-1)[..., ::s, :]
            windows = np.ascontiguousarray(view.transpose(3, 0, 1, 2, 4))  # (m, dates, C, win, win)
            vwin = np.lib.stride_tricks.sliding_window_view(valid, win, axis=-1)[:, ::s].transpose(1, 0, 2)
            frac = vwin.mean((-2, -1))
            dates = windows.shape[1]
            flat = windows.reshape(m * dates, *windows.shape[2:])
            fill_nodata(flat, np.repeat(vwin, dates, axis=0))
            yield Chunk(r, c0, windows, (frac > 0) & (frac >= 1 - max_nodata), block_mean(valid, s))


# --- averaging: the windows that cover each cell ------------------------------------------------------

class CellAverager:
    """Sums and counts of window values per output cell, for the rows of cells not written yet.

    Window ``(r, c)`` adds its value to the ``n x n`` cells ``(r..r+n-1, c..c+n-1)`` (``WindowGrid``).
    """

    def __init__(self, cols: int, bands: int, n: int) -> None:
        self.cols, self.bands, self.n = cols, bands, n
        self.rows: dict[int, dict[str, np.ndarray]] = {}

    def _row(self, i: int) -> dict[str, np.ndarray]:
        if i not in self.rows:
            self.rows[i] = {"sum": np.zeros((self.cols, self.bands)), "count": np.zeros(self.cols, np.int32),
                            "valid": np.zeros(self.cols)}
        return self.rows[i]

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """Windows ``(rows[k], cols[k])`` (distinct) with values (k, bands)."""
        for r in np.unique(rows):
            sel = rows == r
            for dr in range(self.n):
                acc = self._row(int(r) + dr)
                for dc in range(self.n):
                    acc["sum"][cols[sel] + dc] += values[sel]
                    acc["count"][cols[sel] + dc] += 1

    def set_valid(self, row: int, col: int, frac: np.ndarray) -> None:
        """Valid fraction (n, k) of the cells ``(row.., col..)`` (the same value whichever window gives it)."""
        for dr in range(frac.shape[0]):
            self._row(row + dr)["valid"][col:col + frac.shape[1]] = frac[dr]

    def pop(self, i: int, max_nodata: float) -> np.ndarray:
        """Row ``i`` of cells: (bands, cols) float32 means, NaN where nodata; forgotten afterwards."""
        acc = self._row(i)
        del self.rows[i]
        ok = (acc["count"] > 0) & (acc["valid"] >= 1 - max_nodata) & (acc["valid"] > 0)
        out = np.full((self.bands, self.cols), np.nan, np.float32)
        out[:, ok] = (acc["sum"][ok] / acc["count"][ok, None]).T
        return out


# --- writing: the map, the class map, restart points --------------------------------------------------

class Outputs:
    """The output GeoTIFF(s) of a run and its restart record ``<out>.progress.json``."""

    def __init__(self, out: Path, scene: Scene, grid: WindowGrid, predictor: Predictor, class_map: bool,
                 settings: dict, resume: bool, overwrite: bool) -> None:
        self.out, self.progress = out, out.with_name(out.name + ".progress.json")
        self.class_path = out.with_name(f"{out.stem}_class{out.suffix}") if class_map else None
        self.settings, self.rows_done = settings, 0
        if resume:
            self.rows_done = self._resumable()
        elif out.exists() and not overwrite:
            raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or --resume to finish the run "
                              f"that wrote it")
        names = predictor.names
        self.writers = [lambda again: MapWriter(out, scene, grid, names, tags=settings, resume=again)]
        if self.class_path is not None:
            colours = dict(enumerate(class_colours(len(names))))
            self.writers.append(lambda again: MapWriter(self.class_path, scene, grid, ["class"], dtype="uint8",
                                                        nodata=NO_CLASS, colormap=colours, tags=settings,
                                                        resume=again))
        self.open = [make(resume) for make in self.writers]
        self._record()

    def _resumable(self) -> int:
        if not (self.out.exists() and self.progress.exists()):
            raise ConfigError(f"--resume: {self.out} has no restart record {self.progress.name} (finished, or never "
                              f"started); run without --resume")
        record = json.loads(self.progress.read_text())
        if record["settings"] != self.settings:
            changed = sorted(k for k in self.settings if record["settings"].get(k) != self.settings[k])
            raise ConfigError(f"--resume: {self.out} was started with other settings ({', '.join(changed)}); run "
                              f"with the same ones, or --overwrite")
        return int(record["rows_done"])

    def _record(self) -> None:
        self.progress.write_text(json.dumps({"rows_done": self.rows_done, "settings": self.settings}))

    def write(self, row: int, values: np.ndarray) -> None:
        """Row ``row`` of cells, values (bands, cols); a restart point every ``BLOCK_ROWS`` rows."""
        self.open[0].write_row(row, values)
        if self.class_path is not None:
            finite = np.isfinite(values).all(0)
            classes = np.where(finite, np.nan_to_num(values, nan=-1).argmax(0), NO_CLASS)
            self.open[1].write_row(row, classes[None].astype(np.uint8))
        self.rows_done = row + 1
        if self.rows_done % BLOCK_ROWS == 0:  # closing flushes the rows to disk
            for w in self.open:
                w.close()
            self._record()
            self.open = [make(True) for make in self.writers]

    def finish(self) -> None:
        for w in self.open:
            w.close()
        self.progress.unlink(missing_ok=True)


# --- the run ------------------------------------------------------------------------------------------

def predict_scene(predictor: Predictor, scenes: list[Scene], grid: WindowGrid, outputs: Outputs, max_nodata: float,
                  batch_size: int, progress: bool = False) -> dict:
    """Predict every window of ``grid`` and write the rows of cells from ``outputs.rows_done`` on.

    Returns:
        counts: ``windows`` read, ``predicted``, ``skipped`` (mostly nodata), output ``rows``.
    """
    n, (n_rows, n_cols) = grid.n, grid.shape
    first = outputs.rows_done
    start = max(0, first - n + 1)  # the windows that reach the first row not written yet
    averager = CellAverager(n_cols, len(predictor.names), n)
    pending: list[tuple[int, int, np.ndarray]] = []
    counts = {"windows": 0, "predicted": 0, "skipped": 0, "rows": n_rows}
    next_row = start

    def run_batch(items: list[tuple[int, int, np.ndarray]]) -> None:
        rows, cols, windows = zip(*items)
        averager.add(np.array(rows), np.array(cols), predictor(np.stack(windows)))
        counts["predicted"] += len(items)

    def write_upto(last: int) -> None:
        nonlocal next_row
        while next_row <= last:
            values = averager.pop(next_row, max_nodata)
            if next_row >= first:  # rows before the restart point hold partial sums and are written already
                outputs.write(next_row, values)
            next_row += 1

    total = (grid.windows[0] - start) * grid.windows[1]
    with tqdm(total=total, unit="window", disable=not progress, desc="predict") as bar:
        for chunk in read_chunks(scenes, grid, predictor.channel_index, max_nodata, start):
            averager.set_valid(chunk.row, chunk.col, chunk.cell_valid)
            pending += [(chunk.row, chunk.col + int(i), chunk.windows[i]) for i in np.flatnonzero(chunk.keep)]
            counts["windows"] += len(chunk.keep)
            counts["skipped"] += int((~chunk.keep).sum())
            while len(pending) >= batch_size:
                run_batch(pending[:batch_size])
                pending = pending[batch_size:]
            row_read = chunk.row if chunk.col + len(chunk.keep) == grid.windows[1] else chunk.row - 1
            done = min(row_read, pending[0][0] - 1) if pending else row_read
            write_upto(done)  # cell row i is complete once window rows up to i are predicted
            bar.update(len(chunk.keep))
        if pending:
            run_batch(pending)
    write_upto(n_rows - 1)
    return counts


def open_scenes(args: argparse.Namespace, predictor: Predictor) -> list[Scene]:
    """The input scene(s): one date, or two for a pair model (on the same grid)."""
    if predictor.dates == 2 and not args.after:
        raise ConfigError(f"{args.checkpoint}: a SEN12-FLOOD model compares two dates: give the second one as "
                          f"--after (same grid as --input)")
    if predictor.dates == 1 and args.after:
        raise ConfigError(f"--after: {args.checkpoint} is a {predictor.title} model of one image; it takes no "
                          f"second date")
    scenes = [Scene(args.input, args.bands, args.units)]
    if args.after:
        scenes.append(Scene(args.after, args.bands, args.units))
        check_same_grid(Path(args.input[0]), scenes[0].grid(), Path(args.after[0]), scenes[1].grid())
    return scenes


def write_quicklook(args: argparse.Namespace, predictor: Predictor, scene: Scene, grid: WindowGrid,
                    out: Path) -> Path:
    """``<out>.png``: the scene's VV in dB over the map's extent and the map drawn over it."""
    rows, cols = grid.shape
    db = scene.overview(rows * grid.stride, cols * grid.stride)[CHANNELS.index("VV")]
    scale = max(rows, cols) / 1024
    shape = (max(1, round(rows / max(scale, 1))), max(1, round(cols / max(scale, 1))))
    with rasterio.open(out) as src:
        values = src.read(out_shape=(src.count, *shape))
    kind = predictor.task.quicklook if predictor.task is not None else "embedding"
    if kind == "class":
        finite = np.isfinite(values).all(0)
        shown, names = np.where(finite, np.nan_to_num(values, nan=-1).argmax(0), NO_CLASS), predictor.names
    elif kind == "probability":
        shown, names = values[-1], [predictor.names[-1]]
    else:
        shown, names = values, []
    title = f"{', '.join(args.input)}  |  {Path(args.checkpoint).name} ({predictor.title})"
    return save_quicklook(out.with_suffix(".png"), db, shown, kind, names, title)


def main(args: argparse.Namespace) -> dict:
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """The command (``main``) inside its GDAL environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if not 0.0 <= args.max_nodata < 1.0:
        raise ConfigError(f"--max_nodata {args.max_nodata}: expected a fraction 0 <= f < 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: expected at least 1")
    predictor = load_predictor(args.checkpoint, task=args.task, stats=args.stats, sha256=args.checkpoint_sha256,
                               device=args.device, amp=args.amp)
    scenes = open_scenes(args, predictor)
    try:
        window = args.window or predictor.default_window
        if window > min(scenes[0].height, scenes[0].width):
            raise DataError(f"{scenes[0].name}: {scenes[0].height} x {scenes[0].width} px, smaller than one window "
                            f"of {window} px (--window)")
        grid = WindowGrid(scenes[0].height, scenes[0].width, window, args.stride or window)
        if args.class_map and predictor.task is None:
            raise ConfigError("--class_map: a pretraining checkpoint gives embeddings, not classes")
        settings = {"checkpoint": str(Path(args.checkpoint).resolve()), "task": predictor.kind,
                    "input": [str(Path(p).resolve()) for p in args.input],
                    "after": [str(Path(p).resolve()) for p in args.after or []], "units": scenes[0].units,
                    "window": grid.window, "stride": grid.stride, "max_nodata": args.max_nodata,
                    "model_input_size": predictor.input_size, "channels": list(predictor.channels)}
        pixel = scenes[0].pixel_size_m()
        if pixel is not None and not 8.0 <= pixel <= 12.5:
            log.warning("%s: pixels of about %.0f m; the models learnt from 10 m Sentinel-1 GRD pixels (a window of "
                        "120 px is 1.2 km there): resample the scene to 10 m, or expect other results",
                        scenes[0].name, pixel)
        out = Path(args.out)
        outputs = Outputs(out, scenes[0], grid, predictor, args.class_map, settings, args.resume, args.overwrite)
        log.info("%s: %d x %d px, %s; %s model (%s) on %d x %d windows every %d px -> %d x %d cells", scenes[0].name,
                 scenes[0].height, scenes[0].width, scenes[0].units, predictor.title, predictor.model_name, window,
                 window, grid.stride, *grid.shape)
        counts = predict_scene(predictor, scenes, grid, outputs, args.max_nodata, args.batch_size, args.progress)
        outputs.finish()
        written = [str(out)] + ([str(outputs.class_path)] if outputs.class_path else [])
        if args.quicklook:
            written.append(str(write_quicklook(args, predictor, scenes[0], grid, out)))
    finally:
        for sc in scenes:
            sc.close()
    log.info("%d windows: %d predicted, %d skipped (over %.0f%% nodata); wrote %s", counts["windows"],
             counts["predicted"], counts["skipped"], 100 * args.max_nodata, ", ".join(written))
    return {**counts, "outputs": written}


if __name__ == "__main__":
    run_cli(main, parse_args)
