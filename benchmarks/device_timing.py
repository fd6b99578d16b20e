"""Device side of the benchmarks: the device choice, matmul peaks, step timing, peak memory, out-of-memory.

On a CPU every op is synchronous, so wall time around a call is its cost. On a GPU the host only queues
kernels: a step is timed with CUDA events recorded before and after it on the stream, read once the device
has finished (``torch.cuda.synchronize``), so the host's own speed and the queue depth do not enter.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """The device of ``--device cpu|cuda``.

    Raises:
        ValueError: ``cuda`` asked for while torch sees no GPU (one line saying why and what to use).
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (a CPU-only torch build, no driver, or an "
                         "empty CUDA_VISIBLE_DEVICES); use --device cpu")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait until every queued kernel of ``device`` has finished (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, seconds: float = 2.0,
                window: float = 0.25, chunk: int = 1) -> float:
    """GFLOP/s of repeated (n, n) @ (n, n) products in ``dtype`` on ``device``: the best of the windows.

    The best window, not the mean: on a shared machine a neighbour's burst lowers some windows, and a peak
    measured low would flatter every fraction of it. On a GPU ``chunk`` products are queued between two
    synchronisations, so each window times finished work and the launch gaps are hidden as in a real step.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(max(1, round(seconds / window))):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < window:
            for _ in range(chunk):
                a @ b
            synchronize(device)
            reps += chunk
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    del a, b
    free_memory(device)
    return best


@dataclass(frozen=True)
class Clock:
    """How steps are timed: wall time (``event`` None) or a pair of device events per step.

    ``event`` is called as ``event(enable_timing=True)`` and must offer ``record()`` and
    ``elapsed_time(end) -> ms`` (``torch.cuda.Event``); ``sync`` waits for the device.
    """

    event: Callable | None = None
    sync: Callable[[], None] | None = None


def clock_for(device: torch.device) -> Clock:
    """CUDA events on a GPU, wall time on a CPU."""
    if device.type == "cuda":
        return Clock(torch.cuda.Event, lambda: torch.cuda.synchronize(device))
    return Clock()


def time_with_events(runs: Mapping[object, Callable[[], object]], steps: int, warmup: int,
                     clock: Clock) -> dict:
    """Median seconds per call of each function (called in turn after ``warmup`` rounds), from device events.

    The events of all timed steps are read after one final synchronisation, so the host never waits
    between steps (as in training, where the next batch is queued while the device works).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    clock.sync()
    pairs: dict = {key: [] for key in runs}
    for _ in range(steps):
        for key, run in runs.items():
            start, end = clock.event(enable_timing=True), clock.event(enable_timing=True)
            start.record()
            run()
            end.record()
            pairs[key].append((start, end))
    clock.sync()
    return {key: statistics.median(s.elapsed_time(e) / 1000 for s, e in p) for key, p in pairs.items()}


def is_out_of_memory(err: BaseException) -> bool:
    """True for the GPU allocator's error and for a CPU allocation failure (both are RuntimeErrors)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def catch_out_of_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, str | None]:
    """``(fn(), None)``, or ``(None, first line of the error)`` when ``fn`` runs out of memory.

    The memory the failed call held is returned before this returns: the exception (whose traceback keeps
    the call's tensors alive) is dropped first, then the garbage collector runs and the GPU cache is emptied,
    so the next setting starts from the same free memory as the first. Other errors propagate.
    """
    try:
        return fn(), None
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        message = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    free_memory(device)
    return None, message


def free_memory(device: torch.device) -> None:
    """Collect unreachable tensors and hand the GPU allocator's cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (GPU only; a CPU run reports no peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """GiB the GPU allocator held at most since the last reset, or None on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
