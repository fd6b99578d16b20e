"""Downstream metrics against the pretraining checkpoint epoch (powers of two, 1 to 1024).

Usage::

    python -m analysis.plot_epoch_sweep "output/sweep/**/results.json" --metric mAP_macro --out figures/

Each finetune ``results.json`` gives one point at its ``pretrain_epoch`` (the completed epochs stored in the
pretraining checkpoint it started from); runs repeated with other seeds are averaged (error bar: sample
standard deviation). Only seeds are averaged: a ``results.json`` that re-scores a checkpoint already scored
(an ``--eval`` run, same ``evaluated_checkpoint``) is counted once, and runs whose ``config.yaml`` (beside
``results.json``) differ in a hyper-parameter are separate series, named by the differing values. Runs from
random initialisation (``finetune: null``) are drawn as a dashed horizontal reference. Writes
``epoch_sweep.png`` and ``epoch_sweep.csv`` (``metric, split, model, protocol, train_fraction, hparams,
init, pretrain_epoch, mean, std, n``). Linear probes and finetuning runs (``freeze_encoder``) are separate
series; the title names the data the runs were scored on.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.logs import (
    PRETRAINED,
    RANDOM_INIT,
    data_title,
    metric_column,
    output_parser,
    read_config,
    read_results,
    run_main,
    select_task,
    summarise,
    write_outputs,
)
from sarwmix.cli import ArgumentParser
from sarwmix.errors import DataError

GROUP = ["model", "protocol", "train_fraction", "hparams", "init", "pretrain_epoch"]
SERIES = ["model", "protocol", "train_fraction", "hparams"]
# config.yaml keys that say where or how a run ran (or are grouped already), not what it learned: runs that
# differ only in these are seeds of one point. The seed itself, the output folders, the pretraining
# checkpoint (its epoch is the x axis), the data location, threads, devices, logging and resuming.
NOT_HYPERPARAMETERS = frozenset({
    "seed", "output_dir", "log_dir", "resume", "finetune", "checkpoint_sha256", "config", "override",
    "data_path", "split_file", "device", "dist_url", "dist_on_itp", "dist_eval", "num_workers", "pin_mem",
    "num_threads", "cpu_memory", "progress", "compile", "grad_ckpt", "save_freq", "start_epoch", "amp",
    "model", "train_fraction", "task", "freeze_encoder"})  # the protocol is a series of its own


def epoch_ticks(max_epoch: int) -> list[int]:
    """Powers of two from 1 up to 1024, or further if a checkpoint is later than that."""
    ticks = [1]
    while ticks[-1] < max(1024, max_epoch):
        ticks.append(ticks[-1] * 2)
    return ticks


def drawable(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that have a place on the plot: pretrained with an epoch >= 1, or random init."""
    pretrained = frame["init"] == PRETRAINED
    bad = pretrained & (frame["pretrain_epoch"].isna() | (frame["pretrain_epoch"].fillna(0) < 1))
    for path in frame.loc[bad, "path"]:
        print(f"warning: {path}: pretrained run without a pretrain_epoch >= 1; left out", file=sys.stderr)
    return frame[~bad].reset_index(drop=True)


def checkpoint_identity(evaluated: str | None, results_path: str) -> str:
    """The checkpoint a results.json scored: its real path where it exists, else the path as written (a
    results.json that does not name one is its own identity)."""
    if not evaluated:
        return results_path
    return os.path.realpath(evaluated) if Path(evaluated).exists() else os.path.normpath(evaluated)


