"""Speed of a full ViT finetuning step against the kept-token fraction rho (Patch Sampling Schedule).

    python -m benchmarks.bench_pss --model vit_small_rel --input_size 128 --batch_size 32 --amp bf16 fp32
    python -m benchmarks.bench_pss --model vit_base_rel --rho 0.25 0.5 0.75 1.0 --steps 5

A step is what ``main_finetune.py --pss ...`` does per update: random flips, normalisation, token ranking
and selection, forward, ``MultiLabelSoftMarginLoss`` on 19 classes, backward, AdamW (layer-wise lr decay
groups). FLOPs per image are counted by ``torch.utils.flop_counter`` on one step. The rhos of one setting
are timed round-robin (rho 1, 0.5, ..., then again) and the median step time is kept, so a change of load
on the machine hits every rho alike: the ratio ``vs rho=1`` is what to read, measured within one run. It is
the median of the per-round ratios; ``rounds`` gives their range, and a warning follows a setting whose
range is wider than the speed-up itself (a loaded machine: rerun with more --steps, or on an idle one).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_pretrain import DTYPES, count_flops
from engine import adamw
from engine_finetune import make_finetune_step
from models_vit import VIT_CONFIGS, build_vit
from sarwmix.cli import ArgumentParser, count
from util.device import CPU_MEMORY_MODES, tune_cpu_memory
from util.lr_decay import param_groups
from util.pss import keep_count
from util.timing import Speedup, noise_warning, round_robin_times, speedups

N_CLASSES = 19


def build(name: str, img: int, batch: int, seed: int = 0):
    """Model, AdamW with layer-decay groups, and one batch of raw dB inputs and multi-hot targets."""
    torch.manual_seed(seed)
    model = build_vit(name, img_size=img, in_chans=2, num_classes=N_CLASSES, drop_path_rate=0.1)
    groups = param_groups(model, 0.05, model.layer_id, model.num_layers, 0.75)
    opt = adamw(groups, 1e-4, (0.9, 0.999), torch.device("cpu"))  # what main_finetune.py uses
    x = -15 + 5 * torch.randn(batch, 2, img, img)
    y = (torch.rand(batch, N_CLASSES) < 0.2).float()
    return model, opt, (x, y)


def step_fn(model, opt, batch, amp: torch.dtype | None, rho: float):
    step = make_finetune_step(torch.device("cpu"), [-19.2, -12.6], [3.2, 3.0], "ben",
                              rho_fn=lambda: rho, n_tokens=model.num_tokens)
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, _, _ = step(model, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def measure(name: str, img: int, batch: int, amp: str, rhos: list[float], steps: int,
            warmup: int) -> tuple[list[dict], dict[float, Speedup]]:
    """img/s and GFLOP/img of a step at each rho (one model and optimizer, rhos interleaved), and each rho's
    speed-up against rho = 1 over the rounds."""
    model, opt, data = build(name, img, batch)
    runs = {r: step_fn(model, opt, data, DTYPES[amp], r) for r in rhos}
    flops = {r: count_flops(run) / batch / 1e9 for r, run in runs.items()}
    times = round_robin_times(runs, steps, warmup)
    rows = [{"rho": r, "tokens": keep_count(model.num_tokens, r), "img_s": batch / statistics.median(times[r]),
             "gflop_img": flops[r]} for r in rhos]
    return rows, speedups(times, reference=1.0)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["vit_small_rel"], choices=tuple(VIT_CONFIGS))
    p.add_argument("--input_size", type=int, default=128)
    p.add_argument("--batch_size", type=count(1), default=32)
    p.add_argument("--rho", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--amp", nargs="+", default=["bf16", "fp32"], choices=tuple(DTYPES))
    p.add_argument("--steps", type=count(1), default=5, help="timed steps per rho")
    p.add_argument("--warmup", type=count(0), default=1, help="untimed steps per rho first")
    p.add_argument("--threads", type=count(0), default=0)
    p.add_argument("--cpu_memory", default="tuned", choices=CPU_MEMORY_MODES,
                   help="allocator setting, as in training (util.device.tune_cpu_memory)")
    a = p.parse_args(argv)
    memory = tune_cpu_memory(a.cpu_memory)
    if a.threads:
        torch.set_num_threads(a.threads)
    rhos = sorted(set(a.rho) | {1.0}, reverse=True)  # rho = 1 is the reference of the ratio
    print(f"threads {torch.get_num_threads()}; input {a.input_size} px, batch {a.batch_size}, "
          f"{a.steps} timed steps per rho (median), rhos interleaved; memory: {memory}")
    print(f"{'model':14s} {'amp':5s} {'rho':>5s} {'tokens':>6s} {'img/s':>8s} {'GFLOP/img':>9s} {'vs rho=1':>8s} "
          f"{'rounds':>13s}")
    for name in a.model:
        for amp in a.amp:
            rows, ups = measure(name, a.input_size, a.batch_size, amp, rhos, a.steps, a.warmup)
            for r in rows:
                up = ups[r["rho"]]
                print(f"{name:14s} {amp:5s} {r['rho']:5.2f} {r['tokens']:6d} {r['img_s']:8.2f} "
                      f"{r['gflop_img']:9.2f} {up.median:8.2f} {f'{up.low:.2f}-{up.high:.2f}':>13s}", flush=True)
            warning = noise_warning(ups, name=lambda rho, setting=f"{name} {amp}": f"{setting} rho {rho:g}")
            if warning:
                print(warning, flush=True)


if __name__ == "__main__":
    main()
