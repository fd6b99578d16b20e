"""The SEN12-FLOOD pair files that preparation writes and the loader reads: their names and shape.

A pair is one ``.npy`` array ``(2 dates, 2 channels [VH, VV], 512, 512)`` of float32 linear power, named
``<seq>__<file1>__<file2>__<label>.npy`` (label 1: the second date is flooded). No torch here: the
preparation commands import it.
"""
from __future__ import annotations

from pathlib import Path

from sarwmix.errors import DataError

PAIR_SHAPE = (2, 2, 512, 512)


def pair_name(seq: str, first: str, second: str, label: int) -> str:
    """The file of a pair: ``<seq>__<file1>__<file2>__<label>.npy`` (label 1: the second date is flooded)."""
    return f"{seq}__{first}__{second}__{label}.npy"


def parse_pair_label(path: Path) -> int:
    """The label (0 or 1) of a pair file named ``<seq>__<file1>__<file2>__<label>.npy``."""
    parts = Path(path).stem.split("__")
    if len(parts) != 4 or parts[3] not in ("0", "1"):
        raise DataError(f"{path}: expected a name <seq>__<file1>__<file2>__<0|1>.npy")
    return int(parts[3])


def pair_sequence(path: Path) -> str:
    """The sequence of a pair file ``<seq>__<file1>__<file2>__<label>.npy``."""
    return Path(path).name.split("__")[0]
