"""What the training loop agrees on with the other ranks at every step: the loss, bad patches, and whether to
save or stop.

One all-reduce per micro-batch carries ``(loss, bad patches met for the first time, fatal bad patch, stop
request, save request)``: every rank then takes the same decision at the same step without a further
collective. A stop (SIGTERM / SIGUSR1, ``util.preemption``) or a periodic save (``--save_every_minutes``,
``--save_every_steps``) is carried out at the next optimizer update, after the step in flight; a bad
patch in stop mode ends the run on every rank at once.

``EpochProgress`` is where an epoch stands (the micro-batches done, the running sums of its log record, the
bad patches met); a mid-epoch checkpoint stores it, so that a resumed run continues at the exact step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

from sarwmix.data.bad_patches import BadPatch, stop_message
from sarwmix.errors import DataError
from util.preemption import Preempted, PreemptionSignal
from util.watchdog import StallWatchdog

log = logging.getLogger("sarwmix")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class EpochProgress:
    """Where an epoch stands.

    Attributes:
        epoch: the epoch (0-based).
        next_iter: micro-batches of the epoch done (a mid-epoch checkpoint is taken at an update boundary).
        sums: running sums of the scalars of the epoch's log record (``loss``, ``grad_norm``, extras).
        n_images, n_norms: images seen by this rank; updates whose gradient norm was finite.
        bad: bad patches of this epoch, name -> reason (this rank's, and all ranks' after ``gather_bad``).
        bad_total: the bad patches met for the first time, summed over ranks and steps: at least the number
            of distinct ones (two ranks can meet the same one), exact after ``gather_bad``.
    """

    epoch: int
    next_iter: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "grad_norm": 0.0})
    n_images: int = 0
    n_norms: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    bad_total: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> EpochProgress:
        return cls(**{f.name: state[f.name] for f in fields(cls)})


class RunControl:
    """The per-step agreement of the ranks (see the module docstring), the watchdog and the mid-epoch saves.

    Args:
        device: where the all-reduced tensor lives (the GPU for NCCL).
        preemption: the installed signal handler, or None (no stop requests).
        watchdog: the stall watchdog, or None.
        save_every_s / save_every_steps: periodic saves inside the epoch (0: off); the time is rank 0's.
        max_bad: the fraction of an epoch's samples that may be bad before the run stops (``--max_bad``).
        epoch_samples: samples drawn per epoch by all ranks together.
        save: ``save(progress, reason)``, called on every rank at an update where the ranks agreed to save.
    """

    def __init__(self, device: torch.device | None = None, *, preemption: PreemptionSignal | None = None,
                 watchdog: StallWatchdog | None = None, save_every_s: float = 0.0, save_every_steps: int = 0,
                 max_bad: float = 0.001, epoch_samples: int = 0,
                 save: Callable[[EpochProgress, str], None] | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.preemption, self.watchdog = preemption, watchdog
        self.save_every_s, self.save_every_steps = save_every_s, save_every_steps
        self.max_bad, self.epoch_samples, self.save = max_bad, epoch_samples, save
        self.is_main = not _distributed() or dist.get_rank() == 0
        self.last_save = time.monotonic()
        self._stop = self._save_due = False
        self.in_collective = False
        self.rng_to_restore: dict | None = None  # this rank's random state at a mid-epoch checkpoint

    # --- the watchdog ---
    def at(self, where: str, collective: bool = False) -> None:
        """The main thread enters ``where`` (a collective when ``collective``: its failure is the other ranks')."""
        self.in_collective = collective
        if self.watchdog is not None:
            self.watchdog.at(where)

    def beat(self, where: str) -> None:
        self.in_collective = False
        if self.watchdog is not None:
            self.watchdog.beat(where)

    def restore_rng(self) -> None:
        """Put back the random state of a mid-epoch checkpoint (once, at the start of the resumed epoch)."""
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore, self.device)
            self.rng_to_restore = None

    def poll_stop(self) -> bool:
        """Whether any rank received a stop signal (a collective when distributed; between epochs)."""
        self.at("the all-reduce of the stop request between epochs", collective=True)
        stop = self.preemption is not None and self.preemption.received is not None
        if _distributed():
            t = torch.tensor([float(stop)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            stop = bool(t.item())
        self._stop = self._stop or stop
        return self._stop

    # --- one all-reduce per micro-batch ---
    def sync(self, loss: float, bad: list[BadPatch], fatal: BadPatch | None, progress: EpochProgress) -> float:
        """The mean loss over ranks; records new bad patches; raises when the ranks must stop on bad data.

        Raises:
            DataError: a bad patch in stop mode on any rank (that rank names it; the others say where to look),
                or more than ``max_bad`` of the epoch bad.
        """
        new = {b.name: b.reason for b in bad if b.name not in progress.bad}
        progress.bad.update(new)
        stop = self.preemption is not None and self.preemption.received is not None
        due = self.is_main and self.save_every_s > 0 and time.monotonic() - self.last_save >= self.save_every_s
        values = [loss, len(new), fatal is not None, stop, due]
        if _distributed():
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            values = t.tolist()
            values[0] /= dist.get_world_size()
        if values[2]:
            raise DataError(stop_message(fatal) if fatal is not None else
                            "another rank met a bad patch and stopped the run (its message names the patch)")
        self._stop = self._stop or bool(values[3])
        self._save_due = self._save_due or bool(values[4])
        progress.bad_total += int(values[1])
        if progress.bad_total > self.max_bad * self.epoch_samples:
            self._check_bad_fraction(progress)
        return values[0]

    def _check_bad_fraction(self, progress: EpochProgress) -> None:
        gather_bad(progress)
        limit = self.max_bad * self.epoch_samples
        if len(progress.bad) > limit:
            first = next(iter(progress.bad.items()))
            raise DataError(f"{len(progress.bad)} bad patches in epoch {progress.epoch}, more than --max_bad "
                            f"{self.max_bad:g} of its {self.epoch_samples} samples ({limit:g}); the first: bad patch "
                            f"{first[0]}: {first[1]}; the list is in bad_patches.txt")

    # --- at every optimizer update ---
    def after_update(self, progress: EpochProgress, update: int, last: bool) -> None:
        """Save and/or stop where the ranks agreed to; raises ``Preempted`` after the stop's checkpoint.

        Args:
            update: the run's optimizer updates so far (``--save_every_steps`` counts them).
            last: the epoch's last update: its end-of-epoch checkpoint follows, which serves both a periodic
                save and a stop (checked between epochs, ``poll_stop``).
        """
        every = self.save_every_steps
        periodic = self._save_due or (every > 0 and update % every == 0)
        if last or not (self._stop or periodic):
            return
        reason = self.stop_reason if self._stop else "periodic save"
        if self.save is not None:
            self.save(progress, reason)
        self.last_save = time.monotonic()
        self._save_due = False
        if self._stop:
            raise Preempted(f"{reason}: stopped at epoch {progress.epoch}, iteration {progress.next_iter}")

    @property
    def stop_reason(self) -> str:
        """What asked this run to stop: this process's signal, or another rank's."""
        received = self.preemption.received if self.preemption is not None else None
        return f"{received} received" if received else "a stop signal received by another rank"


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch's CPU generator, and the GPU's on a CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (a collective when distributed)."""
    if not _distributed():
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    if _distributed():
        dist.barrier()


def gather_bad(progress: EpochProgress) -> None:
    """Every rank's bad patches of the epoch, on every rank (a collective when distributed)."""
    for part in gather_objects(dict(progress.bad)):
        progress.bad.update(part)
    progress.bad_total = len(progress.bad)
