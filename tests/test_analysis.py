"""Tests of analysis/: log readers and the four figure scripts, on logs written in the real formats."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # analysis/ is a folder of scripts, not an installed package: import it from the checkout.
    sys.path.insert(0, str(REPO))

from analysis import logs, plot_epoch_sweep, plot_label_efficiency, plot_pretrain_loss, plot_time  # noqa: E402
from sarwmix.errors import ConfigError, DataError  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BEN_METRICS = ("mAP_macro", "mAP_micro", "f1_macro", "f1_micro", "precision_macro", "precision_micro")
SEN12_METRICS = ("accuracy", "precision", "recall", "f1")


# ----------------------------------------------------------------------------------------------------------
# Writers of the real log formats (seeded)
# ----------------------------------------------------------------------------------------------------------
def write_pretrain_run(run_dir: Path, n_epochs: int, iters: int = 12, seed: int = 0, steps: bool = True,
                       epoch_time: bool = True) -> dict:
    """Write log.txt / train_log.json / config.yaml of a pretraining run; return what was written."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    total_iters, batch, clock = n_epochs * iters, 64, 0.0
    epoch_lines, step_lines, losses, seconds = [], [], [], []
    for epoch in range(n_epochs):
        start, epoch_losses = clock, []
        for local in range(iters):
            it = epoch * iters + local
            loss = 0.35 + 0.65 * math.exp(-it / (3 * iters)) + rng.normal(0.0, 0.01)
            lr = 1.5e-4 * min(1.0, (it + 1) / iters) * 0.5 * (1 + math.cos(math.pi * it / total_iters))
            clock += rng.uniform(0.4, 0.6)
            step_lines.append({"epoch": epoch, "iter": it, "loss": loss, "lr": lr,
                               "grad_norm": rng.uniform(0.5, 2.0), "time_s": clock, "mask_ratio": 0.5})
            epoch_losses.append(loss)
        line = {"epoch": epoch, "train_loss": float(np.mean(epoch_losses)), "train_lr": lr,
                "train_grad_norm": 1.1, "img_per_s": iters * batch / (clock - start),
                "n_parameters": 88_010_000}
        if epoch_time:
            line["epoch_time_s"] = clock - start
        epoch_lines.append(line)
        losses.append(line["train_loss"])
        seconds.append(clock - start)
    (run_dir / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in epoch_lines))
    if steps:
        (run_dir / "train_log.json").write_text("".join(json.dumps(line) + "\n" for line in step_lines))
    config = {"model": "mixmim_base", "mode": "mixmim", "epochs": n_epochs, "batch_size": batch, "seed": seed}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    step_losses = [line["loss"] for line in step_lines]
    return {"epoch_loss": losses, "epoch_seconds": seconds, "step_loss": step_losses}


def write_result(path: Path, task: str, pretrain_epoch: int | None, fraction: float, score: float,
                 model: str = "mixmim_base", val: bool = True) -> None:
    """Write a finetune results.json whose test metrics are ``score`` plus fixed offsets."""
    names = BEN_METRICS if task == "ben" else SEN12_METRICS
    test = {name: score + 0.01 * index for index, name in enumerate(names)}
    checkpoint = None if pretrain_epoch is None else f"/runs/pretrain/checkpoint_{pretrain_epoch}.pth"
    result = {"task": task, "model": model, "finetune": checkpoint,
              "pretrain_epoch": pretrain_epoch, "train_fraction": fraction, "best_epoch": 37,
              "selection_metric": names[0], "val": {k: v + 0.02 for k, v in test.items()} if val else {},
              "test": test}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(result, indent=2))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"analysis.{name}", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------------------------------------------------
