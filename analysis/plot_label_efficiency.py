"""Label efficiency: a downstream metric against the fraction of labelled training data used.

Usage::

    python -m analysis.plot_label_efficiency "output/label_eff/**/results.json" --out figures/

Pretrained runs (``finetune`` set) and runs from random initialisation (``finetune: null``) form two lines;
runs repeated with other seeds are averaged (error bar: sample standard deviation). Runs of different
protocols (``freeze_encoder``: a linear probe of the frozen encoder, or finetuning of every layer) are
never averaged together: each protocol gets its own lines. If the pretrained runs start from checkpoints of
several pretraining lengths, each length gets its own line (or keep one with ``--pretrain_epoch``). The
title names the data the runs were scored on (``dataset`` of results.json). Writes ``label_efficiency.png``
and ``label_efficiency.csv`` (``metric, split, model, protocol, init, pretrain_epoch, train_fraction,
percent, mean, std, n``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.logs import (
    LINEAR_PROBE,
    PRETRAINED,
    RANDOM_INIT,
    data_title,
    integer_epoch_axis,
    metric_column,
    output_parser,
    read_results,
    run_main,
    select_task,
    summarise,
    write_outputs,
)
from sarwmix.cli import ArgumentParser, count
from sarwmix.errors import ConfigError

GROUP = ["model", "protocol", "init", "pretrain_epoch", "train_fraction"]
LINE = ["model", "protocol", "init", "pretrain_epoch"]
# The fractions of the paper's protocol always get a tick, other fractions found in the results are added.
STANDARD_PERCENTS = (12.5, 25.0, 50.0, 100.0)


def keep_pretrain_epoch(frame: pd.DataFrame, epoch: int | None) -> pd.DataFrame:
    """Keep random-init runs and the pretrained runs from checkpoints of ``epoch`` (all if None)."""
    if epoch is None:
        return frame
    keep = (frame["init"] == RANDOM_INIT) | (frame["pretrain_epoch"] == epoch).fillna(False)
    if not (keep & (frame["init"] == PRETRAINED)).any():
        found = sorted(int(e) for e in frame["pretrain_epoch"].dropna().unique())
        raise ConfigError(f"--pretrain_epoch {epoch}: no pretrained results with it; found {found}")
    return frame[keep].reset_index(drop=True)


def efficiency_table(frame: pd.DataFrame, metric: str | None, split: str) -> pd.DataFrame:
    """Mean/std/count of the metric per model, initialisation, pretraining epoch and training fraction."""
    column = metric_column(frame, metric, split)
    table = summarise(frame, GROUP, column)
    table.insert(table.columns.get_loc("train_fraction") + 1, "percent", table["train_fraction"] * 100.0)
    table.insert(0, "split", split)
    table.insert(0, "metric", column.split("_", 1)[1])
    return table


def _series(table: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(label, init, rows) per line (model, protocol, initialisation, pretraining epoch), pretrained lines
    first; labels name only what varies between lines."""
    several_models = table["model"].nunique() > 1
    several_protocols = table["protocol"].nunique() > 1
    several_epochs = table.loc[table["init"] == PRETRAINED, "pretrain_epoch"].nunique() > 1
    keys = table[LINE].drop_duplicates()
    keys = pd.concat([keys[keys["init"] == PRETRAINED], keys[keys["init"] == RANDOM_INIT]])
    lines = []
    for model, protocol, init, epoch in keys.itertuples(index=False):
        same_epoch = table["pretrain_epoch"].isna() if pd.isna(epoch) else table["pretrain_epoch"] == epoch
        rows = table[(table["model"] == model) & (table["protocol"] == protocol) & (table["init"] == init)
                     & same_epoch.fillna(False)]
        label = init
        if init == PRETRAINED and several_epochs:
            label += f" ({int(epoch)}-epoch checkpoint)" if not pd.isna(epoch) else " (epoch unknown)"
        label = f"{protocol}, {label}" if several_protocols else label
        label = f"{model}: {label}" if several_models else label
        lines.append((label, init, rows.sort_values("percent")))
    return lines


