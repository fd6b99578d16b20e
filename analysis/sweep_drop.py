"""Dynamic-inference curve of a PSS-finetuned ViT: metric and throughput for a grid of kept fractions rho.

Usage::

    python -m analysis.sweep_drop output_pss/checkpoint_best.pth --rho 0.2 0.4 0.6 0.8 1.0
    python -m analysis.sweep_drop CKPT --split test --dataset benv1 --data_path /data/BigEarthNet-S1-v1.0

For each ``rho`` the split is scored with ``engine_finetune.evaluate`` (the model keeps the
``ceil(rho * N)`` patch tokens of largest embedding norm), and inference throughput is measured on one
fixed batch (``--bench_batch`` images of the split, forward only, ``torch.no_grad``, the run's autocast).
Throughput passes go round-robin over the grid and the median pass time is kept, so a load change on the
machine hits every ``rho`` alike; each round also gives each ``rho`` a speed-up against the largest, and the
range of those over the rounds is reported beside the median: a warning names every ``rho`` whose range is
wider than its speed-up (on a loaded machine the ratio can flip, x0.68 in one run and x1.3 in the next),
and the figure marks it with "?". Data and model flags are ``main_finetune.py``'s (``--help`` lists them);
those not given default to the checkpoint's stored args (``analysis/finetuned.py``).

Writes ``sweep_drop.csv`` (``rho, tokens_kept, tokens_total, loss, <metrics>, img_per_s, speedup,
speedup_low, speedup_high``; ``speedup`` is the median over the rounds of the throughput over that of the
largest ``rho`` of the grid, ``speedup_low``/``_high`` its range) and ``sweep_drop.png`` (the selection
metric and the throughput against ``rho``), by default next to the checkpoint.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

import engine_finetune as E
from analysis.finetuned import Finetuned, load_finetuned, script_parser
from analysis.logs import run_main, write_outputs
from sarwmix.cli import count
from sarwmix.errors import ConfigError
from util.pss import keep_count
from util.timing import Speedup, noise_warning, round_robin_times, speedups

DEFAULT_RHOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def get_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__)
    g = p.add_argument_group("sweep")
    g.add_argument("--rho", type=float, nargs="+", default=list(DEFAULT_RHOS), help="kept fractions")
    g.add_argument("--bench_batch", type=count(1), default=16, help="images per throughput pass")
    g.add_argument("--bench_reps", type=count(1), default=5, help="timed passes per rho (after one warm-up)")
    p.set_defaults(name="sweep_drop")
    return p


def check_rhos(rhos: list[float]) -> list[float]:
    bad = [r for r in rhos if not 0.0 < r <= 1.0]
    if bad:
        raise ConfigError(f"--rho {bad}: every kept fraction must be in (0, 1]")
    return sorted(set(rhos))


@torch.no_grad()
def throughput(ft: Finetuned, rhos: list[float], batch: int, reps: int) -> dict[float, list[float]]:
    """Seconds of each of ``reps`` round-robin forward passes of ``batch`` images at each ``rho``."""
    n = len(ft.dataset)
    x = ft.batch([i % n for i in range(batch)])
    amp = ft.amp_dtype

    def forward(rho: float):
        def run() -> None:
            with torch.autocast(ft.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                ft.model(x, rho=rho)
        return run

    sync = torch.cuda.synchronize if ft.device.type == "cuda" else None
    # One warm-up pass per rho (allocator, kernels), then the timed ones.
    return round_robin_times({r: forward(r) for r in rhos}, reps, warmup=1, sync=sync)


def sweep(ft: Finetuned, rhos: list[float], bench_batch: int, bench_reps: int) -> pd.DataFrame:
    """One row per ``rho``: kept tokens, the split's metrics and the measured throughput."""
    a = ft.args
    loader = E.eval_loader(ft.dataset, a.batch_size, a.num_workers)
    stats, n_tokens = ft.dataset.stats, ft.model.num_tokens
    rows = []
    for rho in rhos:
        metrics = E.evaluate(ft.model, loader, ft.device, a.task, stats["mean"], stats["std"], ft.amp_dtype,
                             gather=False, rho=rho)
        rows.append({"rho": rho, "tokens_kept": keep_count(n_tokens, rho), "tokens_total": n_tokens, **metrics})
    times = throughput(ft, rhos, bench_batch, bench_reps)
    ups = speedups(times, reference=rhos[-1])
    table = pd.DataFrame(rows)
    table["img_per_s"] = table["rho"].map({r: bench_batch / statistics.median(t) for r, t in times.items()})
    for column, field in (("speedup", "median"), ("speedup_low", "low"), ("speedup_high", "high")):
        table[column] = table["rho"].map({r: getattr(up, field) for r, up in ups.items()})
    warning = noise_warning(ups, name=lambda rho: f"rho {rho:g}")
    if warning:
        print(warning, file=sys.stderr)
    return table


def figure(table: pd.DataFrame, metric: str, model: str, split: str) -> Figure:
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(table["rho"], table[metric], "o-")
    left.set(xlabel="kept fraction rho", ylabel=f"{split} {metric}", title=f"{model}: {metric} against rho")
    right.plot(table["rho"], table["img_per_s"], "s-", color="tab:orange")
    right.set(xlabel="kept fraction rho", ylabel="images / s (forward)", title="measured throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.15)  # room for the speed-up labels
    for rho, speed, up, low, high in zip(table["rho"], table["img_per_s"], table["speedup"], table["speedup_low"],
                                         table["speedup_high"], strict=True):
        noisy = Speedup(up, low, high).noisy  # the label says so: its rounds disagree by more than its size
        right.annotate(f"x{up:.2f}{' ?' if noisy else ''}", (rho, speed), textcoords="offset points",
                       xytext=(0, 6), ha="center", fontsize=7, color="tab:red" if noisy else "black")
    return fig


def main(argv: list[str] | None = None) -> int:
    def job() -> list[Path]:
        ft = load_finetuned(get_parser(), argv)
        a = ft.args
        rhos = check_rhos(a.rho)
        table = sweep(ft, rhos, a.bench_batch, a.bench_reps)
        fig = figure(table, a.select_metric, a.model, a.split)
        return write_outputs(a.out, a.name, fig, {"": table}, a.dpi, a.title)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