def drop_rescores(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated checkpoint: the run whose folder holds it, else the first by path.

    An ``--eval`` re-score of a checkpoint is the same model scored again, not another seed.
    """
    keys = [checkpoint_identity(c, p) for c, p in zip(frame["evaluated_checkpoint"], frame["path"])]
    owner = [Path(k).parent == Path(p).parent for k, p in zip(keys, frame["path"])]
    ranked = frame.assign(_key=keys, _owner=owner).sort_values(["_owner", "path"], ascending=[False, True])
    repeated = ranked["_key"].duplicated()
    first = ranked[~repeated].set_index("_key")["path"]
    for path, key in zip(ranked.loc[repeated, "path"], ranked.loc[repeated, "_key"]):
        print(f"note: {path}: re-scores {key}, already scored by {first[key]}; counted once", file=sys.stderr)
    return ranked[~repeated].drop(columns=["_key", "_owner"]).sort_values("path").reset_index(drop=True)


def label_hyperparameters(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``hparams``: the config.yaml values (beside each results.json) of the keys that differ between
    runs, e.g. ``"blr=0.001, epochs=50"``; empty when the runs differ only in seeds and locations."""
    configs = [{k: v for k, v in read_config(Path(path).parent / "config.yaml").items()
                if k not in NOT_HYPERPARAMETERS} for path in frame["path"]]
    keys = sorted(set().union(*configs)) if configs else []
    varying = [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]
    if varying:
        print(f"note: runs differ in {', '.join(varying)} (config.yaml): one series per setting",
              file=sys.stderr)
    labels = [", ".join(f"{k}={config.get(k)}" for k in varying) for config in configs]
    return frame.assign(hparams=labels)


def sweep_table(frame: pd.DataFrame, metrics: list[str | None], split: str) -> pd.DataFrame:
    """Mean/std/count of each metric per model, training fraction, initialisation and pretraining epoch."""
    parts = []
    for metric in metrics:
        column = metric_column(frame, metric, split)
        table = summarise(frame, GROUP, column)
        table.insert(0, "split", split)
        table.insert(0, "metric", column.split("_", 1)[1])
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def _series_label(model: str, protocol: str, fraction: float, hparams: str, frame: pd.DataFrame) -> str:
    """Name a line only by what varies between lines."""
    parts = [str(model)] if frame["model"].nunique() > 1 else []
    if frame["protocol"].nunique() > 1:
        parts.append(protocol)
    if frame["train_fraction"].nunique() > 1:
        parts.append(f"{fraction * 100:g}% labels")
    if hparams:
        parts.append(hparams)
    return ", ".join(parts) or "pretrained"


def _draw_metric(ax, table: pd.DataFrame, metric: str, split: str) -> None:
    """One panel: a line per (model, fraction, hyper-parameters) over epochs, random init as a dashed level."""
    series = table.drop_duplicates(SERIES)[SERIES]
    for index, (model, protocol, fraction, hparams) in enumerate(series.itertuples(index=False)):
        color = f"C{index % 10}"
        rows = table[(table["model"] == model) & (table["protocol"] == protocol) & (table["train_fraction"] == fraction)
                     & (table["hparams"] == hparams)]
        label = _series_label(model, protocol, fraction, hparams, table)
        points = rows[rows["init"] == PRETRAINED].sort_values("pretrain_epoch")
        if not points.empty:
            ax.errorbar(points["pretrain_epoch"].astype(float), points["mean"], yerr=points["std"].fillna(0),
                        color=color, marker="o", capsize=3, label=label)
        for level in rows.loc[rows["init"] == RANDOM_INIT, "mean"]:
            ax.axhline(level, color=color, linestyle="--", linewidth=1, label=f"{label}: {RANDOM_INIT}")
    ax.set_xscale("log", base=2)
    ticks = epoch_ticks(int(table["pretrain_epoch"].max()) if table["pretrain_epoch"].notna().any() else 1)
    ax.set_xticks(ticks, [str(tick) for tick in ticks])
    ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    ax.set(xlabel="pretraining epochs of the checkpoint (log2 scale)", ylabel=f"{split} {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def draw(table: pd.DataFrame, title: str) -> Figure:
    """One panel per metric of ``table`` (from sweep_table); ``title``: what the runs were scored on."""
    metrics = list(dict.fromkeys(table["metric"]))
    figure = Figure(figsize=(6.5 * len(metrics), 4.5), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rows = table[table["metric"] == metric]
        _draw_metric(ax, rows, metric, rows["split"].iloc[0])
        ax.set_title(f"{title}: {metric} vs pretraining length")
    return figure


def plot_epoch_sweep(patterns: list[str], metrics: list[str] | None = None, split: str = "test",
                     task: str | None = None) -> tuple[Figure, pd.DataFrame]:
    """Read the results, aggregate them per pretraining epoch and build the figure and the table."""
    frame = label_hyperparameters(drop_rescores(drawable(select_task(read_results(patterns), task))))
    if not (frame["init"] == PRETRAINED).any():
        raise DataError(f"{' '.join(patterns)}: no results from a pretrained checkpoint with pretrain_epoch")
    table = sweep_table(frame, metrics or [None], split)
    return draw(table, data_title(frame)), table


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], parents=[output_parser()])
    parser.add_argument("results", nargs="+", help="results.json files, globs (quote ** globs) or folders")
    parser.add_argument("--metric", nargs="+", default=None,
                        help="metric name(s), e.g. mAP_macro f1_micro (default: mAP_macro for ben, "
                        "f1 for sen12flood)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="results block to plot")
    parser.add_argument("--task", default=None, help="keep only this task (ben or sen12flood)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def job() -> list[Path]:
        figure, table = plot_epoch_sweep(args.results, args.metric, args.split, args.task)
        stem = args.name or "epoch_sweep"
        return write_outputs(args.out, stem, figure, {"": table}, args.dpi, args.title)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
