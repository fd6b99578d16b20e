"""Exceptions for user errors: bad input files, bad configuration, bad checkpoints.

Entry points catch ``SarwmixError`` and print its message as one line (no traceback), exit code 2.
Messages name the file or value and what was expected.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class SarwmixError(Exception):
    """Base class of every user-facing error of the project."""


class DataError(SarwmixError, ValueError):
    """A data file or data-set folder is missing, malformed or holds invalid values."""


class ConfigError(SarwmixError, ValueError):
    """A command-line flag, config key or config value is invalid."""


class CheckpointError(SarwmixError, ValueError):
    """A checkpoint is missing, corrupted, fails its hash check or does not fit the model."""


class TrainingError(SarwmixError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""


def table_entry(table: Mapping[str, T], key: T | str, what: str) -> T:
    """The entry of ``key`` in one of the project's tables (data sets, tasks, pretraining modes), or ``key``
    itself when it is already an entry; ConfigError naming ``what`` and listing the keys when there is none."""
    if not isinstance(key, str):
        return key
    if key not in table:
        raise ConfigError(f"{what} {key!r}: expected one of {', '.join(table)}")
    return table[key]
