"""Run an entry point with a fault injected at a given training step, the same on any machine however loaded.

    python -m benchmarks.fault_inject main_pretrain.py ARGS...    (or main_finetune.py)

Environment:
    FAULT_AT      the 1-based call of the training step at whose start the fault happens (unset: no fault)
    FAULT         signal name: SIGTERM, SIGUSR1, SIGSTOP, SIGKILL, ... (default SIGTERM)
    FAULT_RANK    the rank that injects it (default 0)
    FAULT_TARGET  self | group (this process group) | parent | grandparent (default self)
    FAULT_ONCE    a file: inject only while it does not exist, and create it (a restarted or resubmitted
                  run then runs clean)
    FAULT_STAMP   a file that receives the time (time.time()) of the injection

A launcher that takes an interpreter (``PYTHON=...``) gets an executable wrapper that calls this file.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path


def _rank() -> str:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMI_RANK"):
        if name in os.environ:
            return os.environ[name]
    return "0"


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def inject() -> None:
    sig = getattr(signal, os.environ.get("FAULT", "SIGTERM"))
    once = os.environ.get("FAULT_ONCE")
    if once:
        if Path(once).exists():
            return
        Path(once).write_text("injected\n")
    if os.environ.get("FAULT_STAMP"):
        Path(os.environ["FAULT_STAMP"]).write_text(f"{time.time()}\n")
    target = os.environ.get("FAULT_TARGET", "self")
    if target == "group":
        os.killpg(os.getpgid(0), sig)
    elif target == "parent":
        os.kill(os.getppid(), sig)
    elif target == "grandparent":
        os.kill(_parent_of(os.getppid()), sig)
    else:
        os.kill(os.getpid(), sig)


def main() -> None:
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    module = importlib.import_module(Path(script).stem)  # main_pretrain | main_finetune
    engine = importlib.import_module("engine")
    real_train = engine.train_one_epoch
    calls = [0]
    at, rank = int(os.environ.get("FAULT_AT", "0")), os.environ.get("FAULT_RANK", "0")  # 0: no fault

    def train_one_epoch(model, loader, optimizer, step, **kwargs):
        def faulty_step(m, batch, gen):
            calls[0] += 1
            if calls[0] == at and _rank() == rank:
                inject()
            return step(m, batch, gen)
        return real_train(model, loader, optimizer, faulty_step, **kwargs)

    engine.train_one_epoch = train_one_epoch
    module.run_cli(module.main, module.parse_args)


if __name__ == "__main__":
    main()
