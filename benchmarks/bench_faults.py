"""Time to exit or recover, and the work lost, for the faults of docs/RELIABILITY.md (2 CPU ranks, gloo).

    python -m benchmarks.bench_faults                   # every scenario, about 5 minutes on 2 cores
    python -m benchmarks.bench_faults --only preempt_torchrun frozen_rank

Each scenario runs the small pretraining of the fault tests (``mixmim_study``, 64 px, 2 epochs of 6 updates
on 2 ranks) with its fault injected at the start of a fixed step by ``benchmarks/fault_inject.py``, and prints
one Markdown row: the seconds from the fault to the end of the job (or, for a restart, to the first line of
the resumed run), and the updates that have to be done again. The same helpers launch the runs of
``tests/test_faults.py``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sarwmix.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
# The entry points through the fault injector: ``python -m benchmarks.fault_inject main_pretrain.py ARGS``
# (torchrun and mpirun take the same words after their own options).
INJECT = ["-m", "benchmarks.fault_inject"]
# 24 samples, 2 per rank and step on 2 ranks: 6 updates per epoch, 2 epochs; checkpoints of 25 MB.
RUN = ["--model", "mixmim_study", "--input_size", "64", "--num_samples", "24", "--batch_size", "2", "--epochs", "2",
       "--warmup_epochs", "1", "--num_workers", "0", "--no-progress", "--vis_samples", "0", "--num_threads", "1"]
UPDATES_PER_EPOCH = 6


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_env(**extra: str) -> dict:
    """This environment for 2 gloo ranks on this host, plus ``extra`` (the FAULT_* settings)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), **extra}


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
            "--master_addr", "127.0.0.1", "--master_port", free_port(), *args]


def mpirun(*args: str) -> list[str]:
    exported = ["MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "FAULT_AT", "FAULT",
                "FAULT_RANK", "FAULT_TARGET", "FAULT_STAMP", "FAULT_ONCE"]
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,sm",
            *[x for name in exported for x in ("-x", name)], "-np", "2", sys.executable, *args]


class Launched(subprocess.CompletedProcess):
    """A finished job: its output, and when (``time.time()``) each line of it arrived."""

    def __init__(self, args, returncode: int, lines: list[tuple[float, str]]) -> None:
        super().__init__(args, returncode, "".join(line for _, line in lines), "")
        self.lines = lines

    def first(self, text: str) -> float | None:
        """When the first line holding ``text`` arrived (None: never)."""
        return next((t for t, line in self.lines if text in line), None)


