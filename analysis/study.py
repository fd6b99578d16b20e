"""The pretraining study: what each pretraining arm buys downstream, by one command.

    python -m analysis.study --out /tmp/study                      # CPU scale, structured synthetic data
    python -m analysis.study --scale smoke --out /tmp/study_smoke  # seconds: 2 arms, 1 epoch, 1 seed
    python -m analysis.study --scale paper --model mixmim_base --dataset benv1 --data_path /data/BEN \\
        --launcher "torchrun --standalone --nproc_per_node 4" --out /scratch/study   # GPUs

Steps (a step whose output exists is skipped, so a stopped study resumes where it stopped):

1. data: synthetic BigEarthNet-format patches written once in the packed format (``analysis.study_data``),
   or the ``--dataset`` / ``--data_path`` given (pretraining on its train split);
2. pretraining of each arm: ``main_pretrain.py`` through ``--launcher``, with the representation monitor
   (``--probe_every``) where the entry point has it;
3. linear probe and k-NN: pooled features of the frozen encoder, extracted once per arm, a converged
   logistic regression per labelled fraction and seed (``util.probe``); the hand-crafted floor (per-channel
   dB statistics and histograms) with the same classifier;
4. full finetuning: ``main_finetune.py`` per arm, fraction and seed (random init: no ``--finetune``);
5. ``runs.csv`` (one row per evaluated model), ``summary.csv`` (arm, fraction, protocol, metric, mean, std,
   n), ``table.md`` (mAP macro as a Markdown table, arm x protocol and fraction), ``study.png`` and the
   pretraining curves (``pretrain_loss.png``), ``timing.json``.

Seeds: the downstream seed chooses the labelled subset (nested over fractions), the head initialisation and
the batch order; the random-init arm draws its encoder from it too. Each pretraining arm is one run (seed
``--pretrain_seed``), so the spread of a pretrained arm is the downstream spread only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sarwmix.errors import ConfigError, SarwmixError

log = logging.getLogger("sarwmix.study")
REPO = Path(__file__).resolve().parents[1]
RANDOM_INIT, HANDCRAFTED = "random_init", "handcrafted"
# Pretraining arms: name -> main_pretrain.py flags. Every arm shares the encoder, data and budget.
ARMS: dict[str, list[str]] = {
    "mixmim_none": ["--weighting", "none"],
    "mixmim_per_channel": ["--weighting", "per_channel"],
    "mixmim_shared_avg": ["--weighting", "shared_avg"],
    "simmim": ["--mode", "simmim", "--weighting", "none"],
    "mixmim_per_channel_pct": ["--weighting", "per_channel", "--weight_norm", "percentile"],
}
ALL_ARMS: tuple[str, ...] = (RANDOM_INIT, *ARMS, HANDCRAFTED)
PROTOCOLS: tuple[str, ...] = ("linear", "knn", "finetune")


@dataclasses.dataclass
class Scale:
    """Every size of a study; ``--scale`` picks one, flags override single fields."""

    model: str = "mixmim_study"
    input_size: int = 128
    arms: tuple[str, ...] = ALL_ARMS
    n_pretrain: int = 4096
    n_train: int = 1024
    n_val: int = 256
    n_test: int = 1024
    pretrain_epochs: int = 8
    pretrain_warmup: float = 1.0
    pretrain_lr: float | None = 1.5e-3  # absolute; None: --pretrain_blr scaled by the global batch
    pretrain_blr: float | None = None
    pretrain_batch: int = 64
    mask_ratio: float | None = None
    # Short runs: the standardised per-patch target drops each cell's level, which is half of what tells the
    # covers apart; without it the probe of the encoder rose faster (docs/RESULTS.md).
    norm_pix_loss: bool = False
    # At fraction 1.0; see finetune_epochs(). A random-init finetune with all labels still gained 0.1 mAP
    # between epochs 4 and 15 (README, Results): 4 epochs measured the schedule, not the encoder.
    finetune_epochs: int = 8
    finetune_lr: float | None = 1e-3
    finetune_blr: float | None = None
    finetune_batch: int = 16
    finetune_fractions: tuple[float, ...] = (1.0, 0.125)
    probe_fractions: tuple[float, ...] = (1.0, 0.125, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    probe_c: float = 0.1
    # Frozen features of the probes (util.probe.POOLINGS): the mean tokens of every stage, not only the
    # final 4x4 grid whose mean dilutes small covers; every arm, random init included, alike.
    probe_pooling: str = "stages"
    # Solver of the linear probe (util.probe.linear_probe_scores): ``torch`` solves the same problem for all
    # classes in one L-BFGS run, seconds where scikit-learn's 19 fits on 960 features took minutes.
    probe_solver: str = "torch"
    probe_samples: int = 512  # patches of the pretraining monitor (labelled validation split)


SCALES: dict[str, Scale] = {
    "smoke": Scale(model="mixmim_study", input_size=64, arms=(RANDOM_INIT, "mixmim_per_channel", HANDCRAFTED),
                   n_pretrain=32, n_train=32, n_val=16, n_test=32, pretrain_epochs=1, pretrain_batch=16,
                   finetune_epochs=1, finetune_batch=16, finetune_fractions=(1.0,), probe_fractions=(1.0, 0.5),
                   seeds=(0,), probe_solver="sklearn"),  # 32 patches: scikit-learn's fits take milliseconds
    "cpu": Scale(),
    # The paper's protocol: its model and data set are given with --model / --dataset / --data_path.
    "paper": Scale(model="mixmim_base", n_pretrain=0, n_train=0, n_val=0, n_test=0, pretrain_epochs=64,
                   pretrain_warmup=10, pretrain_lr=None, pretrain_blr=1.5e-4, pretrain_batch=128,
                   norm_pix_loss=True, finetune_epochs=50, finetune_lr=None, finetune_blr=5e-4, finetune_batch=64,
                   finetune_fractions=(1.0, 0.125, 0.01)),
}


def finetune_epochs(scale: Scale, fraction: float) -> int:
    """Epochs of a finetune run at ``fraction``: smaller subsets get more epochs (up to 4x), so that a run
    at 12.5 % takes half the updates of one at 100 % instead of one eighth."""
    return int(np.ceil(scale.finetune_epochs * min(4.0, 1.0 / fraction)))


@dataclasses.dataclass
class Study:
    """Where and how one study runs (from the command line)."""

    out: Path
    scale: Scale
    dataset: str = "synthetic"
    data_path: str | None = None
    launcher: tuple[str, ...] = (sys.executable,)
    jobs: int = 1
    threads: int = 0
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    pretrain_seed: int = 0
    extra_pretrain: tuple[str, ...] = ()
    extra_finetune: tuple[str, ...] = ()
    data: dict = dataclasses.field(default_factory=dict)

    def entry(self, script: str) -> list[str]:
        """The launcher followed by the path of an entry point of the repository."""
        return [*self.launcher, str(REPO / script)]

    def common_flags(self) -> list[str]:
        threads = ["--num_threads", str(self.threads)] if self.threads else []
        return ["--model", self.scale.model, "--input_size", str(self.scale.input_size), "--device", self.device,
                "--amp", self.amp, "--num_workers", str(self.num_workers), "--no-progress", *threads]


def prepare_data(study: Study) -> dict[str, tuple[str, str | None]]:
    """(dataset, data_path) of the pretraining and the labelled data; writes the synthetic folders once."""
    if study.dataset != "synthetic":
        if not study.data_path:
            raise ConfigError(f"--dataset {study.dataset} needs --data_path")
        return {"pretrain": (study.dataset, study.data_path), "labelled": (study.dataset, study.data_path)}
    from analysis.study_data import write_study_data

    s = study.scale
    # Worker processes pay off from a few hundred patches on (each imports the generator once).
    workers = max(1, study.jobs * max(1, study.threads)) if s.n_pretrain + s.n_train + s.n_test > 1000 else 1
    paths = write_study_data(study.out / "data", s.n_pretrain, s.n_train, s.n_val, s.n_test, workers=workers)
    return {name: ("packed", str(path)) for name, path in paths.items()}


def lr_flags(lr: float | None, blr: float | None) -> list[str]:
    """``--lr`` (absolute) when given, else ``--blr`` (per 256 images of the global batch), else nothing."""
    if lr is not None:
        return ["--lr", str(lr)]
    return ["--blr", str(blr)] if blr is not None else []


def supported_flags(script: str) -> set[str]:
    """Option strings an entry point accepts (read from its parser, nothing is run)."""
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    return set(module.get_args_parser()._option_string_actions)


def pretrain_command(study: Study, arm: str, out_dir: Path) -> list[str] | None:
    """``main_pretrain.py`` command of one arm, or None when the entry point lacks one of its flags."""
    s, flags = study.scale, supported_flags("main_pretrain.py")
    arm_flags = ARMS[arm]
    missing = [f for f in arm_flags if f.startswith("--") and f not in flags]
    if missing:
        log.warning("arm %s skipped: main_pretrain.py has no %s", arm, " ".join(missing))
        return None
    dataset, path = study.data["pretrain"]
    cmd = [*study.entry("main_pretrain.py"), *study.common_flags(), "--dataset", dataset,
           "--epochs", str(s.pretrain_epochs), "--warmup_epochs", str(s.pretrain_warmup),
           *lr_flags(s.pretrain_lr, s.pretrain_blr), "--batch_size", str(s.pretrain_batch),
           "--seed", str(study.pretrain_seed), "--output_dir", str(out_dir),
           "--vis_samples", "0", "--norm_pix_loss" if s.norm_pix_loss else "--no-norm_pix_loss", *arm_flags]
    if path:
        cmd += ["--data_path", path]
    if s.mask_ratio is not None:
        cmd += ["--mask_ratio", str(s.mask_ratio)]
    if "--probe_every" in flags:  # the representation monitor, on the labelled data of the study
        probe_set, probe_path = study.data["labelled"]
        cmd += ["--probe_every", "1", "--probe_dataset", probe_set, "--probe_samples", str(s.probe_samples)]
        cmd += ["--probe_data_path", probe_path] if probe_path else []
    else:  # checkpoints of every epoch, probed afterwards with the same functions (probe_curves)
        cmd += ["--save_freq", "1"]
    return cmd + list(study.extra_pretrain)


def run_commands(commands: list[tuple[list[str], Path]], jobs: int, threads: int) -> None:
    """Run (command, log file) pairs, ``jobs`` at a time; a failure raises naming its log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)

    def one(item: tuple[list[str], Path]) -> None:
        cmd, log_path = item
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("+ %s", " ".join(cmd))
        with open(log_path, "w") as handle:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        if code:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
            raise SarwmixError(f"exit code {code}: {' '.join(cmd[:3])} ...; see {log_path}\n{tail}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for future in [pool.submit(one, item) for item in commands]:
            future.result()


def pretrain_all(study: Study) -> dict[str, Path]:
    """Pretrain every arm (skipping finished ones); returns arm -> final checkpoint."""
    done, todo = {}, []
    for arm in study.scale.arms:
        if arm not in ARMS:
            continue
        out_dir = study.out / "pretrain" / arm
        ckpt = out_dir / "checkpoint.pth"
        if (out_dir / "done").is_file():
            done[arm] = ckpt
            continue
        cmd = pretrain_command(study, arm, out_dir)
        if cmd is not None:
            todo.append((arm, cmd, out_dir))
    # --jobs runs at a time (on a small CPU, single-threaded runs side by side beat one multi-threaded run).
    run_commands([(cmd, out_dir / "stdout.txt") for _, cmd, out_dir in todo], study.jobs, study.threads)
    for arm, _, out_dir in todo:
        (out_dir / "done").write_text("")
        done[arm] = out_dir / "checkpoint.pth"
    return {arm: done[arm] for arm in study.scale.arms if arm in done}


def limit_own_threads(study: Study) -> int | None:
    """Torch threads of the driver's own steps (features, probes): ``--jobs`` x ``--threads``, the cores the
    runs side by side were given, when ``--threads`` is set; else torch's default. Without it two drivers on
    one machine each take every core, and the small L-BFGS solves of the probes crawl. Returns the count set."""
    if not study.threads:
        return None
    import torch

    torch.set_num_threads(max(1, study.jobs) * study.threads)
    return torch.get_num_threads()


def probe_curves(study: Study, ckpts: dict[str, Path], n_max: int = 512) -> pd.DataFrame:
    """k-NN and linear-probe mAP of every epoch's checkpoint of every arm (``probe_curves.csv``).

    On the first ``n_max`` labelled train and test patches, as the pretraining monitor measures them; the
    random-init encoder of seed 0 is epoch 0 of the ``random_init`` row. Cached in ``probe_curves.csv``.
    """
    import torch

    from util.probe import pooled_features, probe_metrics

    cache = study.out / "probe_curves.csv"
    if cache.is_file():
        return pd.read_csv(cache)
    data = {split: labelled_split(study, split) for split in ("train", "test")}
    subsets = {k: torch.utils.data.Subset(v, range(min(n_max, len(v)))) for k, v in data.items()}
    points = [(RANDOM_INIT, 0, None)]
    for arm, ckpt in ckpts.items():
        for path in sorted(ckpt.parent.glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1])):
            points.append((arm, int(path.stem.split("_")[1]), path))
    rows = []
    for arm, epoch, path in points:
        model = load_encoder(study, path, 0)
        (tx, ty), (vx, vy) = (pooled_features(model, subsets[k], data[k].stats["mean"], data[k].stats["std"],
                                              pooling=study.scale.probe_pooling)
                              for k in ("train", "test"))
        rows.append({"arm": arm, "epoch": epoch, **probe_metrics(tx, ty, vx, vy, c=study.scale.probe_c)})
    table = pd.DataFrame(rows)
    table.to_csv(cache, index=False, float_format="%.4f")
    return table


