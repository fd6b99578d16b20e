"""Bad patches met while training: stop with one line naming the patch, or skip, count and list them.

A corrupt patch in epoch 37 of 64 (a truncated GeoTIFF, NaN or Inf pixels, a band of the wrong shape, an
LMDB value that does not decode, a truncated packed shard) makes its reader raise ``DataError`` naming the
file. Inside a DataLoader worker that exception would reach the training process as a page of re-raised
traceback, so ``GuardedData`` catches it where it happens and hands it on inside the batch:

- stop mode (default): the item carries the error; the loop stops the run with one line naming the patch;
- skip mode (``--skip_bad``): the item is replaced by the next readable item of the data set (so every batch
  keeps its size, and a resumed run reads the same items), and the skipped patch travels with the batch so
  that the loop counts it per epoch, lists it in ``bad_patches.txt`` and stops once more than ``--max_bad``
  of the epoch is bad.

Evaluation drops a bad item instead of replacing it (a replacement would count one sample twice), and
reports which ones it dropped.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.utils.data import Dataset, default_collate

from sarwmix.errors import DataError


def patch_name(dataset: Dataset, i: int) -> str:
    """The name of item ``i`` (its patch or pair file) when the data set knows it, else ``item i``."""
    name = getattr(dataset, "patch_name", None)
    return name(i) if callable(name) else f"item {i}"


@dataclass(frozen=True)
class BadPatch:
    """A patch that could not be read: its name and its reader's message (which names the file)."""

    name: str
    reason: str

    def line(self) -> str:
        return f"bad patch {self.name}: {self.reason}"


@dataclass
class GuardedBatch:
    """A collated batch with the bad patches met while reading it.

    ``data`` is what the default collation gives (``(x, y)``), None when every item was bad; ``fatal`` is the
    first bad patch of a stop-mode batch (the run must stop); ``skipped`` lists the patches skipped (skip
    mode) or dropped (evaluation); ``indices`` are the data-set indices of the rows of ``data``.
    """

    data: object
    indices: list[int]
    skipped: list[BadPatch] = field(default_factory=list)
    fatal: BadPatch | None = None


MODES = ("stop", "skip", "drop")


class GuardedData(Dataset):
    """A data set whose read errors (``DataError``) travel with the batch instead of raising in a worker.

    Args:
        dataset: any data set of the project (items ``(x, y)``).
        mode: ``stop`` (a bad item ends the run), ``skip`` (a bad item is replaced by the next readable one:
            training with ``--skip_bad``) or ``drop`` (a bad item is left out of its batch: evaluation with
            ``--skip_bad``).

    Items are ``(index, item or None, bad patches met)``, collated by ``Collate(mode)``.
    """

    def __init__(self, dataset: Dataset, mode: str = "stop") -> None:
        if mode not in MODES:
            raise ValueError(f"bad-patch mode {mode!r}: expected one of {MODES}")
        self.dataset, self.mode = dataset, mode
        for name in ("stats", "num_classes"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, i: int):
        try:
            return self.dataset[i], None
        except DataError as err:
            return None, BadPatch(patch_name(self.dataset, i), str(err))

    def __getitem__(self, i: int) -> tuple[int, object, list[BadPatch]]:
        item, bad = self._read(i)
        if bad is None or self.mode != "skip":
            return i, item, [bad] if bad else []
        met = [bad]
        for step in range(1, len(self)):
            item, bad = self._read((i + step) % len(self))
            if bad is None:
                return i, item, met
            met.append(bad)
        raise DataError(f"all {len(self)} patches of the data set are bad; the first: {met[0].line()}")


class Collate:
    """Collation of ``GuardedData`` items into a ``GuardedBatch`` (a picklable callable for loader workers).

    The readable items go through ``default_collate``; the bad ones are listed. In ``stop`` mode a batch
    holding a bad patch comes back without data and with ``fatal`` set: the caller stops the run.
    """

    def __init__(self, mode: str = "stop") -> None:
        self.mode = mode

    def __call__(self, items: Sequence[tuple[int, object, list[BadPatch]]]) -> GuardedBatch:
        good = [(i, item) for i, item, _ in items if item is not None]
        bad = [b for _, _, met in items for b in met]
        if bad and self.mode == "stop":
            return GuardedBatch(None, [], bad, fatal=bad[0])
        data = default_collate([item for _, item in good]) if good else None
        return GuardedBatch(data, [i for i, _ in good], bad)


def unpack(batch) -> tuple[object, list[BadPatch], BadPatch | None]:
    """(data, bad patches met, fatal patch) of a loader batch; a plain batch has no bad patches."""
    if isinstance(batch, GuardedBatch):
        return batch.data, batch.skipped, batch.fatal
    return batch, [], None


def stop_message(bad: BadPatch) -> str:
    """The one line a stop-mode run ends with."""
    return (f"{bad.line()}; fix or remove it, or pass --skip_bad to skip bad patches (counted per epoch in "
            f"log.txt and listed in bad_patches.txt)")