def launch(cmd: list[str], env: dict, timeout: float = 300, **popen) -> Launched:
    """Run ``cmd`` from the repository in a session of its own (its process group is the job)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)
    deadline, lines = time.monotonic() + timeout, []
    for line in proc.stdout:
        lines.append((time.time(), line))
        if time.monotonic() > deadline:
            break
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        text = "".join(line for _, line in lines)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f} s:\n{text}") from None
    return Launched(cmd, proc.returncode, lines)


def stamp(path: Path) -> float:
    """When ``fault_inject`` injected its fault (``FAULT_STAMP``)."""
    return float(path.read_text())


# --- the scenarios: each returns (what the run did, seconds, updates to do again) ---

def _redone(at: int, out: Path) -> int:
    """Updates finished before the fault (at the start of step ``at``) that the resumed run does again."""
    return max(0, at - 1 - _position(out))


def _position(out: Path) -> int:
    """The update a resumed run starts at, counted from the start of training."""
    import torch

    if not (out / "checkpoint.pth").exists():  # none yet: the run starts again from the beginning
        return 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True, map_location="cpu")
    position = ckpt.get("position")
    return position["epoch"] * UPDATES_PER_EPOCH + position["next_iter"] if position else \
        (ckpt["epoch"] + 1) * UPDATES_PER_EPOCH


def preempt(work: Path, launcher: str) -> tuple[str, float, int]:
    out, at = work / launcher, 4
    faults = {"torchrun": ("SIGTERM", "group"), "mpirun": ("SIGUSR1", "parent")}[launcher]
    stamped = work / f"{launcher}.stamp"
    env = run_env(FAULT_AT=str(at), FAULT=faults[0], FAULT_TARGET=faults[1], FAULT_STAMP=str(stamped))
    args = [*INJECT, "main_pretrain.py", *RUN, "--output_dir", str(out)]
    job = launch(torchrun(*args) if launcher == "torchrun" else mpirun(*args), env)
    seconds = job.lines[-1][0] - stamp(stamped)
    return f"exit {job.returncode}, checkpoint at update {_position(out)}", seconds, _redone(at, out)


def frozen_rank(work: Path, timeout: int = 30) -> tuple[str, float, int]:
    stamped = work / "frozen.stamp"
    env = run_env(FAULT_AT="4", FAULT="SIGSTOP", FAULT_RANK="1", FAULT_STAMP=str(stamped))
    job = launch(torchrun(*INJECT, "main_pretrain.py", *RUN, "--dist_timeout", str(timeout), "--output_dir",
                          str(work / "frozen")), env, timeout=timeout + 300)
    reported = job.first("error: rank 0") - stamp(stamped)
    seconds = job.lines[-1][0] - stamp(stamped)
    return f"rank 0 reports after {reported:.0f} s, exit {job.returncode}", seconds, _redone(4, work / "frozen")


def killed_rank(work: Path) -> tuple[str, float, int]:
    out = work / "killed"
    env = run_env(FAULT_AT="4", FAULT="SIGKILL", FAULT_RANK="1", FAULT_ONCE=str(work / "killed.once"),
                  FAULT_STAMP=str(work / "killed.stamp"))
    job = launch(torchrun(*INJECT, "main_pretrain.py", *RUN, "--save_every_steps", "2", "--resume", "auto",
                          "--output_dir", str(out), restarts=1), env)
    resumed = job.first("resumed from") - stamp(work / "killed.stamp")
    return f"restarted, resumed at update 2, exit {job.returncode}", resumed, 4 - 1 - 2


def sigkill_periodic(work: Path) -> tuple[str, float, int]:
    out = work / "sigkill"
    env = run_env(FAULT_AT="6", FAULT="SIGKILL", FAULT_STAMP=str(work / "sigkill.stamp"))
    job = launch([sys.executable, *INJECT, "main_pretrain.py", *RUN, "--batch_size", "4",
                  "--save_every_steps", "2", "--output_dir", str(out)], env)
    seconds = job.lines[-1][0] - stamp(work / "sigkill.stamp") if job.lines else 0.0
    return f"killed (exit {job.returncode}), checkpoint at update {_position(out)}", seconds, _redone(6, out)


def full_disk(work: Path) -> tuple[str, float, int]:
    import resource

    out = work / "disk"
    launch([sys.executable, "main_pretrain.py", *RUN, "--batch_size", "4", "--stop_epoch", "1", "--output_dir",
            str(out)], run_env())
    start = time.time()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))

    job = launch([sys.executable, "main_pretrain.py", *RUN, "--batch_size", "4", "--resume", "auto",
                  "--output_dir", str(out)], run_env(), preexec_fn=limit)
    failed = job.first("error: could not write") or start
    return f"one line, exit {job.returncode}", job.lines[-1][0] - failed, UPDATES_PER_EPOCH


SCENARIOS = {
    "preempt_torchrun": ("SIGTERM to the process group (torchrun)", lambda w: preempt(w, "torchrun")),
    "preempt_mpirun": ("SIGUSR1 to mpirun", lambda w: preempt(w, "mpirun")),
    "frozen_rank": ("a rank frozen (SIGSTOP), --dist_timeout 30", frozen_rank),
    "killed_rank": ("a rank SIGKILLed, torchrun --max-restarts 1", killed_rank),
    "sigkill_periodic": ("SIGKILL, --save_every_steps 2 (1 process)", sigkill_periodic),
    "full_disk": ("a full disk at the epoch-end save (1 process)", full_disk),
}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    print("| fault | what the run did | seconds | updates done again |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        for name in args.only:
            (work / name).mkdir(parents=True, exist_ok=True)
            title, scenario = SCENARIOS[name]
            what, seconds, lost = scenario(work / name)
            print(f"| {title} | {what} | {seconds:.1f} | {lost} |", flush=True)
    print(json.dumps({"machine": f"{os.cpu_count()} cores"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