def labelled_split(study: Study, split: str):
    """The labelled data set of the study, one split, at 128 px."""
    from sarwmix.datasets import build_dataset

    dataset, path = study.data["labelled"]
    return build_dataset(dataset, data_path=path, split=split, input_size=study.scale.input_size)


def load_encoder(study: Study, ckpt: Path | None, seed: int):
    """The finetuning model of the study's encoder: pretrained weights from ``ckpt``, or a random init
    drawn from ``seed`` (None). Returns it in eval mode, on the CPU."""
    import torch

    from models_mixmim_ft import build_mixmim_ft
    from util.pretrained import load_pretrained_file

    torch.manual_seed(seed)
    model = build_mixmim_ft(study.scale.model, 19, img_size=study.scale.input_size)
    if ckpt is not None:
        load_pretrained_file(model, ckpt)
    return model.eval()


def features(study: Study, name: str, ckpt: Path | None, seed: int) -> dict[str, np.ndarray]:
    """Pooled features and targets of the labelled train and test splits (cached in ``features/``)."""
    cache = study.out / "features" / f"{name}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import torch

    from util.misc import resolve_amp
    from util.probe import pooled_features

    model = load_encoder(study, ckpt, seed)
    device = "cuda" if study.device != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    amp = resolve_amp(study.amp, torch.device(device))
    out = {}
    for split in ("train", "test"):
        data = labelled_split(study, split)
        out[f"{split}_x"], out[f"{split}_y"] = pooled_features(model, data, data.stats["mean"], data.stats["std"],
                                                               device=device, num_workers=study.num_workers,
                                                               amp_dtype=amp, pooling=study.scale.probe_pooling)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def handcrafted(study: Study) -> dict[str, np.ndarray]:
    """Per-channel dB statistics and histograms of the labelled train and test splits (cached)."""
    cache = study.out / "features" / f"{HANDCRAFTED}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import torch

    from util.probe import handcrafted_features

    out = {}
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(labelled_split(study, split), batch_size=256,
                                             num_workers=study.num_workers)
        xs, ys = zip(*[(handcrafted_features(x.numpy()), y.numpy()) for x, y in loader], strict=True)
        out[f"{split}_x"], out[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def probe_rows(study: Study, arm: str, feats: dict[str, np.ndarray], seeds: tuple[int, ...]) -> list[dict]:
    """Linear-probe and k-NN test metrics of one feature set per labelled fraction and seed."""
    from util.metrics import multilabel_metrics
    from util.probe import knn_scores, linear_probe_scores
    from util.subsets import fraction_indices

    rows = []
    n = len(feats["train_x"])
    for fraction in study.scale.probe_fractions:
        for seed in seeds:
            keep = fraction_indices(n, fraction, seed)
            x, y = feats["train_x"][keep], feats["train_y"][keep]
            scores = {"linear": linear_probe_scores(x, y, feats["test_x"], c=study.scale.probe_c, seed=seed,
                                                    solver=study.scale.probe_solver)}
            # k-NN votes lie in [0, 1]; the sigmoid of the metrics keeps their order, and AP needs only that.
            scores["knn"] = knn_scores(x, y, feats["test_x"], k=min(20, len(keep)))
            for protocol, score in scores.items():
                metrics = multilabel_metrics(score, feats["test_y"])
                rows.append({"arm": arm, "protocol": protocol, "fraction": fraction, "seed": seed,
                             "n_labels": len(keep), "mAP_macro": metrics["mAP_macro"],
                             "mAP_micro": metrics["mAP_micro"]})
    return rows


def probe_all(study: Study, ckpts: dict[str, Path]) -> list[dict]:
    """Probe rows of every arm: random init (one encoder per seed), pretrained arms, the floor.

    The rows of each arm are cached in ``probes/ARM.csv`` (a stopped study does not fit them again; a cache
    of other fractions or seeds is fitted again)."""
    rows = []
    wanted = {(float(f), int(s)) for f in study.scale.probe_fractions for s in study.scale.seeds}
    for arm in study.scale.arms:
        cache = study.out / "probes" / f"{arm}.csv"
        if cache.is_file():
            cached = pd.read_csv(cache)
            if set(zip(cached["fraction"].astype(float), cached["seed"].astype(int), strict=True)) == wanted:
                rows += cached.to_dict("records")
                continue
        if arm == RANDOM_INIT:
            arm_rows = []
            for seed in study.scale.seeds:  # each seed its own random encoder
                arm_rows += probe_rows(study, arm, features(study, f"{arm}_seed{seed}", None, seed), (seed,))
        elif arm == HANDCRAFTED:
            arm_rows = probe_rows(study, arm, handcrafted(study), study.scale.seeds)
        elif arm in ckpts:
            arm_rows = probe_rows(study, arm, features(study, arm, ckpts[arm], 0), study.scale.seeds)
        else:
            continue
        cache.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(arm_rows).to_csv(cache, index=False)
        rows += arm_rows
    return rows


def finetune_command(study: Study, arm: str, ckpt: Path | None, fraction: float, seed: int,
                     out_dir: Path) -> list[str]:
    """``main_finetune.py`` command of one arm, labelled fraction and seed."""
    s = study.scale
    dataset, path = study.data["labelled"]
    cmd = [*study.entry("main_finetune.py"), *study.common_flags(), "--dataset", dataset,
           "--epochs", str(finetune_epochs(s, fraction)), "--warmup_epochs", "1",
           *lr_flags(s.finetune_lr, s.finetune_blr), "--batch_size", str(s.finetune_batch),
           "--train_fraction", str(fraction), "--seed", str(seed),
           "--output_dir", str(out_dir)]
    cmd += ["--data_path", path] if path else []
    cmd += ["--finetune", str(ckpt)] if ckpt is not None else []
    return cmd + list(study.extra_finetune)


def finetune_all(study: Study, ckpts: dict[str, Path]) -> list[dict]:
    """Finetune every arm at every fraction and seed (``--jobs`` at a time); rows of test metrics."""
    runs = []
    for arm in study.scale.arms:
        if arm == HANDCRAFTED or (arm != RANDOM_INIT and arm not in ckpts):
            continue
        for fraction in study.scale.finetune_fractions:
            for seed in study.scale.seeds:
                out_dir = study.out / "finetune" / arm / f"fraction{fraction:g}" / f"seed{seed}"
                runs.append((arm, fraction, seed, out_dir, ckpts.get(arm)))
    todo = [(finetune_command(study, arm, ckpt, fraction, seed, out_dir), out_dir / "stdout.txt")
            for arm, fraction, seed, out_dir, ckpt in runs if not (out_dir / "results.json").is_file()]
    run_commands(todo, study.jobs, study.threads)
    rows = []
    for arm, fraction, seed, out_dir, _ in runs:
        result = json.loads((out_dir / "results.json").read_text())
        rows.append({"arm": arm, "protocol": "finetune", "fraction": fraction, "seed": seed,
                     "n_labels": None, "mAP_macro": result["test"]["mAP_macro"],
                     "mAP_micro": result["test"]["mAP_micro"]})
    return rows


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and count per arm, fraction, protocol and metric (``summary.csv``)."""
    long = runs.melt(id_vars=["arm", "protocol", "fraction", "seed"], value_vars=["mAP_macro", "mAP_micro"],
                     var_name="metric", value_name="value")
    table = long.groupby(["arm", "fraction", "protocol", "metric"], sort=False)["value"].agg(
        ["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    order = {arm: i for i, arm in enumerate(ALL_ARMS)}
    table = table.sort_values(["protocol", "metric", "fraction", "arm"], key=lambda c: c.map(order)
                              if c.name == "arm" else c, ascending=[True, True, False, True])
    return table.reset_index(drop=True)


def markdown_table(summary: pd.DataFrame, metric: str = "mAP_macro") -> str:
    """The summary as the Markdown table the documentation shows (``table.md``): one row per arm, one
    column per protocol and labelled fraction, cells ``mean ± std (n)`` with three decimals (std 0.000
    where one value was measured), empty where the arm has no such run."""
    rows = summary[summary["metric"] == metric]
    columns = (rows[["protocol", "fraction"]].drop_duplicates()
               .sort_values(["protocol", "fraction"], key=lambda c: c.map(PROTOCOLS.index)
                            if c.name == "protocol" else c))
    arms = [arm for arm in ALL_ARMS if arm in set(rows["arm"])]
    cells = {(r.arm, r.protocol, r.fraction): f"{r.mean:.3f} ± {0.0 if np.isnan(r.std) else r.std:.3f} ({r.n})"
             for r in rows.itertuples()}
    header = ["arm", *(f"{p} {100 * f:g} %" for p, f in columns.itertuples(index=False))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        lines.append("| " + " | ".join([arm, *(cells.get((arm, p, f), "")
                                                for p, f in columns.itertuples(index=False))]) + " |")
    return "\n".join(lines) + "\n"


def write_figures(study: Study, summary: pd.DataFrame, ckpts: dict[str, Path]) -> list[Path]:
    """``study.png`` (label efficiency per protocol) and the pretraining curves of the arms."""
    from analysis.logs import write_outputs
    from analysis.plot_label_efficiency import draw_probe_curves, draw_study
    from analysis.plot_pretrain_loss import plot_pretrain_loss

    written = write_outputs(study.out, "study", draw_study(summary, "mAP_macro"), {}, dpi=110)
    if (study.out / "probe_curves.csv").is_file():
        curves = pd.read_csv(study.out / "probe_curves.csv")
        written += write_outputs(study.out, "probe_curves", draw_probe_curves(curves), {}, dpi=110)
    runs = [study.out / "pretrain" / arm for arm in ckpts]
    if runs:
        figure, epochs, steps = plot_pretrain_loss(runs, labels=list(ckpts))
        tables = {"_epoch": epochs, "_step": steps}
        probes = getattr(figure, "probes", None)  # the monitor's probe metrics per epoch, when it ran
        if probes is not None and not probes.empty:
            tables["_probe"] = probes
        written += write_outputs(study.out, "pretrain_loss", figure, tables, dpi=110)
    return written


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(",", " ").split())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder (data, runs, tables, figures)")
    parser.add_argument("--scale", default="cpu", choices=SCALES, help="sizes of the study (fields below override)")
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic (structured scenes written as packed data) or a --dataset of main_*.py")
    parser.add_argument("--data_path", default=None, help="root of --dataset (not for synthetic)")
    parser.add_argument("--launcher", default=sys.executable,
                        help="command prefix of main_*.py, e.g. 'torchrun --standalone --nproc_per_node 4'")
    parser.add_argument("--jobs", type=int, default=1, help="pretraining / finetune runs at a time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run; the driver's own steps take --jobs x this (0: torch's default)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers of every run")
    parser.add_argument("--pretrain_seed", type=int, default=0)
    parser.add_argument("--extra_pretrain", default="", help="more main_pretrain.py flags (split on spaces)")
    parser.add_argument("--extra_finetune", default="", help="more main_finetune.py flags (split on spaces)")
    g = parser.add_argument_group("overrides of the scale's fields")
    g.add_argument("--model")
    g.add_argument("--arms", type=lambda t: tuple(t.replace(",", " ").split()), help=f"subset of {ALL_ARMS}")
    for name in ("n_pretrain", "n_train", "n_val", "n_test", "pretrain_epochs", "pretrain_batch",
                 "finetune_epochs", "finetune_batch", "probe_samples"):
        g.add_argument(f"--{name}", type=int)
    for name in ("pretrain_warmup", "pretrain_lr", "pretrain_blr", "mask_ratio", "finetune_lr", "finetune_blr",
                 "probe_c"):
        g.add_argument(f"--{name}", type=float)
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--probe_solver", choices=("sklearn", "torch"), help="solver of the linear probe")
    g.add_argument("--probe_pooling", help="frozen features of the linear probe and k-NN: mean, meanmax or stages")
    g.add_argument("--finetune_fractions", type=_floats, help="e.g. '1 0.125'")
    g.add_argument("--probe_fractions", type=_floats, help="e.g. '1 0.125 0.01'")
    g.add_argument("--seeds", type=_ints, help="downstream seeds, e.g. '0 1 2'")
    return parser


def build_study(args: argparse.Namespace) -> Study:
    """The study of the command line: the scale with its overrides, checked."""
    fields = {f.name for f in dataclasses.fields(Scale)}
    scale = dataclasses.replace(SCALES[args.scale], **{k: v for k, v in vars(args).items()
                                                         if k in fields and v is not None})
    unknown = sorted(set(scale.arms) - set(ALL_ARMS))
    if unknown:
        raise ConfigError(f"--arms {' '.join(unknown)}: expected some of {', '.join(ALL_ARMS)}")
    if not scale.seeds or any(not 0 < f <= 1 for f in (*scale.finetune_fractions, *scale.probe_fractions)):
        raise ConfigError("--seeds must not be empty and every fraction must lie in (0, 1]")
    from util.probe import POOLINGS

    if scale.probe_pooling not in POOLINGS:
        raise ConfigError(f"--probe_pooling {scale.probe_pooling}: expected one of {', '.join(POOLINGS)}")
    if args.dataset == "synthetic" and min(scale.n_pretrain, scale.n_train, scale.n_val, scale.n_test) < 1:
        raise ConfigError(f"--scale {args.scale} with synthetic data needs --n_pretrain/--n_train/--n_val/--n_test")
    return Study(out=args.out, scale=scale, dataset=args.dataset, data_path=args.data_path,
                 launcher=tuple(args.launcher.split()), jobs=args.jobs, threads=args.threads, amp=args.amp,
                 device=args.device, num_workers=args.num_workers, pretrain_seed=args.pretrain_seed,
                 extra_pretrain=tuple(args.extra_pretrain.split()), extra_finetune=tuple(args.extra_finetune.split()))


def run_study(study: Study) -> pd.DataFrame:
    """Every step of the study; returns the summary table (also written with everything else)."""
    study.out.mkdir(parents=True, exist_ok=True)
    timing, t0 = {}, time.time()

    def lap(name: str, start: float) -> float:
        timing[name] = round(time.time() - start, 1)
        log.info("%s: %.1f s", name, timing[name])
        return time.time()

    t = time.time()
    study.data = prepare_data(study)
    t = lap("data", t)
    ckpts = pretrain_all(study)
    t = lap("pretrain", t)
    limit_own_threads(study)
    if "--probe_every" not in supported_flags("main_pretrain.py") and ckpts:
        probe_curves(study, ckpts)
        t = lap("probe_curves", t)
    rows = probe_all(study, ckpts)
    t = lap("probe", t)
    rows += finetune_all(study, ckpts)
    t = lap("finetune", t)
    runs = pd.DataFrame(rows)
    runs.to_csv(study.out / "runs.csv", index=False)
    summary = summary_table(runs)
    summary.to_csv(study.out / "summary.csv", index=False, float_format="%.4f")
    (study.out / "table.md").write_text(markdown_table(summary), encoding="utf-8")
    write_figures(study, summary, ckpts)
    lap("tables_and_figures", t)
    timing["total"] = round(time.time() - t0, 1)
    (study.out / "timing.json").write_text(json.dumps({**timing, "scale": dataclasses.asdict(study.scale)},
                                                      indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        summary = run_study(build_study(get_args_parser().parse_args(argv)))
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
