"""The benchmark scripts run end to end on tiny settings and print a well-formed table.

Only the structure of the output is checked (a row per path and setting, positive numbers): timings are
never asserted, machines are too noisy for that.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line.split() for line in proc.stdout.splitlines()]


def test_bench_pretrain_compares_eager_and_optimised_paths():
    rows = run("bench_pretrain.py", "--model", "mixmim_tiny", "--input_size", "64", "--batch_size", "2",
               "--device", "cpu", "--amp", "bf16", "fp32", "--steps", "1", "--warmup", "0", "--compare-eager",
               "--spectral", "--peak_seconds", "0.2")
    table = [r for r in rows if r and r[0] == "mixmim_tiny"]
    assert [(r[3], r[4]) for r in table] == [("bf16", "eager"), ("bf16", "optimised"), ("bf16", "spectral"),
                                             ("fp32", "eager"), ("fp32", "optimised"), ("fp32", "spectral")]
    for r in table:
        img_s, gflop_img, gflop_s, of_peak = map(float, r[5:9])
        assert img_s > 0 and gflop_img > 0 and gflop_s > 0 and of_peak > 0
        faults, sys_s = float(r[10]), float(r[11])  # page faults and kernel seconds per timed step
        assert faults >= 0 and sys_s >= 0
    # Eager and optimised do the same work: identical FLOP counts per image; the spectral head adds a little.
    assert table[0][6] == table[1][6] and table[3][6] == table[4][6]
    assert float(table[2][6]) >= float(table[1][6]) and float(table[5][6]) >= float(table[4][6])
    assert float(table[0][9]) == 1.0


def test_bench_pretrain_simmim_mode_with_breakdown():
    rows = run("bench_pretrain.py", "--model", "mixmim_tiny", "--mode", "simmim", "--input_size", "64",
               "--batch_size", "2", "--device", "cpu", "--amp", "fp32", "--steps", "1", "--warmup", "0",
               "--peak_seconds", "0.2", "--breakdown")
    table = [r for r in rows if r and r[0] == "mixmim_tiny"]
    assert len(table) == 1 and table[0][1] == "simmim" and float(table[0][5]) > 0
    # The breakdown: one line per part of the step, their shares adding up to the whole step.
    start = next(i for i, r in enumerate(rows) if r[:2] == ["where", "the"])
    parts = rows[start + 1:-1]
    assert parts[0][:2] == ["matrix", "products"] and parts[-1][:3] == ["outside", "ATen", "ops"]
    shares = [float(r[r.index("s") + 1].rstrip("%")) for r in parts]
    assert abs(sum(shares) - 100) < 1.5, shares
    assert rows[-1][:2] == ["this", "step:"]


def test_op_breakdown_counts_products_apart_from_other_ops():
    from benchmarks.bench_pretrain import op_breakdown

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    lines = op_breakdown(lambda: (a @ b + a).relu(), flops=2 * 256**3, peak=1.0, top=5)
    names = [line.split()[0] for line in lines[2:-3]]
    assert lines[1].split()[:2] == ["matrix", "products"]
    assert "mm" not in names and {"add", "relu"} <= set(names), lines
    assert "other ATen ops (0 kinds)" in lines[-3] and "outside ATen ops" in lines[-2]


def test_op_breakdown_times_the_optimizer_step():
    """The optimiser's kernels are timed like any other op (listed whatever their rank: top covers every kind)."""
    from benchmarks.bench_pretrain import op_breakdown

    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([w], lr=1e-3, fused=True)

    def step():
        (w @ w).sum().backward()
        opt.step()

    lines = op_breakdown(step, flops=2 * 64**3, peak=1.0, top=1000)
    names = [line.split()[0] for line in lines[2:-3]]
    assert any(n == "_fused_adamw_" or n.startswith("_foreach") for n in names), lines
    assert "other ATen ops (0 kinds)" in lines[-3]


def test_table_keeps_a_slow_steps_figures_positive():
    """A step far below peak (0.4 GFLOP/s of a 770 GFLOP/s peak) still prints a positive fraction."""
    from benchmarks.bench_pretrain import format_row

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


