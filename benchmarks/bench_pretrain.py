"""Throughput of a full pretraining step, as a fraction of the same device's matmul peak (CPU or GPU).

    python -m benchmarks.bench_pretrain --model mixmim_base --batch_size 8 --amp bf16 --device cpu
    python -m benchmarks.bench_pretrain --model mixmim_base --batch_size 32 --amp bf16 fp32 --compare-eager
    python -m benchmarks.bench_pretrain --device cuda --model mixmim_base mixmim_large --batch_size 128 256 \\
        --max_batch 4096 --compare-eager --grad_ckpt --compile

A step is what training does: weight map from raw dB, forward with the map, backward, AdamW (fused where
the build has it), under the run's autocast dtype; the step, the optimizer and the model come from the
training code itself. FLOPs are counted by ``torch.utils.flop_counter`` on one step (matmuls, convolutions,
attention), so GFLOP/s (TFLOP/s on a GPU) is model work per second. The bf16 and fp32 matmul peaks are
measured on the same device in the same run, so the result reads as a fraction of peak.
On a CPU the paths of a setting are timed round-robin (their ratio holds on a loaded machine): ``vs eager``
is the median of the per-round ratios to the first path, ``rounds`` their range, and a warning follows a
setting whose range is wider than the speed-up itself (the load changed too much to read it); on a GPU
each path is built, timed with CUDA events after warm-up and freed in turn, so its peak memory
(``torch.cuda.max_memory_allocated``, GiB) is its own. A setting that runs out of memory prints a row saying
where the sweep stopped, frees the memory and the next setting runs; larger batches of that path are skipped.
``--breakdown`` (CPU) then times every ATen op of one more optimised step (forward, backward, optimiser) and
prints where the time goes, with the fraction of peak the step would reach if only its matrix products
took time: the ceiling that removing all other work (fusion) could give on this machine.
On a CPU the page faults and kernel time per timed step show what the allocator costs (``--cpu_memory
system`` leaves glibc's defaults, ``tuned`` is what training uses: ``util.device.tune_cpu_memory``).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import device_timing as dev
from engine import adamw
from engine_pretrain import make_pretrain_step
from modes import MODES
from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import CHANNELS
from util.device import CPU_MEMORY_MODES, cpu_supports_bf16, tune_cpu_memory
from util.lr_decay import param_groups
from util.timing import noise_warning, round_robin_times, speedups

DTYPES = {"bf16": torch.bfloat16, "fp32": None}
# Paths of one setting, in table order: the released code's step, the training default, and its variants.
PATHS = ("eager", "optimised", "spectral", "compiled", "grad_ckpt")
SPECTRAL_WEIGHT = 16.0  # the ``spectral`` path: the optimised step with the spectral target (its cost)


@dataclass(frozen=True)
class Setting:
    """What one table row group measures (everything but the batch size)."""

    model: str
    mode: str
    img: int
    amp: str
    device: torch.device
    compile_backend: str = "inductor"


def build(s: Setting, path: str):
    """Model, the callable that runs it (compiled or not) and the training optimizer, for one path."""
    extra = {"spectral_weight": SPECTRAL_WEIGHT} if path == "spectral" else {}
    model = MODES[s.mode].build(s.model, s.img, len(CHANNELS), **extra).to(s.device)  # flags' defaults
    eager = path == "eager"
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "math" if eager else "auto"
    if path == "grad_ckpt":
        model.set_grad_checkpointing(True)
    groups = param_groups(model, 0.05)
    opt = (torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False) if eager
           else adamw(groups, 1e-4, (0.9, 0.95), s.device))  # the optimizer training uses
    runner = torch.compile(model, backend=s.compile_backend) if path == "compiled" else model
    return model, runner, opt


def step_fn(runner, opt, batch, amp: torch.dtype | None, step, device_type: str = "cpu"):
    """One training step as a closure: autocast forward (the training step function), backward, AdamW."""
    def run() -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
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


def prepare(s: Setting, batch: int, path: str) -> tuple[Callable, Callable, float]:
    """The step of ``path`` (uncompiled and as timed) on a fixed batch of raw dB, and its FLOPs.

    The batch sits in host memory (pinned on a GPU) as the loader delivers it; the step moves it.
    """
    torch.manual_seed(0)  # same initial weights for every path
    model, runner, opt = build(s, path)
    chans = model.in_chans
    x = -15 + 5 * torch.randn(batch, chans, s.img, s.img, generator=torch.Generator().manual_seed(1))
    if s.device.type == "cuda":
        x = x.pin_memory()
    step = make_pretrain_step(s.device, [-19.2] * chans, [3.2] * chans)
    plain = step_fn(model, opt, (x, None), DTYPES[s.amp], step, s.device.type)
    flops = count_flops(plain)
    return plain, step_fn(runner, opt, (x, None), DTYPES[s.amp], step, s.device.type), flops


def row(s: Setting, batch: int, path: str, **fields) -> dict:
    return {"model": s.model, "mode": s.mode, "batch": batch, "amp": s.amp, "path": path, **fields}


def measure_round_robin(s: Setting, batch: int, paths: list[str], steps: int,
                        warmup: int) -> tuple[list[dict], Callable, float]:
    """Wall-clock img/s of each path from the same weights and batch, timed round-robin (CPU).

    The paths are called in turn (eager step, optimised step, eager step, ...) and the median step time of
    each is kept, so a change of load on the machine hits all alike and their ratios are meaningful; each
    row's ``rounds`` is its speed-up against the first path over the rounds (``util.timing.Speedup``).
    Also returns the last path's uncompiled step and its FLOPs, for ``op_breakdown``.
    """
    runs, flops, plain = {}, {}, None
    for path in paths:
        plain, runs[path], flops[path] = prepare(s, batch, path)
    for _ in range(warmup):
        for run in runs.values():
            run()
    before = resource.getrusage(resource.RUSAGE_SELF)  # page faults and kernel time of the timed steps
    times = round_robin_times(runs, steps, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    median = {path: statistics.median(t) for path, t in times.items()}
    ups = speedups(times, reference=paths[0])
    n_steps = steps * len(paths)
    faults = (after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt) / n_steps
    out = [row(s, batch, path, img_s=batch / median[path], gflop_img=flops[path] / batch / 1e9,
               gflop_s=flops[path] / median[path] / 1e9, faults=faults,
               sys_s=(after.ru_stime - before.ru_stime) / n_steps, rounds=ups[path]) for path in paths]
    return out, plain, flops[paths[-1]]


def measure_isolated(s: Setting, batch: int, path: str, steps: int, warmup: int, clock: dev.Clock) -> dict:
    """img/s, GFLOP/s and peak memory of one path built, warmed up, timed with device events and freed.

    The peak memory is counted from before the model is built: weights, optimizer state and the step's
    activations, what a training run of this batch size needs.
    """
    dev.free_memory(s.device)
    dev.reset_peak_memory(s.device)
    _, run, flops = prepare(s, batch, path)
    median = dev.time_with_events({path: run}, steps, warmup, clock)[path]
    return row(s, batch, path, img_s=batch / median, gflop_img=flops / batch / 1e9, gflop_s=flops / median / 1e9,
               mem_gib=dev.peak_memory_gib(s.device))


def measure(s: Setting, batch: int, paths: list[str], steps: int, warmup: int,
            clock: dev.Clock) -> tuple[list[dict], Callable | None, float]:
    """Rows of every path at one batch size; a path that runs out of memory gives a row with ``stop``.

    With device events (a GPU) the paths run one after the other, each alone in memory; with wall time
    (a CPU) they run round-robin, and running out of memory stops them all.
    """
    if clock.event is None:
        result, oom = dev.catch_out_of_memory(lambda: measure_round_robin(s, batch, paths, steps, warmup), s.device)
        if oom is None:
            return result  # type: ignore[return-value]
        return [row(s, batch, path, stop=oom) for path in paths], None, 0.0
    rows = []
    for path in paths:
        result, oom = dev.catch_out_of_memory(lambda p=path: measure_isolated(s, batch, p, steps, warmup, clock),
                                              s.device)
        rows.append(result if oom is None else row(s, batch, path, stop=oom))
    return rows, None, 0.0


def batch_sizes(sizes: list[int], max_batch: int | None) -> list[int]:
    """``--batch_size`` as given, then doubled from the last one while it stays within ``--max_batch``."""
    out = list(sizes)
    while max_batch and out[-1] * 2 <= max_batch:
        out.append(out[-1] * 2)
    return out


def significant(x: float, width: int) -> str:
    """``x`` right-aligned in ``width`` characters with three significant digits.

    A fixed number of decimals would print a slow step's small fraction of peak (0.4 GFLOP/s of a
    770 GFLOP/s bf16 peak) as 0.00; three significant digits keep every positive figure positive.
    """
    return f"{x:{width}.3g}"


def optional(x: float | None, width: int, fmt: str) -> str:
    """``x`` in ``fmt``, or ``-`` where the device has no such figure."""
    return f"{'-' if x is None else format(x, fmt):>{width}s}"


def header(unit: str = "G") -> str:
    """The table's column names; ``unit`` G (GFLOP/s, a CPU) or T (TFLOP/s, a GPU)."""
    return (f"{'model':14s} {'mode':7s} {'batch':>5s} {'amp':5s} {'path':10s} {'img/s':>7s} {'GFLOP/img':>9s} "
            f"{unit + 'FLOP/s':>8s} {'of peak':>7s} {'vs eager':>8s} {'faults/step':>11s} {'sys s/step':>10s} "
            f"{'mem GiB':>7s} {'rounds':>11s}")


