"""Timing arms against each other on a machine whose load changes: round-robin calls, per-round ratios, spread.

A speed-up measured on a shared machine can flip from one run to the next (x0.68 one time, x1.3 the next)
when the arms are timed one after the other and the load changes in between. Here the arms are called in
turn (a, b, a, b, ...), so a change of load hits every arm alike, and each round gives one ratio per arm
against the reference: the spread of those ratios says how far the printed speed-up can be trusted.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass


def round_robin_times(runs: Mapping[Hashable, Callable[[], object]], steps: int, warmup: int,
                      sync: Callable[[], None] | None = None) -> dict[Hashable, list[float]]:
    """Seconds of each call of each function, called in turn (a, b, a, b, ...) after ``warmup`` rounds.

    Args:
        runs: arm -> function timed (called without arguments).
        steps: timed rounds; every arm is called once per round.
        warmup: untimed rounds first (allocator, kernels, caches).
        sync: called before and after each timed call (e.g. ``torch.cuda.synchronize``).
    Returns:
        arm -> ``steps`` durations in seconds, in round order.
    """
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    for i in range(warmup + steps):
        for key, run in runs.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            run()
            if sync is not None:
                sync()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Speedup:
    """An arm's speed against the reference: ``median`` of the per-round ratios (reference time / arm time,
    > 1: faster), and their range ``low`` .. ``high`` over the rounds."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        """Width of the range of the per-round ratios."""
        return self.high - self.low

    @property
    def effect(self) -> float:
        """Distance of the median ratio from 1 (no difference)."""
        return abs(self.median - 1.0)

    @property
    def noisy(self) -> bool:
        """The rounds disagree by more than the speed-up itself: its size, even its sign, is not measured."""
        return self.spread > self.effect

    def __str__(self) -> str:
        return f"x{self.median:.2f} (rounds x{self.low:.2f}-x{self.high:.2f})"


def speedups(times: Mapping[Hashable, list[float]], reference: Hashable) -> dict[Hashable, Speedup]:
    """Per-round speed-ups of every arm of ``round_robin_times`` against ``reference`` (which gets x1.00)."""
    base = times[reference]
    out = {}
    for key, arm in times.items():
        ratios = [b / a for b, a in zip(base, arm, strict=True) if a > 0]
        out[key] = Speedup(statistics.median(ratios), min(ratios), max(ratios))
    return out


def noise_warning(ups: Mapping[Hashable, Speedup], name: Callable[[Hashable], str] = str) -> str | None:
    """One line naming the arms whose speed-up is smaller than its spread over the rounds, or None.

    ``name`` formats an arm (e.g. ``lambda rho: f"rho {rho}"``).
    """
    noisy = [f"{name(key)} {up}" for key, up in ups.items() if up.noisy]
    if not noisy:
        return None
    return (f"warning: the spread over rounds is larger than the speed-up for {', '.join(noisy)}: the machine's "
            f"load changed during the run; rerun on an idle machine or with more steps before reading these ratios")
