"""The run's TensorBoard writer, created at its first scalar.

``torch.utils.tensorboard.SummaryWriter`` writes its events file as soon as it is built; built at the start
of a run, it left an output folder holding nothing but that file whenever the run then failed (a missing
checkpoint, a bad data folder). This one builds it when the first scalar arrives, once training runs.
"""
from __future__ import annotations

from pathlib import Path


class LazySummaryWriter:
    """``add_scalar``, ``flush`` and ``close`` of a SummaryWriter on ``log_dir``, built at the first ``add_scalar``."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = str(log_dir)
        self._writer = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: seconds of import, only when used

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
