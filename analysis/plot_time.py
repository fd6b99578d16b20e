"""Wall-clock time per epoch and total training time of one or more runs.

Usage::

    python -m analysis.plot_time output/pretrain_base output/pretrain_large --out figures/

Epoch times come from ``epoch_time_s`` in ``log.txt``; a run without it falls back to the ``time_s`` stamps of
``train_log.json`` (time between the last iterations of consecutive epochs). The total is the sum of the
epoch times (start-up and evaluation outside the epochs are not counted). Writes ``run_time.png``,
``run_time_per_epoch.csv`` (``run, epoch, epoch_time_s, epoch_time_min, cumulative_h, img_per_s, source``;
epochs counted from 1) and ``run_time_total.csv`` (``run, epochs, total_s, total_h, mean_epoch_min,
median_img_per_s``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.logs import (
    EPOCH_LOG,
    STEP_LOG,
    RunLogs,
    integer_epoch_axis,
    output_parser,
    read_run,
    require_columns,
    run_labels,
    run_main,
    write_outputs,
)
from sarwmix.cli import ArgumentParser
from sarwmix.errors import DataError

# (upper limit in seconds, divisor, unit): the first row whose limit exceeds the largest value is used.
UNITS = ((120.0, 1.0, "s"), (2 * 3600.0, 60.0, "min"), (math.inf, 3600.0, "h"))


def pick_unit(seconds: float) -> tuple[float, str]:
    """Divisor and unit name that keep ``seconds`` readable (s below 2 min, min below 2 h, else h)."""
    for limit, divisor, unit in UNITS:
        if seconds < limit:
            return divisor, unit
    return UNITS[-1][1], UNITS[-1][2]


def _times_from_steps(run: RunLogs) -> pd.DataFrame:
    """Per-epoch seconds from the step log: differences of each epoch's last ``time_s``.

    ``time_s`` restarts at 0 when a run is resumed, so a negative difference means a restart and the epoch
    then took its own last stamp.
    """
    require_columns(run.steps, ["epoch", "time_s"], run.path / STEP_LOG)
    last = run.steps.groupby("epoch", sort=True)["time_s"].max()
    seconds = last.diff()
    seconds.iloc[0] = last.iloc[0]
    seconds = seconds.where(seconds >= 0, last)
    return pd.DataFrame({"epoch": last.index.astype(int), "epoch_time_s": seconds.to_numpy(dtype=float),
                         "img_per_s": math.nan, "source": STEP_LOG})


def epoch_times(run: RunLogs, label: str) -> pd.DataFrame:
    """Per-epoch time table of one run (see the module docstring for the columns)."""
    epochs = run.epochs
    if not epochs.empty and "epoch_time_s" in epochs and epochs["epoch_time_s"].notna().all():
        table = pd.DataFrame({"epoch": epochs["epoch"].astype(int), "epoch_time_s": epochs["epoch_time_s"],
                              "img_per_s": epochs.get("img_per_s", math.nan),
                              "source": EPOCH_LOG})
    elif not run.steps.empty:
        table = _times_from_steps(run)
    else:
        raise DataError(f"{run.path / EPOCH_LOG}: no epoch_time_s and no {STEP_LOG} to derive epoch times")
    table["epoch"] = table["epoch"] + 1
    table["epoch_time_s"] = table["epoch_time_s"].astype(float)
    table["epoch_time_min"] = table["epoch_time_s"] / 60.0
    table["cumulative_h"] = table["epoch_time_s"].cumsum() / 3600.0
    table.insert(0, "run", label)
    columns = ["run", "epoch", "epoch_time_s", "epoch_time_min", "cumulative_h", "img_per_s", "source"]
    return table[columns].reset_index(drop=True)


def total_times(per_epoch: pd.DataFrame) -> pd.DataFrame:
    """One row per run: epochs, total time (s and h), mean epoch time (min), median throughput."""
    grouped = per_epoch.groupby("run", sort=False)
    table = pd.DataFrame({"epochs": grouped["epoch"].count(), "total_s": grouped["epoch_time_s"].sum(),
                          "mean_epoch_min": grouped["epoch_time_min"].mean(),
                          "median_img_per_s": grouped["img_per_s"].median()})
    table.insert(2, "total_h", table["total_s"] / 3600.0)
    return table.reset_index()


def draw(per_epoch: pd.DataFrame, totals: pd.DataFrame) -> Figure:
    """Left: time of each epoch per run. Right: total time per run as bars."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ax_epoch, ax_total = figure.subplots(1, 2, width_ratios=(3, 2))
    divisor, unit = pick_unit(float(per_epoch["epoch_time_s"].max()))
    for index, (label, rows) in enumerate(per_epoch.groupby("run", sort=False)):
        marker = "o" if len(rows) <= 30 else None
        ax_epoch.plot(rows["epoch"], rows["epoch_time_s"] / divisor, color=f"C{index % 10}", marker=marker,
                      label=label)
    ax_epoch.set(xlabel="epoch", ylabel=f"time per epoch ({unit})", title="Time per epoch")
    ax_epoch.set_ylim(bottom=0)
    integer_epoch_axis(ax_epoch)
    ax_epoch.grid(True, alpha=0.3)
    ax_epoch.legend(fontsize="small")
    divisor, unit = pick_unit(float(totals["total_s"].max()))
    positions = range(len(totals))
    bars = ax_total.barh(positions, totals["total_s"] / divisor,
                         color=[f"C{i % 10}" for i in positions])
    ax_total.bar_label(bars, labels=[f"{s / divisor:.3g} {unit} / {n} ep" for s, n in
                                     zip(totals["total_s"], totals["epochs"])], padding=3, fontsize="small")
    ax_total.set_yticks(list(positions), totals["run"].tolist())
    ax_total.invert_yaxis()
    ax_total.margins(x=0.35)
    ax_total.set(xlabel=f"total training time ({unit})", title="Total time (sum of epochs)")
    ax_total.grid(True, axis="x", alpha=0.3)
    return figure


def plot_time(run_dirs: list[Path], labels: list[str] | None = None
              ) -> tuple[Figure, pd.DataFrame, pd.DataFrame]:
    """Read the runs and build the figure, the per-epoch table and the per-run totals."""
    run_dirs = [Path(path) for path in run_dirs]
    labels = run_labels(run_dirs, labels)
    per_epoch = pd.concat([epoch_times(read_run(path), label) for path, label in zip(run_dirs, labels)],
                          ignore_index=True)
    totals = total_times(per_epoch)
    return draw(per_epoch, totals), per_epoch, totals


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], parents=[output_parser()])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with log.txt / train_log.json)")
    parser.add_argument("--labels", nargs="+", default=None, help="label per run (default: folder name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def job() -> list[Path]:
        figure, per_epoch, totals = plot_time(args.runs, args.labels)
        for row in totals.itertuples(index=False):
            epochs = f"{row.epochs} epoch" + ("s" if row.epochs != 1 else "")
            print(f"{row.run}: {epochs}, {row.total_h:.3f} h ({row.mean_epoch_min:.2f} min/epoch)")
        stem = args.name or "run_time"
        tables = {"_per_epoch": per_epoch, "_total": totals}
        return write_outputs(args.out, stem, figure, tables, args.dpi, args.title)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