def test_bench_predict_times_the_pipeline_the_forward_and_the_reader():
    rows = run("bench_predict.py", "--model", "mixmim_study", "--input_size", "64", "--size", "360",
               "--batch_size", "4", "--rounds", "1")
    table = {r[1]: r for r in rows if len(r) > 10 and r[1] in ("predict", "forward", "read")}
    assert list(table) == ["predict", "forward", "read"], rows
    for r in table.values():
        median, low, high = map(float, (r[3], r[5], r[7]))
        assert 0 < low <= median <= high
    assert table["forward"][9] == "1.00x"
    assert rows[0][:4] == ["scene", "360", "x", "360"] and rows[0][5:7] == ["9", "windows"]
    assert rows[-1][0] == "reader" and "bottleneck;" in rows[-1]


# --- the GPU benchmark, exercised on the CPU --------------------------------------------------------------

def _bench_pretrain():
    from benchmarks import bench_pretrain, device_timing

    return bench_pretrain, device_timing


def test_device_cuda_without_a_gpu_is_one_clear_error(monkeypatch, capsys):
    bench, _ = _bench_pretrain()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device cuda: torch sees no CUDA device" in err and "use --device cpu" in err
    assert bench.parse_args(["--device", "cpu"]).device == torch.device("cpu")


def test_table_has_the_gpu_columns_and_a_stop_row():
    bench, _ = _bench_pretrain()
    head = bench.header("T").split()
    assert "TFLOP/s" in head and head[-3:] == ["mem", "GiB", "rounds"]
    r = {"model": "mixmim_base", "mode": "mixmim", "path": "optimised", "img_s": 3000.0, "gflop_img": 35.5,
         "gflop_s": 106_500.0, "mem_gib": 41.3}
    cols = bench.format_row(r, 256, "bf16", 900_000.0, 1500.0, unit="T").split()
    assert cols[:5] == ["mixmim_base", "mixmim", "256", "bf16", "optimised"]
    assert float(cols[7]) == pytest.approx(106.5, rel=0.01)  # TFLOP/s
    assert float(cols[8]) == pytest.approx(106_500 / 900_000, rel=0.01) and float(cols[9]) == 2.0
    assert cols[10:14] == ["-", "-", "41.30", "-"]  # no CPU page faults, kernel time or rounds on a GPU row
    stop = bench.format_row({**r, "stop": "CUDA out of memory. Tried to allocate 2.00 GiB", "fit": 256},
                            512, "bf16", 900_000.0, 1500.0, unit="T")
    assert "stopped: out of memory at batch 512 (largest that fit: 256)" in stop and "Tried to allocate" in stop


def _cheap_step(limit: int | None):
    """A stand-in for the training step: a loss on the model's weights, out of memory above ``limit``."""
    def make(device, mean, std):
        def step(model, batch, gen):
            if limit is not None and batch[0].shape[0] > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return sum(p.float().sum() for p in model.parameters()) * 0.0, {}, batch[0].shape[0]
        return step
    return make


def _small_build(s, path):
    """A stand-in for ``bench_pretrain.build``: a small model in its place, so that only the sweep is timed."""
    model = torch.nn.Linear(8, 8)
    model.in_chans = 2
    return model, model, torch.optim.AdamW(model.parameters())


TINY = ["--model", "mixmim_tiny", "--input_size", "64", "--device", "cpu", "--steps", "1", "--warmup", "0",
        "--peak_seconds", "0.01", "--peak_n", "64"]


def test_out_of_memory_stops_the_sweep_and_the_next_setting_runs(monkeypatch, capsys):
    bench, _ = _bench_pretrain()
    monkeypatch.setattr(bench, "make_pretrain_step", _cheap_step(limit=2))
    monkeypatch.setattr(bench, "build", _small_build)
    bench.main([*TINY, "--batch_size", "1", "--max_batch", "8", "--amp", "fp32", "bf16", "--grad_ckpt"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("mixmim_tiny")]
    got = [(r[2], r[3], r[4], r[5]) for r in rows]
    # batch 1 and 2 fit, 4 runs out of memory (both paths), 8 is skipped; then bf16 starts again from batch 1
    assert [g[:3] for g in got] == [(b, amp, p) for amp in ("fp32", "bf16") for b in ("1", "2", "4")
                                    for p in ("optimised", "grad_ckpt")]
    stops = [line for line in map(" ".join, rows) if "stopped:" in line]
    assert len(stops) == 4 and all("out of memory at batch 4 (largest that fit: 2)" in s for s in stops)
    assert all("Tried to allocate 20.00 GiB" in s for s in stops)
    assert all(float(r[5]) > 0 for r in rows if "stopped:" not in r)


class _FakeEvent:
    """``torch.cuda.Event`` stand-in: records the wall time; every instance is counted."""
    made = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        _FakeEvent.made += 1
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.t - self.t) * 1000


