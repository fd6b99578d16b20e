"""A stall watchdog: a rank on which no training step completes in time reports where it waits and exits.

A node that hangs or a frozen process leaves every other rank waiting inside a collective. The process
group's timeout (``--dist_timeout``) turns a collective that waits too long into an exception; this
watchdog covers what that timeout does not see (a data loader that never delivers, a collective of a
backend that does not time out): a daemon thread that, when the main thread reports no progress for
``timeout_s`` seconds, writes the Python stack of every thread (``faulthandler``) and one line naming the
stall to stderr, then ends the process with ``EXIT_STALLED``. The launcher (torchrun, mpirun, srun) then
ends the job's other processes.

The main thread calls ``beat(where)`` when it makes progress (a step, a checkpoint written) and
``at(where)`` before anything that may block (a collective, the next batch): ``where`` is what the stall
line names. Code that runs inside a step's allowance but may take long (an evaluation, a probe) calls the
module's ``heartbeat(where)``, which beats the running watchdog, if any.
"""
from __future__ import annotations

import faulthandler
import os
import re
import sys
import threading
import time
from typing import TextIO

from util.preemption import EXIT_STALLED


class StallWatchdog:
    """Ends the process when ``beat`` is not called for ``timeout_s`` seconds (after ``start``).

    Args:
        timeout_s: seconds without progress before the process ends.
        rank: named in the stall line.
        stream: where the stall line and the stacks go (default stderr, the job log).
    """

    def __init__(self, timeout_s: float, rank: int = 0, stream: TextIO | None = None) -> None:
        self.timeout_s, self.rank, self.stream = float(timeout_s), rank, stream
        self._where, self._last = "start-up", time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StallWatchdog:
        global _running
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()
        _running = self
        return self

    def stop(self) -> None:
        global _running
        self._stop.set()
        if _running is self:
            _running = None

    def beat(self, where: str) -> None:
        """Progress: the clock starts again; the main thread is now at ``where``."""
        self._last, self._where = time.monotonic(), where

    def at(self, where: str) -> None:
        """The main thread enters ``where`` (the clock keeps running)."""
        self._where = where

    @property
    def where(self) -> str:
        return self._where

    def _run(self) -> None:
        poll = min(5.0, max(0.05, self.timeout_s / 20))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        stream = self.stream or sys.stderr
        report(stream, f"rank {self.rank}: stalled: no training step completed in {idle:.0f} s "
                       f"(--dist_timeout {self.timeout_s:g} s) while in {self._where}")
        os._exit(EXIT_STALLED)


_running: StallWatchdog | None = None  # the watchdog of this process's training loop, while it runs


def heartbeat(where: str) -> None:
    """Progress outside the training step (an evaluation batch, a probe): beats the running watchdog."""
    if _running is not None:
        _running.beat(where)


def report(stream: TextIO, line: str) -> None:
    """The stacks of every thread of this process, then ``line`` (last, so it is what a log tail shows)."""
    stream.flush()
    try:
        faulthandler.dump_traceback(file=stream, all_threads=True)
    except (ValueError, OSError, AttributeError):  # a stream without a file descriptor
        pass
    print(f"error: {line}", file=stream, flush=True)


def collective_failed(watchdog: StallWatchdog, err: BaseException) -> None:
    """A collective raised (the process group's timeout, a peer gone): report it like a stall and exit."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", first).split(". This is typically")[0]  # gloo's source line
    report(watchdog.stream or sys.stderr, f"rank {watchdog.rank}: {watchdog.where} failed: {first[:300]} (another "
                                          f"rank is frozen, dead or slower than --dist_timeout "
                                          f"{watchdog.timeout_s:g} s)")
    os._exit(EXIT_STALLED)
