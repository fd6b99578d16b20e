"""Pretraining loss curves: per epoch (``log.txt``) and per iteration (``train_log.json``), one line per run.

Usage::

    python -m analysis.plot_pretrain_loss output/pretrain_base output/pretrain_simmim --out figures/

Writes ``pretrain_loss.png``, ``pretrain_loss_epoch.csv`` (``run, epoch, train_loss, train_lr, source``)
and ``pretrain_loss_step.csv`` (``run, epoch, iter, loss, loss_smooth, lr``). Runs with the representation
monitor (``--probe_every``) also get a third panel, the probe mAP macro per epoch (k-NN solid, linear
dashed), and ``pretrain_loss_probe.csv`` (``run, epoch`` and the logged ``probe_*`` columns). Epochs are counted from 1
(epoch k is the one that ends with ``checkpoint_k.pth``); the logs count from 0.
"""
from __future__ import annotations

import argparse
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
from sarwmix.cli import ArgumentParser, count

# Lines with this few points also get markers, so a one-epoch run still shows up.
MARKER_MAX_POINTS = 30
PROBE_COLUMNS = ("probe_knn_mAP_macro", "probe_knn_mAP_micro", "probe_linear_mAP_macro",
                 "probe_linear_mAP_micro", "probe_seconds")


def epoch_table(run: RunLogs, label: str) -> pd.DataFrame:
    """Loss per epoch of one run; without ``log.txt``, the mean of the iterations of each epoch."""
    if not run.epochs.empty:
        require_columns(run.epochs, ["train_loss"], run.path / EPOCH_LOG)
        lr = run.epochs["train_lr"] if "train_lr" in run.epochs else float("nan")
        return pd.DataFrame({"run": label, "epoch": run.epochs["epoch"].astype(int) + 1,
                             "train_loss": run.epochs["train_loss"].astype(float), "train_lr": lr,
                             "source": EPOCH_LOG})
    require_columns(run.steps, ["epoch", "loss"], run.path / STEP_LOG)
    grouped = run.steps.groupby("epoch", sort=True)
    lr = grouped["lr"].last() if "lr" in run.steps else float("nan")
    table = pd.DataFrame({"train_loss": grouped["loss"].mean(), "train_lr": lr}).reset_index()
    table["epoch"] = table["epoch"].astype(int) + 1
    table.insert(0, "run", label)
    table["source"] = f"{STEP_LOG} (mean over iterations)"
    return table


def probe_table(run: RunLogs, label: str) -> pd.DataFrame:
    """The epochs of one run that logged probe metrics (``--probe_every``): ``run, epoch`` (1-based), probe_*."""
    present = [c for c in PROBE_COLUMNS if c in run.epochs]
    if run.epochs.empty or not present:
        return pd.DataFrame(columns=["run", "epoch", *PROBE_COLUMNS])
    rows = run.epochs.dropna(subset=present[:1])
    table = pd.DataFrame({"run": label, "epoch": rows["epoch"].astype(int) + 1})
    for column in PROBE_COLUMNS:
        table[column] = rows[column].astype(float) if column in rows else float("nan")
    return table.reset_index(drop=True)