def test_event_timed_path_runs_each_path_alone(monkeypatch, capsys):
    """The GPU code path (device events, paths one after the other, peak memory column) on the CPU."""
    bench, dev = _bench_pretrain()
    syncs = []
    monkeypatch.setattr(bench, "make_pretrain_step", _cheap_step(limit=None))
    monkeypatch.setattr(bench, "build", _small_build)
    monkeypatch.setattr(dev, "clock_for", lambda device: dev.Clock(_FakeEvent, lambda: syncs.append(1)))
    _FakeEvent.made = 0
    bench.main([*TINY, "--batch_size", "2", "--amp", "fp32", "--steps", "3", "--warmup", "1", "--compare-eager"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("mixmim_tiny")]
    assert [r[4] for r in rows] == ["eager", "optimised"] and all(float(r[5]) > 0 for r in rows)
    assert _FakeEvent.made == 2 * 3 * 2 and len(syncs) == 2 * 2  # a pair per timed step; 2 syncs per path
    assert rows[0][-1] == "-"  # no GPU: no peak memory


def test_event_timing_takes_the_median_of_the_timed_steps():
    _, dev = _bench_pretrain()
    lengths = iter([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])  # ms per step of "a", "b", "a", "b", ...

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.ms = None

        def record(self) -> None:
            pass

        def elapsed_time(self, end) -> float:
            return next(lengths)

    calls = []
    median = dev.time_with_events({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3,
                                  warmup=1, clock=dev.Clock(Event, lambda: None))
    assert calls == ["a", "b"] * 4
    assert median == {"a": pytest.approx(0.003), "b": pytest.approx(0.004)}  # a: 5, 1, 3 ms; b: 2, 4, 9 ms


def test_out_of_memory_is_told_apart_from_other_errors():
    _, dev = _bench_pretrain()
    cpu = torch.device("cpu")
    assert dev.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert dev.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not dev.is_out_of_memory(RuntimeError("shape mismatch"))

    def fail():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        dev.catch_out_of_memory(fail, cpu)
    assert dev.catch_out_of_memory(lambda: 3, cpu) == (3, None)


def test_bench_data_reads_the_step_rate_and_counts_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the import sets it
    from benchmarks import bench_data

    table = tmp_path / "bench.txt"
    table.write_text("model mode batch ...\n"
                     "mixmim_base    mixmim    256 bf16  optimised     3100 35.5 110 0.11 1.00 - - 40.1\n"
                     "mixmim_base    mixmim    512 bf16  optimised     3350 35.5 119 0.12 1.00 - - 80.3\n"
                     "mixmim_base    mixmim   1024 bf16  optimised  stopped: out of memory at batch 1024 ...\n")
    assert bench_data.step_rate_from_table(table) == (3350.0, "mixmim_base mixmim 512 bf16 optimised")
    assert bench_data.workers_needed({1: 1000.0, 2: 1900.0, 4: 3500.0}, 3350.0).startswith("4,")
    assert bench_data.workers_needed({1: 1000.0, 2: 1900.0}, 3350.0).startswith("about 4 ")


def test_gpu_check_dry_run_lists_every_section(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    sections = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert sections == GPU_CHECK_SECTIONS
    commands = proc.stdout
    for model in ("mixmim_base", "mixmim_large", "mixmim_huge"):
        assert f"--model {model}" in commands
    for flag in ("--device cuda", "--mode simmim", "--compare-eager", "--grad_ckpt", "--compile", "--max_batch",
                 "--workers", "main_pretrain.py", "main_finetune.py", "--eval"):
        assert flag in commands, flag
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_gpu_check_dry_run_writes_nothing_where_it_is_started(tmp_path):
    """Run from a folder (the repository, for a user) without OUT_DIR: no gpu_check_out/ appears there."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OUT": ""})
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert f"{tmp_path}/gpu_check_out" in proc.stdout and "nothing was written" in proc.stdout


GPU_CHECK_SECTIONS = ["install", "env", "bench_base", "bench_large", "bench_huge", "bench_simmim", "data_rate",
                      "pretrain", "finetune", "eval", "bench_compile"]


@pytest.mark.manual
def test_gpu_check_tiny_cpu_run_passes_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[1:-1]}
    assert status == dict.fromkeys(GPU_CHECK_SECTIONS, "PASS"), summary
    assert (out / "eval" / "results.json").is_file() and (out / "pretrain" / "checkpoint.pth").is_file()
    assert "workers needed per GPU" in (out / "data_rate.log").read_text()