def draw(table: pd.DataFrame, title: str) -> Figure:
    """Metric against labelled fraction (log2 axis in percent), one line per protocol and initialisation;
    ``title``: what the runs were scored on (``analysis.logs.data_title``)."""
    metric, split = table["metric"].iloc[0], table["split"].iloc[0]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    for index, (label, init, rows) in enumerate(_series(table)):
        style = "--" if init == RANDOM_INIT else "-"
        marker = "s" if rows["protocol"].iloc[0] == LINEAR_PROBE else "o"
        ax.errorbar(rows["percent"], rows["mean"], yerr=rows["std"].fillna(0), color=f"C{index % 10}",
                    linestyle=style, marker=marker, capsize=3, label=label)
    percents = sorted(set(STANDARD_PERCENTS) | set(table["percent"].round(6)))
    ax.set_xscale("log", base=2)
    ax.set_xticks(percents, [f"{p:g}%" for p in percents])
    ax.set_xlim(percents[0] / 1.3, percents[-1] * 1.3)
    ax.set(xlabel="labelled training data used (% of the training split, log2 scale)",
           ylabel=f"{split} {metric}", title=f"{title}: label efficiency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return figure


# Study arms that are references, not pretraining methods: drawn dashed, in fixed colours.
STUDY_REFERENCES = {"random_init": "black", "handcrafted": "grey"}
STUDY_PROTOCOLS = {"linear": "linear probe (frozen encoder)", "knn": "k-NN (frozen encoder)",
                   "finetune": "full finetuning"}


def draw_study(summary: pd.DataFrame, metric: str = "mAP_macro") -> Figure:
    """One panel per protocol of a study's ``summary.csv``: ``metric`` (mean +- std over seeds) against the
    labelled fraction, one line per arm; the references (random init, hand-crafted floor) dashed.

    Args:
        summary: columns ``arm, fraction, protocol, metric, mean, std, n`` (``analysis.study``).
    """
    rows = summary[summary["metric"] == metric]
    if rows.empty:
        raise ConfigError(f"summary has no rows of metric {metric!r}; found {sorted(summary['metric'].unique())}")
    protocols = [p for p in STUDY_PROTOCOLS if p in set(rows["protocol"])]
    figure = Figure(figsize=(3.6 * len(protocols) + 1.8, 3.8), layout="constrained")
    axes = figure.subplots(1, len(protocols), sharey=True, squeeze=False)[0]
    arms = list(dict.fromkeys(rows["arm"]))
    for ax, protocol in zip(axes, protocols, strict=True):
        part = rows[rows["protocol"] == protocol]
        for index, arm in enumerate(arms):
            line = part[part["arm"] == arm].sort_values("fraction")
            if line.empty:
                continue
            reference = STUDY_REFERENCES.get(arm)
            dodge = 2.0 ** (0.05 * (index - (len(arms) - 1) / 2))  # side by side, so error bars stay readable
            ax.errorbar(line["fraction"] * 100 * dodge, line["mean"], yerr=line["std"].fillna(0), capsize=3, marker="o",
                        markersize=4, linestyle="--" if reference else "-", color=reference or f"C{index % 10}",
                        label=arm)
        percents = sorted(set((part["fraction"] * 100).round(6)))
        ax.set_xscale("log", base=2)
        ax.set_xticks(percents, [f"{p:g}%" for p in percents])
        ax.set(title=STUDY_PROTOCOLS[protocol], xlabel="labelled training data (log2 scale)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    handles = {}
    for ax in axes:  # one legend for every panel: the floor has no finetuning line
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return figure


def draw_probe_curves(curves: pd.DataFrame, metric: str = "mAP_macro") -> Figure:
    """Probe mAP of each pretraining arm's checkpoints against the epoch (k-NN left, linear right).

    Args:
        curves: columns ``arm, epoch, knn_<metric>, linear_<metric>`` (``analysis.study``'s
            ``probe_curves.csv``); the ``random_init`` row is drawn as a dashed level.
    """
    figure = Figure(figsize=(9.5, 3.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, probe in zip(axes, ("knn", "linear"), strict=True):
        column = f"{probe}_{metric}"
        for index, (arm, rows) in enumerate(curves.groupby("arm", sort=False)):
            if arm in STUDY_REFERENCES:
                ax.axhline(rows[column].iloc[0], color=STUDY_REFERENCES[arm], linestyle="--", label=arm)
            else:
                ax.plot(rows["epoch"], rows[column], marker="o", markersize=3, color=f"C{index % 10}", label=arm)
        ax.set(title=f"{STUDY_PROTOCOLS[probe]} during pretraining", xlabel="pretraining epoch")
        integer_epoch_axis(ax)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"probe {metric}")
    axes[1].legend(fontsize="small")
    return figure


def plot_label_efficiency(patterns: list[str], metric: str | None = None, split: str = "test",
                          task: str | None = None, pretrain_epoch: int | None = None
                          ) -> tuple[Figure, pd.DataFrame]:
    """Read the results, aggregate them per training fraction and build the figure and the table."""
    frame = keep_pretrain_epoch(select_task(read_results(patterns), task), pretrain_epoch)
    table = efficiency_table(frame, metric, split)
    return draw(table, data_title(frame)), table


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], parents=[output_parser()])
    parser.add_argument("results", nargs="+", help="results.json files, globs (quote ** globs) or folders")
    parser.add_argument("--metric", default=None,
                        help="metric name, e.g. mAP_micro (default: mAP_macro for ben, f1 for sen12flood)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="results block to plot")
    parser.add_argument("--task", default=None, help="keep only this task (ben or sen12flood)")
    parser.add_argument("--pretrain_epoch", type=count(0), default=None,
                        help="keep only pretrained runs from checkpoints of this many epochs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def job() -> list[Path]:
        figure, table = plot_label_efficiency(args.results, args.metric, args.split, args.task,
                                              args.pretrain_epoch)
        stem = args.name or "label_efficiency"
        return write_outputs(args.out, stem, figure, {"": table}, args.dpi, args.title)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
