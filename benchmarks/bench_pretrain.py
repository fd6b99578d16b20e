"""Throughput of a full pretraining step, as a fraction of this machine's matmul peak.

    python benchmarks/bench_pretrain.py --model mixmim_base --batch_size 8 --amp bf16
    python benchmarks/bench_pretrain.py --model mixmim_base --batch_size 32 --amp bf16 fp32 --compare-eager

A step is what training does: weight map from raw dB, forward with the map, backward, AdamW. FLOPs are
counted by ``torch.utils.flop_counter`` on one step (matmuls, convolutions, attention), so GFLOP/s is
model work per second. The bf16 and fp32 matmul peaks are measured in the same run, so the result reads as
a fraction of peak and ratios are comparable whatever else the machine is doing.
``--breakdown`` then times every ATen op of one more optimised step (forward, backward, optimiser) and
prints where the time goes, with the fraction of peak the step would reach if only its matrix products
took time: the ceiling that removing all other work (fusion) could give on this machine.
The page faults and kernel time per timed step show what the allocator costs (``--cpu_memory system``
leaves glibc's defaults, ``tuned`` is what training uses: ``util.misc.tune_cpu_memory``); the peaks are
measured under the same setting.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_pretrain import make_pretrain_step  # noqa: E402
from util.lr_decay import param_groups  # noqa: E402
from util.misc import CPU_MEMORY_MODES, cpu_supports_bf16, time_round_robin, tune_cpu_memory  # noqa: E402
from util.trainer import adamw  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": None}
def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, window: float = 0.25) -> float:
    """GFLOP/s of repeated n x n matmuls in ``dtype``: the best of ``seconds / window`` windows.

    The best window, not the mean: on a shared machine a neighbour's burst lowers some windows, and a peak
    measured low would flatter every fraction of it (single 2 s windows ranged 290-345 GFLOP/s on the
    development VM; the best of 8 varies far less).
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(max(1, round(seconds / window))):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < window:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


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


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter has no formula for the CPU kernel of scaled_dot_product_attention, which runs whenever the
# attention has no trainable bias (MixMIM's decoder, the absolute-position ViTs): its q@k and attn@v would
# count as 0 FLOP, an error that grows with the token count (about a third of a vit_small step at 512 px).
_CPU_SDPA = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
             "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward_flops}
SDPA_FLOPS = {getattr(torch.ops.aten, op): f for op, f in _CPU_SDPA.items() if hasattr(torch.ops.aten, op)}


