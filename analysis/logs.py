"""Readers of the training logs and finetune summaries, and the writer of figures and tables.

The formats, as written by ``main_pretrain.py`` / ``main_finetune.py`` into a run's output folder:

- ``log.txt``: JSON lines, one per epoch: ``epoch`` (0-based), ``train_loss``, ``train_lr``,
  ``train_grad_norm``, ``epoch_time_s``, ``img_per_s``, ``n_parameters``; finetune runs add ``val_<metric>``.
- ``train_log.json``: JSON lines, one per iteration: ``epoch``, ``iter`` (global), ``loss``, ``lr``,
  ``grad_norm``, ``time_s`` (seconds since the run started).
- ``config.yaml``: the resolved configuration, a flat mapping of flag name to value.
- ``results.json`` (finetune): ``task``, ``model``, ``dataset``, ``finetune`` (pretraining checkpoint or
  null), ``pretrain_epoch`` (completed epochs in that checkpoint or null), ``train_fraction``,
  ``freeze_encoder`` (the protocol: true for a linear probe of the frozen encoder, false for finetuning of
  every layer, null when unknown), ``best_epoch``, ``selection_metric``, ``val`` and ``test`` (metric name ->
  value). A file written before ``freeze_encoder`` was recorded takes it from the ``config.yaml`` beside it.

Unknown keys are kept (readers never reject a newer log for having more fields).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sarwmix.cli import count
from sarwmix.errors import ConfigError, DataError, SarwmixError

EPOCH_LOG = "log.txt"
STEP_LOG = "train_log.json"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RESULT_KEYS = ("task", "finetune", "pretrain_epoch", "train_fraction", "val", "test")
RANDOM_INIT = "random init"
PRETRAINED = "pretrained"
# The model of a results.json without a "model" key: a real name, so that it groups and matches like one.
UNKNOWN_MODEL = "unknown model"
# The protocol of a results.json (its freeze_encoder): runs of different protocols are never averaged together.
LINEAR_PROBE = "linear probe"
FINETUNE = "finetune"
UNKNOWN_PROTOCOL = "protocol unknown"
# Data set names (--dataset) as figure titles name them.
DATASET_TITLES = {"synthetic": "synthetic data", "benv1": "BigEarthNet v1", "benv1_zarr": "BigEarthNet v1",
                  "benv2": "BigEarthNet v2", "benv2_lmdb": "BigEarthNet v2", "packed": "packed data",
                  "sen12flood": "SEN12-FLOOD"}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines log into a list of records.

    A run killed while writing leaves a cut-off last line: that line is dropped (with a warning on
    stderr). A corrupt line anywhere else means the file is damaged and raises.

    Args:
        path: the ``.txt`` / ``.json`` file holding one JSON object per line.

    Returns:
        One dict per non-blank line, in file order.

    Raises:
        DataError: the file is missing, or a line before the last is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: log file not found")
    lines = [(number, text) for number, text in enumerate(path.read_text().splitlines(), 1) if text.strip()]
    records = []
    for position, (number, text) in enumerate(lines):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            if position == len(lines) - 1:
                print(f"warning: {path}:{number}: dropped a truncated last line", file=sys.stderr)
                break
            message = f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line"
            raise DataError(message) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a run's resolved ``config.yaml`` (a flat mapping); an absent file gives ``{}``."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({err})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a mapping of flag name to value, got {type(config).__name__}")
    return config


def _frame(records: list[dict[str, Any]], key: str, source: Path) -> pd.DataFrame:
    """Records -> DataFrame sorted by ``key``; a resumed run that re-logs an epoch keeps the newest line."""
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame.from_records(records)
    if key not in frame.columns or frame[key].isna().any():
        raise DataError(f"{source}: every line needs the key {key!r}")
    frame = frame.drop_duplicates(subset=key, keep="last")
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class RunLogs:
    """The logs of one run folder.

    Attributes:
        path: the run folder.
        epochs: one row per epoch from ``log.txt`` (``epoch`` 0-based, as logged); empty if absent.
        steps: one row per iteration from ``train_log.json`` (sorted by ``iter``); empty if absent.
        config: the resolved configuration (``{}`` if ``config.yaml`` is absent).
    """

    path: Path
    epochs: pd.DataFrame
    steps: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)


def read_run(run_dir: str | Path) -> RunLogs:
    """Read ``log.txt``, ``train_log.json`` and ``config.yaml`` of a run folder.

    Raises:
        DataError: the folder does not exist, holds neither log file, or its logs are empty.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    epoch_path, step_path = run_dir / EPOCH_LOG, run_dir / STEP_LOG
    if not epoch_path.is_file() and not step_path.is_file():
        raise DataError(f"{run_dir}: neither {EPOCH_LOG} nor {STEP_LOG} found; is this a run output folder?")
    epochs = _frame(read_jsonl(epoch_path), "epoch", epoch_path) if epoch_path.is_file() else pd.DataFrame()
    steps = _frame(read_jsonl(step_path), "iter", step_path) if step_path.is_file() else pd.DataFrame()
    if epochs.empty and steps.empty:
        raise DataError(f"{run_dir}: {EPOCH_LOG} / {STEP_LOG} hold no records yet")
    return RunLogs(path=run_dir, epochs=epochs, steps=steps, config=read_config(run_dir / CONFIG_FILE))