def step_table(run: RunLogs, label: str, smooth: int = 0) -> pd.DataFrame:
    """Loss per iteration of one run with a trailing moving average.

    Args:
        run: the run's logs.
        label: legend label, written to the ``run`` column.
        smooth: moving-average window in iterations; 0 picks about 1/50 of the run.

    Returns:
        Columns ``run, epoch`` (1-based), ``iter, loss, loss_smooth, lr``; empty if the run has no step log.
    """
    columns = ["run", "epoch", "iter", "loss", "loss_smooth", "lr"]
    if run.steps.empty:
        return pd.DataFrame(columns=columns)
    require_columns(run.steps, ["iter", "loss"], run.path / STEP_LOG)
    window = smooth if smooth > 0 else max(1, len(run.steps) // 50)
    loss = run.steps["loss"].astype(float)
    epoch = run.steps["epoch"].astype(int) + 1 if "epoch" in run.steps else pd.NA
    return pd.DataFrame({"run": label, "epoch": epoch, "iter": run.steps["iter"].astype(int), "loss": loss,
                         "loss_smooth": loss.rolling(window, min_periods=1).mean(),
                         "lr": run.steps["lr"] if "lr" in run.steps else float("nan")})[columns]


def draw_probe(ax, probes: pd.DataFrame, labels: list[str]) -> None:
    """Probe mAP macro per epoch: k-NN solid, linear probe dashed, one colour per run."""
    for index, label in enumerate(labels):
        rows = probes[probes["run"] == label]
        for column, style in (("probe_knn_mAP_macro", "-"), ("probe_linear_mAP_macro", "--")):
            if rows[column].notna().any():
                ax.plot(rows["epoch"], rows[column], style, color=f"C{index % 10}", marker="o",
                        label=f"{label} {column.split('_')[1]}")
    ax.set(xlabel="epoch", ylabel="probe mAP macro (held-out part)", title="Frozen-encoder probes")
    integer_epoch_axis(ax)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")


def draw(epochs: pd.DataFrame, steps: pd.DataFrame, labels: list[str], logy: bool = False,
         probes: pd.DataFrame | None = None) -> Figure:
    """Loss against epoch (left) and against iteration, raw and smoothed (middle); probe mAP when logged."""
    with_probe = probes is not None and not probes.empty
    figure = Figure(figsize=(16 if with_probe else 11, 4.2), layout="constrained")
    axes = figure.subplots(1, 3 if with_probe else 2)
    ax_epoch, ax_step = axes[0], axes[1]
    if with_probe:
        draw_probe(axes[2], probes, labels)
    for index, label in enumerate(labels):
        color = f"C{index % 10}"
        rows = epochs[epochs["run"] == label]
        marker = "o" if len(rows) <= MARKER_MAX_POINTS else None
        ax_epoch.plot(rows["epoch"], rows["train_loss"], color=color, marker=marker, label=label)
        rows = steps[steps["run"] == label]
        if not rows.empty:
            ax_step.plot(rows["iter"], rows["loss"], color=color, alpha=0.25, linewidth=0.8)
            ax_step.plot(rows["iter"], rows["loss_smooth"], color=color, label=f"{label} (smoothed)")
    ax_epoch.set(xlabel="epoch", ylabel="training loss (mean over epoch)", title="Loss per epoch")
    integer_epoch_axis(ax_epoch)
    ax_step.set(xlabel="iteration (global step)", ylabel="training loss", title="Loss per iteration")
    if steps.empty:
        ax_step.text(0.5, 0.5, f"no {STEP_LOG} found", ha="center", va="center", transform=ax_step.transAxes)
    for ax in (ax_epoch, ax_step):
        ax.grid(True, alpha=0.3)
        if logy:
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend(fontsize="small")
    return figure


def plot_pretrain_loss(run_dirs: list[Path], labels: list[str] | None = None, smooth: int = 0,
                       logy: bool = False) -> tuple[Figure, pd.DataFrame, pd.DataFrame]:
    """Read the runs and build the figure and the per-epoch and per-step tables (``figure.probes``: the
    probe table, empty without ``--probe_every``)."""
    run_dirs = [Path(path) for path in run_dirs]
    labels = run_labels(run_dirs, labels)
    runs = [read_run(path) for path in run_dirs]
    epochs = pd.concat([epoch_table(run, label) for run, label in zip(runs, labels)], ignore_index=True)
    step_parts = [step_table(run, label, smooth) for run, label in zip(runs, labels)]
    steps = pd.concat([part for part in step_parts if not part.empty] or step_parts[:1], ignore_index=True)
    probe_parts = [probe_table(run, label) for run, label in zip(runs, labels)]
    probes = pd.concat([p for p in probe_parts if not p.empty] or probe_parts[:1], ignore_index=True)
    figure = draw(epochs, steps, labels, logy, probes)
    figure.probes = probes
    return figure, epochs, steps


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], parents=[output_parser()])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with log.txt / train_log.json)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: folder)")
    parser.add_argument("--smooth", type=count(0), default=0,
                        help="moving-average window in iterations of the per-step curve (0: 1/50 of the run)")
    parser.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def job() -> list[Path]:
        figure, epochs, steps = plot_pretrain_loss(args.runs, args.labels, args.smooth, args.logy)
        stem = args.name or "pretrain_loss"
        tables = {"_epoch": epochs, "_step": steps}
        if not figure.probes.empty:
            tables["_probe"] = figure.probes
        return write_outputs(args.out, stem, figure, tables, args.dpi, args.title)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
