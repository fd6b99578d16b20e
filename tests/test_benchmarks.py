"""The benchmark scripts run end to end on tiny settings and print a well-formed table.

Only the structure of the output is checked (a row per path and setting, positive numbers): timings are
never asserted, machines are too noisy for that.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line.split() for line in proc.stdout.splitlines()]


def test_bench_pretrain_compares_eager_and_optimised_paths():
    rows = run("bench_pretrain.py", "--model", "mixmim_tiny", "--input_size", "64", "--batch_size", "2",
               "--amp", "bf16", "fp32", "--steps", "1", "--warmup", "0", "--compare-eager", "--peak_seconds", "0.2")
    table = [r for r in rows if r and r[0] == "mixmim_tiny"]
    assert [(r[3], r[4]) for r in table] == [("bf16", "eager"), ("bf16", "optimised"),
                                             ("fp32", "eager"), ("fp32", "optimised")]
    for r in table:
        img_s, gflop_img, gflop_s, of_peak = map(float, r[5:9])
        assert img_s > 0 and gflop_img > 0 and gflop_s > 0 and of_peak > 0
        faults, sys_s = float(r[10]), float(r[11])  # page faults and kernel seconds per timed step
        assert faults >= 0 and sys_s >= 0
    # Both paths do the same work: identical FLOP counts per image.
    assert table[0][6] == table[1][6] and table[2][6] == table[3][6]
    assert float(table[0][9]) == 1.0


def test_bench_pretrain_simmim_mode_with_breakdown():
    rows = run("bench_pretrain.py", "--model", "mixmim_tiny", "--mode", "simmim", "--input_size", "64",
               "--batch_size", "2", "--amp", "fp32", "--steps", "1", "--warmup", "0", "--peak_seconds", "0.2",
               "--breakdown")
    table = [r for r in rows if r and r[0] == "mixmim_tiny"]
    assert len(table) == 1 and table[0][1] == "simmim" and float(table[0][5]) > 0
    # The breakdown: one line per part of the step, their shares adding up to the whole step.
    start = next(i for i, r in enumerate(rows) if r[:2] == ["where", "the"])
    parts = rows[start + 1:-1]
    assert parts[0][:2] == ["matrix", "products"] and parts[-1][:3] == ["outside", "ATen", "ops"]
    assert any(r[0] == "_fused_adamw_" or r[0].startswith("_foreach") for r in parts), parts
    shares = [float(r[r.index("s") + 1].rstrip("%")) for r in parts]
    assert abs(sum(shares) - 100) < 1.5, shares
    assert rows[-1][:2] == ["this", "step:"]


def test_op_breakdown_counts_products_apart_from_other_ops():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_pretrain import op_breakdown

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    lines = op_breakdown(lambda: (a @ b + a).relu(), flops=2 * 256**3, peak=1.0, top=5)
    names = [line.split()[0] for line in lines[2:-3]]
    assert lines[1].split()[:2] == ["matrix", "products"]
    assert "mm" not in names and {"add", "relu"} <= set(names), lines
    assert "other ATen ops (0 kinds)" in lines[-3] and "outside ATen ops" in lines[-2]


def test_table_keeps_a_slow_steps_figures_positive():
    """A step far below peak (0.4 GFLOP/s of a 770 GFLOP/s peak) still prints a positive fraction."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_pretrain import format_row

    r = {"model": "mixmim_tiny", "mode": "mixmim", "path": "eager", "img_s": 0.004, "gflop_img": 0.1,
         "gflop_s": 0.0004, "faults": 0.0, "sys_s": 0.0}
    cols = format_row(r, 2, "bf16", 770.0, 0.004).split()
    img_s, gflop_img, gflop_s, of_peak = map(float, cols[5:9])
    assert img_s > 0 and gflop_s > 0 and of_peak > 0
    assert abs(of_peak - 0.0004 / 770) / (0.0004 / 770) < 0.01


def test_bench_pss_reports_each_rho():
    rows = run("bench_pss.py", "--model", "vit_tiny_rel", "--input_size", "64", "--batch_size", "2",
               "--rho", "1.0", "0.5", "--amp", "fp32", "--steps", "1", "--warmup", "0")
    table = [r for r in rows if r and r[0] == "vit_tiny_rel"]
    assert len(table) == 2, rows
