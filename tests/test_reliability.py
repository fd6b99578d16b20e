"""The parts behind the cluster faults, one at a time and fast: the per-step agreement of the ranks (stop,
periodic saves, bad patches), the position of a mid-epoch checkpoint, the stall watchdog, a failed save, the
free-space warning, the NCCL settings and the launchers' shell helpers. The faults end to end are in
tests/test_faults.py (``pytest -m faults``)."""
from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from sarwmix.data.bad_patches import BadPatch
from sarwmix.errors import CheckpointError, DataError
from util import checkpoint as ckpt_io
from util.distributed import nccl_fail_fast
from util.logs import truncate_lines
from util.preemption import EXIT_PREEMPTED, EXIT_STALLED, Preempted, PreemptionSignal
from util.run_control import EpochProgress, RunControl, rng_state, set_rng_state
from util.sampler import BlockShardSampler


def test_a_stop_request_saves_at_the_next_update_then_raises_preempted():
    saved = []
    signal = PreemptionSignal()
    control = RunControl(preemption=signal, save=lambda p, reason: saved.append((p.next_iter, reason)))
    progress = EpochProgress(epoch=3)
    assert control.sync(0.5, [], None, progress) == 0.5
    control.after_update(progress, update=1, last=False)
    assert saved == []
    signal.received = "SIGTERM"
    control.sync(0.5, [], None, progress)
    progress.next_iter = 4
    with pytest.raises(Preempted, match="SIGTERM received: stopped at epoch 3, iteration 4"):
        control.after_update(progress, update=2, last=False)
    assert saved == [(4, "SIGTERM received")]


def test_the_last_update_of_an_epoch_leaves_the_save_to_the_epoch_end():
    saved = []
    control = RunControl(save_every_steps=2, save=lambda p, reason: saved.append(reason))
    progress = EpochProgress(epoch=0)
    control.after_update(progress, update=2, last=True)
    assert saved == []
    control.after_update(progress, update=4, last=False)
    control.after_update(progress, update=5, last=False)
    assert saved == ["periodic save"]


def test_periodic_saves_by_time_are_rank_0_clock():
    saved = []
    control = RunControl(save_every_s=1e-9, save=lambda p, reason: saved.append(reason))
    control.sync(1.0, [], None, EpochProgress(0))
    control.after_update(EpochProgress(0), update=1, last=False)
    assert saved == ["periodic save"]


def test_bad_patches_are_counted_once_and_past_max_bad_the_run_stops():
    control = RunControl(max_bad=0.25, epoch_samples=8)
    progress = EpochProgress(0)
    control.sync(1.0, [BadPatch("a", "x"), BadPatch("a", "x")], None, progress)
    control.sync(1.0, [BadPatch("a", "x"), BadPatch("b", "y")], None, progress)
    assert progress.bad == {"a": "x", "b": "y"} and progress.bad_total == 2
    with pytest.raises(DataError, match=r"3 bad patches in epoch 0, more than --max_bad 0.25 of its 8 samples"):
        control.sync(1.0, [BadPatch("c", "z")], None, progress)
    with pytest.raises(DataError, match="^bad patch q: q.tif broken; fix or remove it, or pass --skip_bad"):
        RunControl().sync(0.0, [], BadPatch("q", "q.tif broken"), EpochProgress(0))


def test_epoch_progress_round_trips_and_rng_state_restores():
    progress = EpochProgress(2, next_iter=6, sums={"loss": 3.0, "grad_norm": 1.0}, n_images=24, n_norms=3,
                             bad={"p": "r"}, bad_total=1)
    assert EpochProgress.from_state(progress.state_dict()) == progress
    torch.manual_seed(5)
    state = rng_state(torch.device("cpu"))
    first = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)


def test_the_sampler_resumes_at_a_micro_batch_of_its_epoch():
    whole = BlockShardSampler(24, 2, world_size=2, rank=1, accum_iter=2, seed=4)
    whole.set_epoch(3)
    resumed = BlockShardSampler(24, 2, world_size=2, rank=1, accum_iter=2, seed=4)
    resumed.set_epoch(3, start=4)
    assert list(resumed) == list(whole)[4 * 2:] and len(resumed) == len(whole)
    with pytest.raises(ValueError, match="inside an update of 2 micro-batches"):
        resumed.set_epoch(3, start=3)


