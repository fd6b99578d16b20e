"""Throughput of a full pretraining step, as a fraction of this machine's matmul peak.

    python benchmarks/bench_pretrain.py --model mixmim_base --batch_size 8 --amp bf16
    python benchmarks/bench_pretrain.py --model mixmim_base --batch_size 32 --amp bf16 fp32 --compare-eager

A step is what training does: weight map from raw dB, forward with the map, backward, AdamW. FLOPs are
counted by ``torch.utils.flop_counter`` on one step (matmuls, convolutions, attention), so GFLOP/s is
model work per second. The bf16 and fp32 matmul peaks are measured in the same run, so the result reads as
a fraction of peak and ratios are comparable whatever else the machine is doing.
The page faults and kernel time per timed step show what the allocator costs (``--cpu_memory system``
leaves glibc's defaults, ``tuned`` is what training uses: ``util.misc.tune_cpu_memory``); the peaks are
measured under the same setting, since huge pages raise them too.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_pretrain import make_pretrain_step  # noqa: E402
from util.lr_decay import param_groups  # noqa: E402
from util.misc import CPU_MEMORY_MODES, cpu_supports_bf16, time_round_robin, tune_cpu_memory  # noqa: E402
from util.trainer import adamw  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of repeated n x n matmuls in ``dtype`` (the practical peak of this CPU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def build(name: str, mode: str, img: int, eager: bool, compile_model: bool):
    import main_pretrain

    args = main_pretrain.parse_args(["--model", name, "--mode", mode, "--input_size", str(img)])
    model = main_pretrain.build_model(args)
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "math" if eager else "auto"
    groups = param_groups(model, 0.05)
    opt = (torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False) if eager
           else adamw(groups, 1e-4, (0.9, 0.95), torch.device("cpu")))  # the optimizer training uses
    runner = torch.compile(model) if compile_model else model
    return model, runner, opt


def step_fn(runner, opt, batch, amp: torch.dtype | None, step):
    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, _, _ = step(runner, batch, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return run


def count_flops(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def measure(name: str, mode: str, batch: int, img: int, amp: str, paths: list[str], compile_model: bool,
            steps: int, warmup: int) -> list[dict]:
    """img/s and GFLOP/s of each path ("eager", "optimised") from the same weights and batch.

    The paths are timed round-robin (eager step, optimised step, eager step, ...) and the median step time of
    each is kept, so a change of load on the machine hits both alike and their ratio is meaningful.
    """
    runs, flops = {}, {}
    for path in paths:
        torch.manual_seed(0)  # same initial weights for every path
        model, runner, opt = build(name, mode, img, path == "eager", compile_model and path != "eager")
        chans = model.in_chans
        x = -15 + 5 * torch.randn(batch, chans, img, img, generator=torch.Generator().manual_seed(1))
        step = make_pretrain_step(torch.device("cpu"), [-19.2] * chans, [3.2] * chans)
        flops[path] = count_flops(step_fn(model, opt, (x, None), DTYPES[amp], step))
        runs[path] = step_fn(runner, opt, (x, None), DTYPES[amp], step)
    for _ in range(warmup):
        for run in runs.values():
            run()
    before = resource.getrusage(resource.RUSAGE_SELF)  # page faults and kernel time of the timed steps
    median = time_round_robin(runs, steps, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n_steps = steps * len(paths)
    faults = (after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt) / n_steps
    out = []
    for path in paths:
        dt = median[path]
        out.append({"model": name, "mode": mode, "batch": batch, "amp": amp, "path": path, "img_s": batch / dt,
                    "gflop_img": flops[path] / batch / 1e9, "gflop_s": flops[path] / dt / 1e9,
                    "faults": faults, "sys_s": (after.ru_stime - before.ru_stime) / n_steps})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["mixmim_base"])
    p.add_argument("--mode", default="mixmim", choices=("mixmim", "simmim"))
    p.add_argument("--batch_size", nargs="+", type=int, default=[8])
    p.add_argument("--input_size", type=int, default=128)
    p.add_argument("--amp", nargs="+", default=["bf16"], choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare-eager", dest="compare_eager", action="store_true",
                   help="also run the plain eager path (manual softmax attention, for-loop AdamW)")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised path")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cpu_memory", default="tuned", choices=CPU_MEMORY_MODES,
                   help="allocator setting of the training runs (util.misc.tune_cpu_memory)")
    p.add_argument("--peak_seconds", type=float, default=2.0, help="duration of each matmul-peak measurement")
    a = p.parse_args(argv)
    memory = tune_cpu_memory(a.cpu_memory)
    if a.threads:
        torch.set_num_threads(a.threads)
    peaks = {"bf16": matmul_peak(torch.bfloat16, seconds=a.peak_seconds),
             "fp32": matmul_peak(torch.float32, seconds=a.peak_seconds)}
    native = "native" if cpu_supports_bf16() else "emulated: no AVX512-BF16/AMX, --amp auto picks fp32"
    print(f"threads {torch.get_num_threads()}; matmul peak bf16 {peaks['bf16']:.0f} GFLOP/s ({native}), "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s; memory: {memory}")
    print(f"{'model':14s} {'mode':7s} {'batch':>5s} {'amp':5s} {'path':10s} {'img/s':>7s} {'GFLOP/img':>9s} "
          f"{'GFLOP/s':>8s} {'of peak':>7s} {'vs eager':>8s} {'faults/step':>11s} {'sys s/step':>10s}")
    for name in a.model:
        for batch in a.batch_size:
            for amp in a.amp:
                paths = ["eager", "optimised"] if a.compare_eager else ["optimised"]
                results = measure(name, a.mode, batch, a.input_size, amp, paths, a.compile, a.steps, a.warmup)
                base = results[0]["img_s"]
                for r in results:
                    print(f"{r['model']:14s} {r['mode']:7s} {batch:5d} {amp:5s} {r['path']:10s} "
                          f"{r['img_s']:7.2f} {r['gflop_img']:9.2f} {r['gflop_s']:8.1f} "
                          f"{r['gflop_s'] / peaks[amp]:7.2f} {r['img_s'] / base:8.2f} "
                          f"{r['faults']:11.0f} {r['sys_s']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
