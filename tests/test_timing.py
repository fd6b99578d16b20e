"""util.timing: arms timed in turn, per-round speed-ups, and a warning when their spread exceeds the effect;
the benchmarks that print a speed-up use it."""
from __future__ import annotations

import pytest

from util.timing import Speedup, noise_warning, round_robin_times, speedups


def test_arms_are_called_in_turn_and_every_round_is_kept():
    calls = []
    times = round_robin_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and min(times["a"] + times["b"]) >= 0


def test_speedups_are_per_round_ratios_to_the_reference():
    times = {"base": [1.0, 2.0, 1.0], "fast": [0.5, 1.0, 0.5], "mixed": [0.8, 2.6, 0.95]}
    ups = speedups(times, reference="base")
    assert ups["base"] == Speedup(1.0, 1.0, 1.0) and not ups["base"].noisy
    assert ups["fast"] == Speedup(2.0, 2.0, 2.0) and not ups["fast"].noisy  # the load doubled round 2 alike
    mixed = ups["mixed"]  # ratios 1.25, 0.77, 1.05: faster or slower depending on the round
    assert mixed.median == pytest.approx(1.0 / 0.95) and mixed.low == pytest.approx(2.0 / 2.6)
    assert mixed.high == pytest.approx(1.25) and mixed.noisy


def test_the_warning_names_only_the_arms_whose_spread_exceeds_their_speedup():
    ups = {0.5: Speedup(1.05, 0.77, 1.25), 0.25: Speedup(1.9, 1.8, 2.0), 1.0: Speedup(1.0, 1.0, 1.0)}
    warning = noise_warning(ups, name=lambda rho: f"rho {rho:g}")
    assert warning.startswith("warning: the spread over rounds is larger than the speed-up for rho 0.5 x1.05 "
                              "(rounds x0.77-x1.25):")
    assert "rho 0.25" not in warning and "rho 1" not in warning
    assert noise_warning({0.25: Speedup(1.9, 1.8, 2.0)}) is None


def test_bench_pss_prints_the_spread_and_warns_when_it_exceeds_the_speedup(monkeypatch, capsys):
    from benchmarks import bench_pss

    def flipping(runs, steps, warmup, sync=None):  # rho 0.5 faster in one round, slower in the other
        for run in runs.values():
            run()
        return {1.0: [1.0, 1.0], 0.5: [0.7, 1.4]}

    monkeypatch.setattr(bench_pss, "round_robin_times", flipping)
    bench_pss.main(["--model", "vit_tiny_rel", "--input_size", "32", "--batch_size", "2", "--rho", "1.0", "0.5",
                    "--amp", "fp32", "--steps", "2", "--warmup", "0", "--cpu_memory", "system"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == "rounds"
    [half] = [line for line in lines if line.startswith("vit_tiny_rel") and line.split()[2] == "0.50"]
    assert half.split()[-2:] == ["1.07", "0.71-1.43"]  # median of the per-round ratios 1.43 and 0.71, range
    assert lines[-1].startswith("warning: the spread over rounds is larger than the speed-up for vit_tiny_rel "
                                "fp32 rho 0.5 x1.07")


def test_bench_pretrain_rows_carry_the_median_ratio_and_its_range():
    from benchmarks.bench_pretrain import format_row, header

    r = {"model": "mixmim_tiny", "mode": "mixmim", "path": "optimised", "img_s": 3.0, "gflop_img": 1.0,
         "gflop_s": 3.0, "faults": 0.0, "sys_s": 0.0, "rounds": Speedup(1.5, 1.4, 1.6)}
    cols = format_row(r, 2, "fp32", 100.0, 2.5).split()
    assert header().split()[-1] == "rounds" and cols[-1] == "1.40-1.60"
    assert cols[9] == "1.50"  # vs eager: the median of the per-round ratios, not 3.0 / 2.5
    assert format_row({**r, "rounds": None}, 2, "fp32", 100.0, 2.5).split()[9] == "1.20"
