"""The pretraining study: what each pretraining arm buys downstream, by one command.

    python -m analysis.study --out /tmp/study                      # CPU scale, structured synthetic data
    python -m analysis.study --scale smoke --out /tmp/study_smoke  # 2 arms, 1 epoch, 1 seed (docs/RESULTS.md)
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
5. ``runs.csv`` (one row per evaluated model; probe rows also hold each class's AP as ``ap_k``),
   ``summary.csv`` (arm, fraction, protocol, metric, mean, std, n), ``table.md`` (mAP macro as a Markdown
   table, arm x protocol and fraction), ``per_class.csv`` (AP per class of the probes, mean over seeds: which
   covers a representation separates), ``study.png`` and the
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

from analysis.study_config import (
    ALL_ARMS,
    ARMS,
    HANDCRAFTED,
    PROTOCOLS,
    RANDOM_INIT,
    REPO,
    SCALES,
    Scale,
    Study,
    finetune_epochs,
)
from analysis.study_probes import limit_own_threads, probe_all, probe_curves
from sarwmix.cli import ArgumentParser, count
from sarwmix.errors import ConfigError, SarwmixError

log = logging.getLogger("sarwmix.study")


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
    paths = write_study_data(study.out / "data", s.n_pretrain, s.n_train, s.n_val, s.n_test, workers=workers,
                             data_seed=study.data_seed)
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


def per_class_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Average precision per class of the probe rows (``per_class.csv``): arm, protocol, fraction, class
    index, its name (the 19 BigEarthNet classes when there are 19), mean, sample std and count over seeds.
    Empty when the rows carry no ``ap_k`` columns (probes cached by an older version)."""
    from sarwmix.constants import BEN_19_CLASSES

    columns = [c for c in runs.columns if c.startswith("ap_")]
    if not columns:
        return pd.DataFrame(columns=["arm", "protocol", "fraction", "class", "name", "mean", "std", "n"])
    long = runs.melt(id_vars=["arm", "protocol", "fraction", "seed"], value_vars=columns, var_name="class",
                     value_name="ap")
    long["class"] = long["class"].str.removeprefix("ap_").astype(int)
    table = long.dropna(subset=["ap"]).groupby(["arm", "protocol", "fraction", "class"], sort=False)["ap"].agg(
        ["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    names = BEN_19_CLASSES if len(columns) == len(BEN_19_CLASSES) else None
    table.insert(4, "name", table["class"].map(lambda k: names[k] if names else str(k)))
    return table


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
        # the arms' losses differ in scale by construction (weights, SimMIM's L1, the spectral term): log axis
        figure, epochs, steps = plot_pretrain_loss(runs, labels=list(ckpts), logy=True)
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
    parser = ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder (data, runs, tables, figures)")
    parser.add_argument("--scale", default="cpu", choices=SCALES, help="sizes of the study (fields below override)")
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic (structured scenes written as packed data) or a --dataset of main_*.py")
    parser.add_argument("--data_path", default=None, help="root of --dataset (not for synthetic)")
    parser.add_argument("--launcher", default=sys.executable,
                        help="command prefix of main_*.py, e.g. 'torchrun --standalone --nproc_per_node 4'")
    parser.add_argument("--jobs", type=count(1), default=1, help="pretraining / finetune runs at a time")
    parser.add_argument("--threads", type=count(0), default=0,
                        help="torch threads per run; the driver's own steps take --jobs x this (0: torch's default)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--num_workers", type=count(0), default=0, help="data loader workers of every run")
    parser.add_argument("--pretrain_seed", type=int, default=0)
    parser.add_argument("--data_seed", type=int, default=0,
                        help="synthetic data: another disjoint draw of scenes (0: the study's own), a replication")
    parser.add_argument("--extra_pretrain", default="", help="more main_pretrain.py flags (split on spaces)")
    parser.add_argument("--extra_finetune", default="", help="more main_finetune.py flags (split on spaces)")
    g = parser.add_argument_group("overrides of the scale's fields")
    g.add_argument("--model")
    g.add_argument("--arms", type=lambda t: tuple(t.replace(",", " ").split()), help=f"subset of {ALL_ARMS}")
    for name in ("n_pretrain", "n_train", "n_val", "n_test", "pretrain_epochs", "pretrain_batch",
                 "finetune_epochs", "finetune_batch", "probe_samples"):
        g.add_argument(f"--{name}", type=count(1))
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
    if args.data_seed < 0:
        raise ConfigError(f"--data_seed {args.data_seed}: expected an integer >= 0")
    if args.dataset == "synthetic" and min(scale.n_pretrain, scale.n_train, scale.n_val, scale.n_test) < 1:
        raise ConfigError(f"--scale {args.scale} with synthetic data needs --n_pretrain/--n_train/--n_val/--n_test")
    return Study(out=args.out, scale=scale, dataset=args.dataset, data_path=args.data_path,
                 launcher=tuple(args.launcher.split()), jobs=args.jobs, threads=args.threads, amp=args.amp,
                 device=args.device, num_workers=args.num_workers, pretrain_seed=args.pretrain_seed,
                 data_seed=args.data_seed,
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
    per_class_table(runs).to_csv(study.out / "per_class.csv", index=False, float_format="%.4f")
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
