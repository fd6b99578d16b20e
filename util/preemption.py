"""Preemption: the scheduler's signal becomes a checkpoint inside the epoch and a resumable exit.

Schedulers end a job with a signal: PBS sends SIGTERM (SIGKILL after its kill delay), SLURM sends the signal
of ``--signal`` before the time limit and SIGTERM on preemption (SIGKILL after ``KillWait``), and torchrun
passes SIGTERM on to its workers (SIGKILL 30 s later). ``PreemptionSignal`` turns SIGTERM and SIGUSR1 into
a request that the training loop reads at every step: every rank finishes the step it is in, rank 0 writes
``checkpoint.pth`` with the position inside the epoch, and every process exits with ``EXIT_PREEMPTED``.

Open MPI's ``mpirun`` (5.x) kills its ranks about a second after it receives SIGTERM itself, but forwards
SIGUSR1 and waits: send SIGUSR1 to an ``mpirun`` job (the launchers in ``scripts/`` do).
"""
from __future__ import annotations

import signal
import threading

# sysexits.h EX_TEMPFAIL: a temporary failure, worth running again. The launchers resubmit on it.
EXIT_PREEMPTED = 75
# A stalled or failed collective, as GNU timeout reports a command that ran out of time.
EXIT_STALLED = 124
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 - an outcome, not an error
    """The run stopped on a preemption signal after saving; the entry point exits with ``EXIT_PREEMPTED``."""


class PreemptionSignal:
    """Records the first SIGTERM or SIGUSR1; the training loop polls ``received`` at every step.

    ``install`` replaces the handlers of those signals (main thread only) and ``restore`` puts the previous
    ones back. The handler only records the signal: the loop decides, with the other ranks, where to stop.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