def flop_counter_mode() -> FlopCounterMode:
    """torch's FLOP counter with the CPU attention kernels added (matmuls, convolutions, attention)."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)


def count_flops(run) -> float:
    """FLOPs of one call of ``run`` (forward, backward and optimizer step)."""
    counter = flop_counter_mode()
    with counter:
        run()
    return float(counter.get_total_flops())


class _OpTimer(TorchDispatchMode):
    """Seconds and calls of every ATen op run under it, by op name (``self.times[name] = [s, calls]``).

    A dispatch mode sits below autograd, so it sees the backward kernels and the optimiser's too; on a CPU
    every op is synchronous, so its wall time is its cost.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, list] = defaultdict(lambda: [0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        entry = self.times[func.overloadpacket.__name__]
        entry[0] += time.perf_counter() - t0
        entry[1] += 1
        return out


def op_breakdown(run, flops: float, peak: float, top: int = 10) -> list[str]:
    """Lines saying where one step's time goes: matrix products, the ``top`` costliest other ops, the rest.

    The timer adds a few microseconds per op; that lands in "outside ATen ops" with the time of Python and
    of the autograd engine. The last line gives the fraction of ``peak`` the step would reach if everything
    but its matrix products took no time.
    """
    timer = _OpTimer()
    with timer:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    # The "products" are the ops whose FLOPs count_flops counts, so their rate divides like by like.
    counted = {op.__name__ for op in flop_counter_mode().flop_registry}
    products = sum(t for name, (t, _) in timer.times.items() if name in counted)
    others = sorted(((t, n, name) for name, (t, n) in timer.times.items() if name not in counted), reverse=True)
    in_ops = sum(t for t, _ in timer.times.values())

    def line(label: str, seconds: float, extra: str = "") -> str:
        return f"  {label:52s} {seconds:7.3f} s {100 * seconds / wall:5.1f}%  {extra}".rstrip()

    rate = flops / products / 1e9
    lines = [f"where the optimised step's time goes (one uncompiled step, every ATen op timed, {wall:.2f} s):",
             line("matrix products (mm, addmm, bmm, attention, conv)", products,
                  f"{rate:.0f} GFLOP/s, {rate / peak:.2f} of peak")]
    lines += [line(f"{name} x{n}", t) for t, n, name in others[:top]]
    rest = others[top:]
    lines.append(line(f"other ATen ops ({len(rest)} kinds)", sum(t for t, _, _ in rest)))
    lines.append(line("outside ATen ops (Python, autograd engine, timer)", wall - in_ops))
    lines.append(f"  this step: {flops / wall / 1e9 / peak:.2f} of peak; "
                 f"if only its matrix products took time: {rate / peak:.2f}")
    return lines


def measure(name: str, mode: str, batch: int, img: int, amp: str, paths: list[str], compile_model: bool,
            steps: int, warmup: int) -> tuple[list[dict], object, float]:
    """img/s and GFLOP/s of each path ("eager", "optimised") from the same weights and batch.

    The paths are timed round-robin (eager step, optimised step, eager step, ...) and the median step time of
    each is kept, so a change of load on the machine hits both alike and their ratio is meaningful.
    Also returns the last path's uncompiled step and its FLOPs, for ``op_breakdown``.
    """
    runs, flops = {}, {}
    for path in paths:
        torch.manual_seed(0)  # same initial weights for every path
        model, runner, opt = build(name, mode, img, path == "eager", compile_model and path != "eager")
        chans = model.in_chans
        x = -15 + 5 * torch.randn(batch, chans, img, img, generator=torch.Generator().manual_seed(1))
        step = make_pretrain_step(torch.device("cpu"), [-19.2] * chans, [3.2] * chans)
        plain = step_fn(model, opt, (x, None), DTYPES[amp], step)
        flops[path] = count_flops(plain)
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
    return out, plain, flops[paths[-1]]


def significant(x: float, width: int) -> str:
    """``x`` right-aligned in ``width`` characters with three significant digits.

    A fixed number of decimals would print a slow step's small fraction of peak (0.4 GFLOP/s of a
    770 GFLOP/s bf16 peak) as 0.00; three significant digits keep every positive figure positive.
    """
    return f"{x:{width}.3g}"


def format_row(r: dict, batch: int, amp: str, peak: float, base_img_s: float) -> str:
    """One table row: a measured path of one (model, batch, amp) setting."""
    return (f"{r['model']:14s} {r['mode']:7s} {batch:5d} {amp:5s} {r['path']:10s} "
            f"{significant(r['img_s'], 7)} {significant(r['gflop_img'], 9)} {significant(r['gflop_s'], 8)} "
            f"{significant(r['gflop_s'] / peak, 7)} {r['img_s'] / base_img_s:8.2f} "
            f"{r['faults']:11.0f} {r['sys_s']:10.2f}")


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
    p.add_argument("--breakdown", action="store_true",
                   help="after each setting, time every ATen op of one optimised step (uncompiled) and print "
                        "where the time goes")
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
                results, plain, flops = measure(name, a.mode, batch, a.input_size, amp, paths, a.compile,
                                                a.steps, a.warmup)
                base = results[0]["img_s"]
                for r in results:
                    print(format_row(r, batch, amp, peaks[amp], base), flush=True)
                if a.breakdown:
                    print("\n".join(op_breakdown(plain, flops, peaks[amp])), flush=True)


if __name__ == "__main__":
    main()