def require_columns(frame: pd.DataFrame, columns: Iterable[str], source: Path) -> None:
    """Raise DataError naming ``source`` if ``frame`` lacks any of ``columns``."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing key(s) {', '.join(missing)} in the log lines")


def run_labels(run_dirs: list[Path], labels: list[str] | None = None) -> list[str]:
    """Legend labels for runs: ``labels`` if given, else folder names (parent/name where names clash)."""
    if labels:
        if len(labels) != len(run_dirs):
            raise ConfigError(f"--labels: got {len(labels)} labels for {len(run_dirs)} runs; give one each")
        return list(labels)
    names = [path.resolve().name for path in run_dirs]
    clash = len(set(names)) < len(names)
    return [f"{p.resolve().parent.name}/{p.resolve().name}" if clash else n for p, n in zip(run_dirs, names)]


def expand_inputs(patterns: Iterable[str], filename: str = RESULTS_FILE) -> list[Path]:
    """Expand globs, files and folders (searched recursively for ``filename``) into sorted unique files.

    Raises:
        DataError: a pattern matches nothing.
    """
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(path.rglob(filename))
        else:
            matches = [Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file()]
        if not matches:
            raise DataError(f"{pattern!r}: no {filename} matched")
        found.update(match.resolve() for match in matches)
    return sorted(found)


def _metrics(value: Any, key: str, path: Path) -> dict[str, float]:
    """Check a ``val``/``test`` block: a mapping of metric name to number (null kept as NaN)."""
    if not isinstance(value, dict):
        raise DataError(f"{path}: {key!r} must map metric names to numbers, got {type(value).__name__}")
    out = {}
    for name, number in value.items():
        if number is not None and not isinstance(number, (int, float)):
            raise DataError(f"{path}: {key}.{name} must be a number, got {number!r}")
        out[f"{key}_{name}"] = math.nan if number is None else float(number)
    return out


def _protocol(result: dict[str, Any], path: Path) -> str:
    """LINEAR_PROBE or FINETUNE from ``freeze_encoder`` (results.json, else the config.yaml beside it)."""
    frozen = result.get("freeze_encoder")
    if frozen is None and "freeze_encoder" not in result:
        frozen = read_config(path.parent / CONFIG_FILE).get("freeze_encoder")
    if not isinstance(frozen, bool):
        return UNKNOWN_PROTOCOL
    return LINEAR_PROBE if frozen else FINETUNE


def _result_row(path: Path) -> dict[str, Any]:
    """One validated, flattened ``results.json``."""
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(result, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; expected a finetune results.json")
    fraction, epoch = result["train_fraction"], result["pretrain_epoch"]
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise DataError(f"{path}: train_fraction must be a number in (0, 1], got {fraction!r}")
    if epoch is not None and (not isinstance(epoch, int) or epoch < 0):
        raise DataError(f"{path}: pretrain_epoch must be a non-negative integer or null, got {epoch!r}")
    row = {"path": str(path), "task": result["task"], "model": result.get("model") or UNKNOWN_MODEL,
           "dataset": result.get("dataset"), "protocol": _protocol(result, path),
           "finetune": result["finetune"], "pretrain_epoch": epoch, "train_fraction": float(fraction),
           "best_epoch": result.get("best_epoch"), "selection_metric": result.get("selection_metric"),
           "evaluated_checkpoint": result.get("evaluated_checkpoint"),
           "init": RANDOM_INIT if result["finetune"] is None else PRETRAINED}
    row.update(_metrics(result["val"], "val", path))
    row.update(_metrics(result["test"], "test", path))
    return row


def read_results(patterns: str | Iterable[str]) -> pd.DataFrame:
    """Read finetune ``results.json`` files into one table.

    Args:
        patterns: one or more globs (``**`` allowed), files or folders searched for ``results.json``.

    Returns:
        One row per file, sorted by path: ``path, task, model`` (UNKNOWN_MODEL where the file has none),
        ``dataset`` (None where absent), ``protocol`` (LINEAR_PROBE, FINETUNE or UNKNOWN_PROTOCOL),
        ``finetune, pretrain_epoch`` (nullable int),
        ``train_fraction, best_epoch, selection_metric, evaluated_checkpoint`` (None where absent),
        ``init`` (``"pretrained"`` or ``"random init"``), and
        ``val_<metric>``, ``test_<metric>`` for every metric found (NaN where a file lacks it).
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    frame = pd.DataFrame([_result_row(path) for path in expand_inputs(patterns)])
    frame["pretrain_epoch"] = frame["pretrain_epoch"].astype("Int64")
    return frame