def test_a_failed_save_names_the_file_and_the_space_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_io.save_linked({"model": {"w": torch.zeros(4)}, "epoch": 0}, path)
    real_save = torch.save

    def full_disk(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    big = {"model": {"w": torch.zeros(2**20)}, "epoch": 1}
    expected = (rf"^could not write {path}: No space left on device; the checkpoint needs about 4.0 MiB and .* "
                r"free; the previous checkpoint.pth is intact")
    with pytest.raises(CheckpointError, match=expected):
        ckpt_io.save_linked(big, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary file left

    def other_error(obj, fh, *args, **kwargs):
        raise RuntimeError("not about space")

    monkeypatch.setattr(torch, "save", other_error)
    with pytest.raises(RuntimeError, match="not about space"):
        ckpt_io.save_linked(big, path)


def test_space_warning_when_the_checkpoints_will_not_fit(tmp_path):
    free = ckpt_io.free_bytes(tmp_path)
    assert ckpt_io.space_warning(tmp_path, 1024, 3) is None
    warning = ckpt_io.space_warning(tmp_path, free, 3)
    assert warning.startswith(f"{tmp_path} has ") and "(3 files of" in warning and "--save_freq" in warning
    assert ckpt_io.free_bytes(tmp_path / "not" / "yet") == pytest.approx(free, rel=0.01)


def test_truncate_lines_keeps_the_earlier_epochs(tmp_path):
    path = tmp_path / "bad_patches.txt"
    path.write_text("0\ta\tx\n1\tb\ty\n2\tc\tz\ncut")
    truncate_lines(path, lambda line: int(line.split("\t", 1)[0]) < 2)
    assert path.read_text() == "0\ta\tx\n1\tb\ty\n"


def test_nccl_settings_fail_fast_unless_the_job_sets_its_own():
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    applied = nccl_fail_fast(env, 300)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in applied
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "360"


STALL = textwrap.dedent("""
    import time
    from util.watchdog import StallWatchdog
    dog = StallWatchdog(0.5, rank=3).start()
    dog.beat("step 1 done")
    dog.at("the all-reduce of the loss at epoch 0, iteration 2")
    time.sleep(30)
""")


def test_the_watchdog_reports_where_it_stalled_and_exits():
    proc = subprocess.run([sys.executable, "-c", STALL], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_STALLED
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 3: stalled: no training step completed in ")
    assert last.endswith("(--dist_timeout 0.5 s) while in the all-reduce of the loss at epoch 0, iteration 2")
    assert "Current thread" in proc.stderr or "Thread 0x" in proc.stderr  # faulthandler's stacks


def test_exit_codes_are_distinct():
    assert len({0, 1, 2, EXIT_PREEMPTED, EXIT_STALLED}) == 5


# --- the launchers' shell helpers ---

def _bash(script: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {REPO / 'scripts' / '_common.sh'}\n{script}"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_walltime_parsing():
    proc = _bash('for t in 48:00:00 1:30 45 x 1:2:3:4; do walltime_seconds "$t"; echo "$t=$REPLY"; done')
    assert proc.stdout.split() == ["48:00:00=172800", "1:30=90", "45=45", "x=", "1:2:3:4="]


def test_the_stop_timer_signals_the_script_and_can_be_cancelled():
    proc = _bash('trap "echo stop-signal" USR1; start_stop_timer 1; sleep 3; wait\n'
                 'start_stop_timer 60; stop_stop_timer; sleep 1; ps -eo args | grep -c "^sleep 60$" || true')
    assert proc.stdout.split() == ["stop-signal", "0"]


def test_a_stop_signal_to_the_script_reaches_the_run_once_as_sigusr1():
    child = ("import signal, sys, time; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); "
             "print('ready', flush=True); t = time.time()\nwhile not got and time.time() - t < 20: time.sleep(0.05)\n"
             "sys.exit(75 if got else 1)")
    proc = _bash(f'(sleep 2; kill -TERM $$; kill -USR1 $$) & run_preemptible {sys.executable} -c "{child}"; '
                 'echo "status $?"')
    assert "status 75" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("stop signal received: SIGUSR1 to the run") == 1


def test_settings_survive_a_resubmission(tmp_path):
    settings = tmp_path / "job.env"
    saved = _bash(f'export TASK_TYPE=finetune EPOCH="16 32" EXTRA_ARGS="--lr 1e-3 --seed 7" NCCL_DEBUG=INFO '
                  f'MASTER_PORT=1234; save_settings {settings}')
    assert saved.returncode == 0, saved.stderr
    reader = tmp_path / "read.sh"
    reader.write_text(f"source {REPO / 'scripts' / '_common.sh'}\nload_settings\n"
                      'echo "$TASK_TYPE|$EPOCH|$EXTRA_ARGS|$NCCL_DEBUG|${MASTER_PORT:-none}"\n')
    proc = subprocess.run(["env", "-i", f"SARWMIX_SETTINGS={settings}", "bash", str(reader)], capture_output=True,
                          text=True, timeout=30)
    assert proc.stdout.strip() == "finetune|16 32|--lr 1e-3 --seed 7|INFO|none", proc.stderr
