"""Exceptions for user errors: bad input files, bad configuration, bad checkpoints.

Entry points catch ``SarwmixError`` and print its message as one line (no traceback), exit code 2.
Messages name the file or value and what was expected.
"""
from __future__ import annotations


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