def format_row(r: dict, batch: int, amp: str, peak: float, base_img_s: float, unit: str = "G") -> str:
    """One table row: a measured path of one (model, batch, amp) setting.

    ``peak`` is in GFLOP/s; ``unit`` T prints the rate in TFLOP/s. A row with ``stop`` says that the path ran
    out of memory at this batch size, the largest that fit before it and the allocator's message.
    """
    lead = f"{r['model']:14s} {r['mode']:7s} {batch:5d} {amp:5s} {r['path']:10s} "
    if "stop" in r:
        fit = f"largest that fit: {r['fit']}" if r.get("fit") else "nothing fit"
        return lead + f"stopped: out of memory at batch {batch} ({fit}); larger batches skipped: {r['stop']}"
    scale = 1e3 if unit == "T" else 1.0
    rounds = r.get("rounds")  # round-robin (CPU): the median and range of the per-round ratios
    vs_first = rounds.median if rounds is not None else r["img_s"] / base_img_s
    spread = f"{rounds.low:.2f}-{rounds.high:.2f}" if rounds is not None else "-"
    return lead + (f"{significant(r['img_s'], 7)} {significant(r['gflop_img'], 9)} "
                   f"{significant(r['gflop_s'] / scale, 8)} {significant(r['gflop_s'] / peak, 7)} "
                   f"{vs_first:8.2f} {optional(r.get('faults'), 11, '.0f')} "
                   f"{optional(r.get('sys_s'), 10, '.2f')} {optional(r.get('mem_gib'), 7, '.2f')} {spread:>11s}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["mixmim_base"])
    p.add_argument("--mode", default="mixmim", choices=tuple(MODES))
    p.add_argument("--device", default=dev.default_device(), choices=("cpu", "cuda"),
                   help="where the step runs (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--batch_size", nargs="+", type=count(1), default=[8])
    p.add_argument("--max_batch", type=count(1), default=None,
                   help="then double the last --batch_size up to this (or until memory runs out)")
    p.add_argument("--input_size", type=int, default=128)
    p.add_argument("--amp", nargs="+", default=["bf16"], choices=tuple(DTYPES))
    p.add_argument("--steps", type=count(1), default=5)
    p.add_argument("--warmup", type=count(0), default=2)
    p.add_argument("--compare-eager", dest="compare_eager", action="store_true",
                   help="also run the plain eager path (manual softmax attention, for-loop AdamW)")
    p.add_argument("--compile", action="store_true", help="also run the optimised path under torch.compile")
    p.add_argument("--compile_backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="torch.compile backend of --compile (eager: graph capture only, a quick check)")
    p.add_argument("--grad_ckpt", action="store_true", help="also run the optimised path with --grad_ckpt")
    p.add_argument("--spectral", action="store_true",
                   help=f"MixMIM: also run the optimised path with --spectral_weight {SPECTRAL_WEIGHT:g}")
    p.add_argument("--breakdown", action="store_true",
                   help="CPU: after each setting, time every ATen op of one optimised step (uncompiled) and "
                        "print where the time goes")
    p.add_argument("--threads", type=count(0), default=0)
    p.add_argument("--cpu_memory", default="tuned", choices=CPU_MEMORY_MODES,
                   help="allocator setting of the training runs (util.device.tune_cpu_memory)")
    p.add_argument("--peak_seconds", type=float, default=2.0, help="duration of each matmul-peak measurement")
    p.add_argument("--peak_n", type=count(1), default=None,
                   help="matmul side of the peaks (default: cpu 2048, cuda 8192)")
    a = p.parse_args(argv)
    try:
        a.device = dev.resolve_device(a.device)
    except ValueError as e:
        p.error(str(e))
    if a.spectral and "spectral_weight" not in MODES[a.mode].flags:
        p.error(f"--spectral times MixMIM's spectral target; {MODES[a.mode].title} has none")
    if a.breakdown and a.device.type == "cuda":
        p.error("--breakdown times every op on the host, which a GPU's queued kernels make meaningless; "
                "use it with --device cpu")
    return a


def peaks_line(device: torch.device, peaks: dict, memory: str) -> str:
    if device.type == "cuda":
        return (f"device {torch.cuda.get_device_name(device)}; matmul peak bf16 {peaks['bf16'] / 1e3:.0f} TFLOP/s, "
                f"fp32 {peaks['fp32'] / 1e3:.1f} TFLOP/s (TF32 off, as in training)")
    native = "native" if cpu_supports_bf16() else "emulated: no AVX512-BF16/AMX, --amp auto picks fp32"
    return (f"threads {torch.get_num_threads()}; matmul peak bf16 {peaks['bf16']:.0f} GFLOP/s ({native}), "
            f"fp32 {peaks['fp32']:.0f} GFLOP/s; memory: {memory}")


def sweep(s: Setting, batches: list[int], paths: list[str], a: argparse.Namespace, clock: dev.Clock,
          peak: float, unit: str) -> None:
    """Print the rows of one (model, amp) setting over the batch sizes.

    A path that runs out of memory at batch b is not tried again at b or larger.
    """
    fit: dict[str, int] = {}
    failed_at: dict[str, int] = {}
    for batch in batches:
        todo = [p for p in paths if batch < failed_at.get(p, batch + 1)]
        if not todo:
            continue
        results, plain, flops = measure(s, batch, todo, a.steps, a.warmup, clock)
        measured = [r for r in results if "stop" not in r]
        base = measured[0]["img_s"] if measured else 1.0
        for r in results:
            if "stop" in r:
                failed_at[r["path"]] = batch
                r["fit"] = fit.get(r["path"])
            else:
                fit[r["path"]] = max(batch, fit.get(r["path"], 0))
            print(format_row(r, batch, s.amp, peak, base, unit), flush=True)
        warning = noise_warning({r["path"]: r["rounds"] for r in results if "rounds" in r},
                                name=lambda path, at=f"batch {batch}": f"{path} ({at})")
        if warning:
            print(warning, flush=True)
        if a.breakdown and plain is not None:
            print("\n".join(op_breakdown(plain, flops, peak)), flush=True)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    memory = tune_cpu_memory(a.cpu_memory) if a.device.type == "cpu" else "device memory"
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.type == "cuda"
    n, chunk = a.peak_n or (8192 if cuda else 2048), 8 if cuda else 1
    peaks = {amp: dev.matmul_peak(DTYPES[amp] or torch.float32, a.device, n, a.peak_seconds, chunk=chunk)
             for amp in ("bf16", "fp32")}
    unit = "T" if cuda else "G"
    print(peaks_line(a.device, peaks, memory))
    print(header(unit))
    paths = [p for p, on in zip(PATHS, (a.compare_eager, True, a.spectral, a.compile, a.grad_ckpt), strict=True) if on]
    clock = dev.clock_for(a.device)
    for name in a.model:
        for amp in a.amp:
            s = Setting(name, a.mode, a.input_size, amp, a.device, a.compile_backend)
            sweep(s, batch_sizes(a.batch_size, a.max_batch), paths, a, clock, peaks[amp], unit)


if __name__ == "__main__":
    main()