def _task_table() -> dict:
    """``tasks.TASKS``, imported on first use: the task modules bring torch, timm and scikit-learn (seconds
    of start-up), which reading logs and drawing figures do not need otherwise."""
    from tasks import TASKS

    return TASKS


def task_title(name: str) -> str:
    """The title of a task in figures (the name itself for a task this code does not know)."""
    tasks = _task_table()
    return tasks[name].title if name in tasks else name


def data_title(frame: pd.DataFrame) -> str:
    """What a figure of these results is about: the data sets named by their ``dataset`` and the task, e.g.
    ``"synthetic data (BigEarthNet task)"``; the task's title alone where the files do not name their data."""
    task = task_title(frame["task"].iloc[0])
    known = [d for d in dict.fromkeys(frame["dataset"]) if isinstance(d, str)] if "dataset" in frame else []
    if not known:
        return task
    names = list(dict.fromkeys(DATASET_TITLES.get(d, d) for d in known))
    if all(name.startswith(task) for name in names):  # "BigEarthNet v1", "SEN12-FLOOD": the task is said
        return " + ".join(names)
    return f"{' + '.join(names)} ({task} task)"


def metric_column(frame: pd.DataFrame, metric: str | None, split: str) -> str:
    """The column of ``metric`` on ``split``; ``None`` picks the task's selection metric (``default_metric``)."""
    if metric is None:
        tasks, table = frame["task"].unique(), _task_table()
        metric = table[tasks[0]].default_metric if len(tasks) == 1 and tasks[0] in table else None
        if metric is None:
            raise ConfigError(f"no default metric for task(s) {', '.join(map(str, tasks))}; pass --metric")
    column = f"{split}_{metric}"
    if column not in frame.columns or frame[column].isna().all():
        counts = {"n_samples", "n_classes_present"}  # stored beside the metrics, not metrics
        have = sorted(c.split("_", 1)[1] for c in frame.columns if c.startswith(f"{split}_")
                      and c.split("_", 1)[1] not in counts)
        raise ConfigError(f"--metric {metric}: not in the {split} results; available: {', '.join(have)}")
    return column


def select_task(frame: pd.DataFrame, task: str | None) -> pd.DataFrame:
    """Keep the rows of one task; results of several tasks cannot share an axis."""
    tasks = sorted(frame["task"].unique())
    if task is not None:
        if task not in tasks:
            raise ConfigError(f"--task {task}: no results for it; found {', '.join(tasks)}")
        return frame[frame["task"] == task].reset_index(drop=True)
    if len(tasks) > 1:
        raise ConfigError(f"results mix tasks {', '.join(tasks)}; choose one with --task")
    return frame


def summarise(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean, sample std and count of ``value`` per group (repeated seeds collapse to one point)."""
    grouped = frame.groupby(by, dropna=False, sort=True)[value]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    return table.rename(columns={"count": "n"})


def integer_epoch_axis(ax) -> None:
    """Whole-number ticks on the x axis of ``ax`` (epochs), also when it holds a single epoch.

    ``MaxNLocator(integer=True)`` alone falls back to fractional ticks (0.945, 0.960, ...) when fewer than
    two whole numbers lie in view, as around the one point of a one-epoch run.
    """
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def output_parser() -> argparse.ArgumentParser:
    """Parent parser with the output flags shared by every script."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, default=Path("analysis_out"),
                        help="folder for the PNG and CSV files (created if needed)")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: per script)")
    parser.add_argument("--dpi", type=count(1), default=150, help="resolution of the PNG")
    parser.add_argument("--title", default=None, help="extra title above the figure")
    return parser


def write_outputs(out_dir: Path, stem: str, figure: Figure, tables: dict[str, pd.DataFrame],
                  dpi: int = 150, title: str | None = None) -> list[Path]:
    """Save ``<stem>.png`` (with ``title`` above it if given) and one ``<stem><suffix>.csv`` per table.

    Returns:
        The paths written, PNG first.
    """
    if title:
        figure.suptitle(title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    figure.savefig(png, dpi=dpi)
    written = [png]
    for suffix, table in tables.items():
        csv = out_dir / f"{stem}{suffix}.csv"
        table.to_csv(csv, index=False)
        written.append(csv)
    return written


def run_main(job: Callable[[], list[Path]]) -> int:
    """Run a script body: print the files written, or one ``error:`` line and return 2 on a user error."""
    try:
        written = job()
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