# logs.py
# ----------------------------------------------------------------------------------------------------------
def test_read_jsonl_drops_a_truncated_last_line(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text('{"epoch": 0, "train_loss": 0.9}\n\n{"epoch": 1, "train_loss": 0.8}\n{"epoch": 2, "trai')
    records = logs.read_jsonl(path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert f"{path}:4" in capsys.readouterr().err


def test_read_jsonl_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "train_log.json"
    path.write_text('{"iter": 0, "loss": 1.0}\n{"iter": 1, "loss": \n{"iter": 2, "loss": 0.9}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        logs.read_jsonl(path)


def test_read_jsonl_rejects_non_objects_and_missing_files(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text('[1, 2]\n{"epoch": 0}\n')
    with pytest.raises(DataError, match=r"log.txt:1: expected a JSON object, got list"):
        logs.read_jsonl(path)
    with pytest.raises(DataError, match="log file not found"):
        logs.read_jsonl(tmp_path / "absent.txt")


def test_read_run_keeps_the_newest_line_of_an_epoch_logged_twice(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # A run resumed from the epoch-1 checkpoint logs epoch 1 (and 2) a second time.
    losses = [(0, 0.9), (1, 0.8), (2, 0.75), (1, 0.7), (2, 0.6)]
    lines = [{"epoch": epoch, "train_loss": loss} for epoch, loss in losses]
    (run / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = logs.read_run(run)
    assert result.epochs["epoch"].tolist() == [0, 1, 2]
    assert result.epochs["train_loss"].tolist() == [0.9, 0.7, 0.6]
    assert result.steps.empty and result.config == {}


def test_read_run_rejects_folders_without_logs(tmp_path):
    with pytest.raises(DataError, match="run folder not found"):
        logs.read_run(tmp_path / "nope")
    with pytest.raises(DataError, match="neither log.txt nor train_log.json"):
        logs.read_run(tmp_path)
    (tmp_path / "log.txt").write_text("")  # a run killed before its first epoch ended
    with pytest.raises(DataError, match="hold no records yet"):
        logs.read_run(tmp_path)


def test_read_results_flattens_metrics_and_validates(tmp_path):
    write_result(tmp_path / "a", "ben", 64, 0.5, 0.7)
    write_result(tmp_path / "b", "ben", None, 1.0, 0.6, val=False)
    frame = logs.read_results(str(tmp_path / "*" / "results.json"))
    assert len(frame) == 2 and str(frame["pretrain_epoch"].dtype) == "Int64"
    assert frame["init"].tolist() == [logs.PRETRAINED, logs.RANDOM_INIT]
    assert frame.loc[0, "test_mAP_macro"] == pytest.approx(0.7)
    assert frame.loc[0, "val_mAP_macro"] == pytest.approx(0.72) and math.isnan(frame.loc[1, "val_mAP_macro"])
    assert len(logs.read_results(str(tmp_path))) == 2  # a folder is searched recursively
    with pytest.raises(DataError, match="no results.json matched"):
        logs.read_results(str(tmp_path / "none*" / "results.json"))
    broken = tmp_path / "c" / "results.json"
    broken.parent.mkdir()
    broken.write_text(json.dumps({"task": "ben", "val": {}, "test": {}}))
    with pytest.raises(DataError, match=r"c/results.json: missing key\(s\) finetune, pretrain_epoch"):
        logs.read_results(str(broken))


# ----------------------------------------------------------------------------------------------------------
# plot_pretrain_loss.py
# ----------------------------------------------------------------------------------------------------------
def test_pretrain_loss_per_epoch_and_smoothed_per_step(tmp_path):
    long_run = write_pretrain_run(tmp_path / "runs" / "mixmim_w", n_epochs=6, iters=10, seed=1)
    short_run = write_pretrain_run(tmp_path / "runs" / "one_epoch", n_epochs=1, seed=2, steps=False)
    out = tmp_path / "out"
    code = plot_pretrain_loss.main([str(tmp_path / "runs" / "mixmim_w"), str(tmp_path / "runs" / "one_epoch"),
                                    "--out", str(out), "--smooth", "5"])
    assert code == 0
    assert_png(out / "pretrain_loss.png")
    epochs = pd.read_csv(out / "pretrain_loss_epoch.csv")
    assert list(epochs.columns) == ["run", "epoch", "train_loss", "train_lr", "source"]
    assert epochs["run"].tolist() == ["mixmim_w"] * 6 + ["one_epoch"]
    assert epochs["epoch"].tolist() == [1, 2, 3, 4, 5, 6, 1]
    assert epochs["train_loss"].to_numpy() == pytest.approx(long_run["epoch_loss"] + short_run["epoch_loss"])
    steps = pd.read_csv(out / "pretrain_loss_step.csv")
    assert len(steps) == 60 and set(steps["run"]) == {"mixmim_w"}
    expected = pd.Series(long_run["step_loss"]).rolling(5, min_periods=1).mean()
    assert steps["loss_smooth"].to_numpy() == pytest.approx(expected.to_numpy())
    assert steps["loss_smooth"].iloc[4] == pytest.approx(np.mean(long_run["step_loss"][:5]))


def test_a_one_epoch_run_gets_whole_epoch_ticks(tmp_path):
    """The smoke study pretrains for one epoch: its loss figure's epoch axis must not read 0.945, 0.960, ..."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    write_pretrain_run(tmp_path / "run", n_epochs=1, iters=4, seed=4)
    figure, _, _ = plot_pretrain_loss.plot_pretrain_loss([tmp_path / "run"])
    FigureCanvasAgg(figure).draw()
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    shown = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert shown == [1.0]


def test_pretrain_loss_epoch_curve_from_steps_without_log_txt(tmp_path):
    written = write_pretrain_run(tmp_path / "run", n_epochs=3, iters=8, seed=3)
    (tmp_path / "run" / "log.txt").unlink()
    figure, epochs, steps = plot_pretrain_loss.plot_pretrain_loss([tmp_path / "run"])
    assert epochs["epoch"].tolist() == [1, 2, 3]
    assert epochs["train_loss"].to_numpy() == pytest.approx(written["epoch_loss"])
    assert epochs["source"].str.startswith("train_log.json").all()
    assert len(steps) == 24 and figure.axes[0].get_xlabel() == "epoch"


def test_pretrain_loss_draws_the_probe_metrics_when_logged(tmp_path):
    write_pretrain_run(tmp_path / "probed", n_epochs=4, iters=4, seed=5)
    write_pretrain_run(tmp_path / "plain", n_epochs=2, iters=4, seed=6)
    log = tmp_path / "probed" / "log.txt"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    for line in lines[1::2]:  # --probe_every 2: epochs 2 and 4 carry the probe keys
        line.update(probe_knn_mAP_macro=0.3 + 0.05 * line["epoch"], probe_knn_mAP_micro=0.4,
                    probe_linear_mAP_macro=0.35, probe_linear_mAP_micro=0.45, probe_seconds=1.5)
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert plot_pretrain_loss.main([str(tmp_path / "probed"), str(tmp_path / "plain"), "--out", str(out)]) == 0
    probes = pd.read_csv(out / "pretrain_loss_probe.csv")
    assert probes["epoch"].tolist() == [2, 4] and set(probes["run"]) == {"probed"}
    assert probes["probe_knn_mAP_macro"].to_numpy() == pytest.approx([0.35, 0.45])
    figure, _, _ = plot_pretrain_loss.plot_pretrain_loss([tmp_path / "probed"])
    assert len(figure.axes) == 3 and len(figure.axes[2].lines) == 2
    figure, _, _ = plot_pretrain_loss.plot_pretrain_loss([tmp_path / "plain"])
    assert len(figure.axes) == 2 and figure.probes.empty


def test_pretrain_loss_command_line(tmp_path):
    write_pretrain_run(tmp_path / "a", n_epochs=2, seed=4)
    result = run_script("plot_pretrain_loss", "a", "--out", "figs", "--logy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "figs/pretrain_loss.png" in result.stdout
    assert_png(tmp_path / "figs" / "pretrain_loss.png")
    failed = run_script("plot_pretrain_loss", "missing_run", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == ["error: missing_run: run folder not found"]


# ----------------------------------------------------------------------------------------------------------
# plot_epoch_sweep.py
# ----------------------------------------------------------------------------------------------------------
SWEEP_EPOCHS = (1, 4, 16, 64, 256, 1024)


def write_sweep(root: Path, task: str = "ben") -> dict[int, list[float]]:
    """Two seeds per checkpoint epoch and two random-init runs; returns test scores per epoch (0: random)."""
    rng = np.random.default_rng(5)
    scores: dict[int, list[float]] = {}
    for epoch in (*SWEEP_EPOCHS, None):
        for seed in range(2):
            base = 0.55 if epoch is None else 0.6 + 0.015 * math.log2(epoch)
            score = base + rng.normal(0.0, 0.005)
            scores.setdefault(epoch or 0, []).append(score)
            write_result(root / f"ep{epoch}_seed{seed}", task, epoch, 1.0, score)
    return scores


def test_epoch_sweep_aggregates_seeds_per_checkpoint_epoch(tmp_path):
    scores = write_sweep(tmp_path / "results")
    out = tmp_path / "out"
    code = plot_epoch_sweep.main([str(tmp_path / "results" / "**" / "results.json"), "--metric", "mAP_macro",
                                  "f1_micro", "--out", str(out)])
    assert code == 0
    assert_png(out / "epoch_sweep.png")
    table = pd.read_csv(out / "epoch_sweep.csv")
    assert len(table) == 2 * (len(SWEEP_EPOCHS) + 1)
    mAP = table[table["metric"] == "mAP_macro"]
    pretrained = mAP[mAP["init"] == "pretrained"]
    assert pretrained["pretrain_epoch"].tolist() == list(SWEEP_EPOCHS)
    for epoch in SWEEP_EPOCHS:
        row = pretrained[pretrained["pretrain_epoch"] == epoch].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(scores[epoch]))
        assert row["std"] == pytest.approx(np.std(scores[epoch], ddof=1)) and row["n"] == 2
    random = mAP[mAP["init"] == "random init"].iloc[0]
    assert random["mean"] == pytest.approx(np.mean(scores[0])) and math.isnan(random["pretrain_epoch"])
    f1 = table[(table["metric"] == "f1_micro") & (table["pretrain_epoch"] == 64)].iloc[0]
    assert f1["mean"] == pytest.approx(np.mean(scores[64]) + 0.03)  # f1_micro is written as score + 0.03


def test_epoch_sweep_axis_is_log2_with_power_of_two_ticks(tmp_path):
    write_sweep(tmp_path)
    figure, table = plot_epoch_sweep.plot_epoch_sweep([str(tmp_path)])
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert [round(t) for t in ax.get_xticks()] == [2**k for k in range(11)]
    assert set(table["metric"]) == {"mAP_macro"}  # the default metric of BigEarthNet


def test_epoch_sweep_command_line_errors(tmp_path):
    write_sweep(tmp_path / "ben", "ben")
    unknown = run_script("plot_epoch_sweep", "ben", "--metric", "accuracy", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: --metric accuracy: not in the test results; available: f1_macro")
    write_result(tmp_path / "flood" / "r0", "sen12flood", 64, 1.0, 0.8)
    mixed = run_script("plot_epoch_sweep", "ben", "flood", cwd=tmp_path)
    assert mixed.returncode == 2 and "results mix tasks ben, sen12flood" in mixed.stderr
    flood = run_script("plot_epoch_sweep", "ben", "flood", "--task", "sen12flood", "--out", "o", cwd=tmp_path)
    assert flood.returncode == 0, flood.stderr
    assert pd.read_csv(tmp_path / "o" / "epoch_sweep.csv")["metric"].tolist() == ["f1"]


# ----------------------------------------------------------------------------------------------------------
# plot_time.py
# ----------------------------------------------------------------------------------------------------------
def test_time_per_epoch_and_total(tmp_path):
    base = write_pretrain_run(tmp_path / "base", n_epochs=5, seed=6)
    single = write_pretrain_run(tmp_path / "single", n_epochs=1, seed=7, steps=False)
    out = tmp_path / "out"
    assert plot_time.main([str(tmp_path / "base"), str(tmp_path / "single"), "--out", str(out)]) == 0
    assert_png(out / "run_time.png")
    per_epoch = pd.read_csv(out / "run_time_per_epoch.csv")
    assert len(per_epoch) == 6 and per_epoch["epoch"].tolist() == [1, 2, 3, 4, 5, 1]
    expected = base["epoch_seconds"] + single["epoch_seconds"]
    assert per_epoch["epoch_time_s"].to_numpy() == pytest.approx(expected)
    assert per_epoch["epoch_time_min"].to_numpy() == pytest.approx(per_epoch["epoch_time_s"].to_numpy() / 60)
    assert per_epoch["cumulative_h"].iloc[4] == pytest.approx(sum(base["epoch_seconds"]) / 3600)
    totals = pd.read_csv(out / "run_time_total.csv")
    assert totals["run"].tolist() == ["base", "single"] and totals["epochs"].tolist() == [5, 1]
    assert totals["total_h"].iloc[0] == pytest.approx(sum(base["epoch_seconds"]) / 3600)


def test_time_falls_back_to_step_stamps_across_a_restart(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    epoch_lines = [json.dumps({"epoch": epoch, "train_loss": 1.0}) + "\n" for epoch in (0, 1, 2)]
    (run / "log.txt").write_text("".join(epoch_lines))
    # Epochs 0 and 1 end at 100 s and 250 s; the run is resumed for epoch 2 and its clock restarts at 0.
    stamps = [(0, 0, 40.0), (0, 1, 100.0), (1, 2, 180.0), (1, 3, 250.0), (2, 4, 60.0), (2, 5, 130.0)]
    (run / "train_log.json").write_text("".join(json.dumps({"epoch": e, "iter": i, "loss": 1.0, "time_s": t})
                                                + "\n" for e, i, t in stamps))
    _, per_epoch, totals = plot_time.plot_time([run])
    assert per_epoch["epoch_time_s"].tolist() == [100.0, 150.0, 130.0]
    assert (per_epoch["source"] == "train_log.json").all()
    assert totals["total_s"].iloc[0] == pytest.approx(380.0)


def test_time_command_line_and_units(tmp_path):
    assert plot_time.pick_unit(90.0) == (1.0, "s")
    assert plot_time.pick_unit(3600.0) == (60.0, "min")
    assert plot_time.pick_unit(30 * 3600.0) == (3600.0, "h")
    write_pretrain_run(tmp_path / "r", n_epochs=3, seed=8)
    result = run_script("plot_time", "r", "--out", ".", "--name", "t", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "r: 3 epochs" in result.stdout
    assert_png(tmp_path / "t.png")
    assert len(pd.read_csv(tmp_path / "t_per_epoch.csv")) == 3


# ----------------------------------------------------------------------------------------------------------
# plot_label_efficiency.py
# ----------------------------------------------------------------------------------------------------------
FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def write_label_efficiency(root: Path, epochs: tuple[int | None, ...] = (64, None)) -> dict:
    """Two seeds per (initialisation, fraction); returns the test scores keyed by (epoch, fraction)."""
    rng = np.random.default_rng(9)
    scores: dict = {}
    for epoch in epochs:
        for fraction in FRACTIONS:
            for seed in range(2):
                gap = 0.0 if epoch is None else 0.08 + 0.0001 * epoch
                score = 0.5 + gap + 0.05 * math.log2(fraction) + rng.normal(0.0, 0.004)
                scores.setdefault((epoch, fraction), []).append(score)
                write_result(root / f"ep{epoch}_f{fraction}_s{seed}", "ben", epoch, fraction, score)
    return scores


def test_label_efficiency_two_lines_over_fractions(tmp_path):
    scores = write_label_efficiency(tmp_path / "res")
    out = tmp_path / "out"
    assert plot_label_efficiency.main([str(tmp_path / "res"), "--out", str(out)]) == 0
    assert_png(out / "label_efficiency.png")
    table = pd.read_csv(out / "label_efficiency.csv")
    assert len(table) == 8 and set(table["init"]) == {"pretrained", "random init"}
    assert sorted(set(table["percent"])) == [12.5, 25.0, 50.0, 100.0]
    for (epoch, fraction), values in scores.items():
        init = "random init" if epoch is None else "pretrained"
        row = table[(table["init"] == init) & (table["train_fraction"] == fraction)].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(values)) and row["n"] == 2


def test_label_efficiency_figure_and_epoch_filter(tmp_path):
    write_label_efficiency(tmp_path, epochs=(16, 64, None))
    figure, table = plot_label_efficiency.plot_label_efficiency([str(tmp_path)], metric="f1_micro")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["pretrained (16-epoch checkpoint)", "pretrained (64-epoch checkpoint)", "random init"]
    assert figure.axes[0].get_xscale() == "log" and set(table["metric"]) == {"f1_micro"}
    figure, table = plot_label_efficiency.plot_label_efficiency([str(tmp_path)], pretrain_epoch=64)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["pretrained", "random init"]
    assert len(table) == 8
    with pytest.raises(ConfigError, match=r"--pretrain_epoch 32: no pretrained results with it; found \[16"):
        plot_label_efficiency.plot_label_efficiency([str(tmp_path)], pretrain_epoch=32)


def test_label_efficiency_command_line_on_sen12flood(tmp_path):
    for index, (epoch, fraction) in enumerate([(64, 1.0), (None, 1.0), (64, 0.5), (None, 0.5)]):
        score = 0.8 - 0.1 * index
        write_result(tmp_path / "res" / f"r{index}", "sen12flood", epoch, fraction, score, val=False)
    result = run_script("plot_label_efficiency", "res/*/results.json", "--out", "o", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "o" / "label_efficiency.png")
    table = pd.read_csv(tmp_path / "o" / "label_efficiency.csv")
    assert set(table["metric"]) == {"f1"} and len(table) == 4
    val = run_script("plot_label_efficiency", "res", "--split", "val", cwd=tmp_path)
    assert val.returncode == 2 and val.stderr.startswith("error: --metric f1: not in the val results")


def test_results_without_a_model_key_are_still_drawn(tmp_path):
    """``model`` is optional in results.json: such runs group under one name instead of vanishing (NaN)."""
    for index, (epoch, fraction) in enumerate([(64, 1.0), (64, 0.5), (None, 1.0), (None, 0.5), (16, 1.0)]):
        write_result(tmp_path / f"r{index}", "ben", epoch, fraction, 0.6 + 0.01 * index)
        path = tmp_path / f"r{index}" / "results.json"
        result = json.loads(path.read_text())
        del result["model"]
        path.write_text(json.dumps(result))

    def points(figure) -> int:
        # Data lines of errorbar() have marker "o"; caps ("_") and random-init levels (no marker) are left out.
        return sum(len(line.get_xdata()) for line in figure.axes[0].get_lines()
                   if line.get_marker() == "o" and line.get_linestyle() == "-")

    figure, table = plot_label_efficiency.plot_label_efficiency([str(tmp_path)], pretrain_epoch=64)
    assert points(figure) == 2 and len(table) == 4  # the 2 pretrained fractions (random init: dashed)
    figure, table = plot_epoch_sweep.plot_epoch_sweep([str(tmp_path)])
    assert points(figure) == 3 and len(table) == 5  # epochs 16, 64 at 100% and 64 at 50%
    assert set(logs.read_results(str(tmp_path))["model"]) == {logs.UNKNOWN_MODEL}


def write_finetune_run(path: Path, score: float, config: dict, evaluated: Path | None = None,
                       pretrain_epoch: int = 16) -> Path:
    """A finetune run folder: results.json (evaluated_checkpoint set) and config.yaml."""
    write_result(path, "ben", pretrain_epoch, 1.0, score)
    result = json.loads((path / "results.json").read_text())
    result["evaluated_checkpoint"] = str(evaluated or path / "checkpoint_best.pth")
    (path / "results.json").write_text(json.dumps(result))
    (path / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(path), "model": "mixmim_base", **config}))
    return path


def test_epoch_sweep_counts_a_rescore_once_and_splits_other_hyperparameters(tmp_path, capsys):
    """An --eval re-score of a run's checkpoint is not another seed; runs with another learning rate are
    another series, not a seed of the same point."""
    runs = tmp_path / "runs"
    seed0 = write_finetune_run(runs / "blr1e-3_seed0", 0.70, {"blr": 1e-3, "seed": 0, "epochs": 50})
    write_finetune_run(runs / "blr1e-3_seed1", 0.72, {"blr": 1e-3, "seed": 1, "epochs": 50})
    write_finetune_run(runs / "eval_seed0", 0.99, {"eval": True, "resume": str(seed0 / "checkpoint_best.pth"),
                                                   "blr": 1e-3, "epochs": 2},
                       evaluated=seed0 / "checkpoint_best.pth")
    write_finetune_run(runs / "blr5e-4_seed0", 0.40, {"blr": 5e-4, "seed": 0, "epochs": 50})
    _, table = plot_epoch_sweep.plot_epoch_sweep([str(runs)])
    points = table[table["pretrain_epoch"] == 16].set_index("hparams")
    assert sorted(points.index) == ["blr=0.0005", "blr=0.001"]
    assert points.loc["blr=0.001", "n"] == 2 and points.loc["blr=0.001", "mean"] == pytest.approx(0.71)
    assert points.loc["blr=0.0005", "n"] == 1 and points.loc["blr=0.0005", "mean"] == pytest.approx(0.40)
    err = capsys.readouterr().err
    assert f"{runs / 'eval_seed0' / 'results.json'}: re-scores" in err and "counted once" in err
    assert "differ in blr" in err


def test_epoch_sweep_keeps_one_series_when_only_seeds_differ(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_finetune_run(runs / f"s{seed}", 0.6 + 0.01 * seed, {"blr": 1e-3, "seed": seed,
                                                                  "output_dir": f"o{seed}"})
    _, table = plot_epoch_sweep.plot_epoch_sweep([str(runs)])
    assert table["hparams"].tolist() == [""] and table["n"].tolist() == [3]


# ----------------------------------------------------------------------------------------------------------
# Protocols (freeze_encoder) and the data in the titles
# ----------------------------------------------------------------------------------------------------------
def write_protocol_runs(root: Path, dataset: str | None = "synthetic", in_config: bool = False) -> None:
    """A full finetune (0.70) and a linear probe (0.30) of one pretrained checkpoint at each of two fractions,
    plus random-init finetunes; the protocol in results.json, or (``in_config``) only in config.yaml."""
    for fraction in (1.0, 0.5):
        for name, epoch, frozen, score in (("ft", 64, False, 0.70), ("probe", 64, True, 0.30),
                                           ("scratch", None, False, 0.20)):
            path = root / f"{name}_{fraction}"
            write_result(path, "ben", epoch, fraction, score)
            result = json.loads((path / "results.json").read_text())
            result["dataset"] = dataset
            if in_config:
                (path / "config.yaml").write_text(yaml.safe_dump({"freeze_encoder": frozen}))
            else:
                result["freeze_encoder"] = frozen
            (path / "results.json").write_text(json.dumps(result))


@pytest.mark.parametrize("in_config", [False, True])
def test_label_efficiency_keeps_a_linear_probe_apart_from_finetuning(tmp_path, in_config):
    write_protocol_runs(tmp_path, in_config=in_config)
    figure, table = plot_label_efficiency.plot_label_efficiency([str(tmp_path)])
    pretrained = table[table["init"] == logs.PRETRAINED].set_index(["protocol", "train_fraction"])
    assert pretrained.loc[(logs.FINETUNE, 1.0), "mean"] == pytest.approx(0.70)  # not 0.5, the mean of both
    assert pretrained.loc[(logs.LINEAR_PROBE, 1.0), "mean"] == pytest.approx(0.30)
    assert set(table["n"]) == {1}
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["finetune, pretrained", "linear probe, pretrained", "finetune, random init"]
    assert figure.axes[0].get_title() == "synthetic data (BigEarthNet task): label efficiency"


def test_epoch_sweep_keeps_a_linear_probe_apart_from_finetuning(tmp_path):
    write_protocol_runs(tmp_path, dataset="benv1")
    figure, table = plot_epoch_sweep.plot_epoch_sweep([str(tmp_path)])
    points = table[(table["init"] == logs.PRETRAINED) & (table["train_fraction"] == 1.0)].set_index("protocol")
    assert points.loc[logs.FINETUNE, "mean"] == pytest.approx(0.70)
    assert points.loc[logs.LINEAR_PROBE, "mean"] == pytest.approx(0.30)
    assert figure.axes[0].get_title().startswith("BigEarthNet v1: mAP_macro")


def test_the_title_names_the_data_and_a_file_without_a_protocol_is_its_own_group(tmp_path):
    write_protocol_runs(tmp_path, dataset=None)
    frame = logs.read_results(str(tmp_path))
    assert logs.data_title(frame) == "BigEarthNet"  # files that do not name their data: the task
    result = json.loads((tmp_path / "ft_1.0" / "results.json").read_text())
    del result["freeze_encoder"]
    (tmp_path / "ft_1.0" / "results.json").write_text(json.dumps(result))
    frame = logs.read_results(str(tmp_path))
    assert frame.loc[frame["path"].str.contains("ft_1.0"), "protocol"].tolist() == [logs.UNKNOWN_PROTOCOL]
