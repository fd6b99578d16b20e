"""Checkpoints: atomic saving, safe loading (``weights_only=True``), hash verification, key checks.

Layout (the one of the released checkpoints): ``{"model", "optimizer", "epoch", "scaler", "args"}``; this project adds
``"stats"`` (normalisation statistics used), ``"schedule"`` (optional state of extra schedules) and
``"format_version"``. ``args`` is a plain dict here; released files hold an ``argparse.Namespace``, which
is allow-listed for loading. Either way it is read back through ``checkpoint_args``.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

from sarwmix.errors import CheckpointError
from util.files import link_or_copy_atomic, replace_atomic

FORMAT_VERSION = 1
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
T = TypeVar("T")
CHECKSUMS_FILE = Path(__file__).resolve().parents[1] / "CHECKSUMS.txt"


def save_atomic(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` with torch.save to a temporary file, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a partial file.
    """
    return replace_atomic(path, lambda fh: torch.save(obj, fh))


def save_linked(obj: dict, path: str | Path, *aliases: str | Path) -> Path:
    """``save_atomic`` to ``path``, then the same file under each of ``aliases`` (hard links where the file
    system allows, copies elsewhere): the bytes are written once.

    Raises:
        CheckpointError: the disk is full, the quota or a file-size limit is reached: one line naming the file,
            the space it needed and the space free. The previous file of every name is left as it was, and no
            temporary file is left behind.
    """
    target = Path(path)
    try:
        save_atomic(obj, target)
        for alias in aliases:
            target = Path(alias)
            link_or_copy_atomic(path, alias)
    except (OSError, RuntimeError) as failure:
        err = _no_space(failure)
        if err is None:
            raise
        limit = " (a file-size limit: see ulimit -f)" if err.errno == errno.EFBIG else ""
        raise CheckpointError(f"could not write {target}: {err.strerror}{limit}; the checkpoint needs about "
                              f"{_size(state_nbytes(obj))} and {target.parent} has {_size(free_bytes(target.parent))} "
                              f"free; the previous {target.name} is intact") from None
    return Path(path)


# errno values of a write that failed for want of space: a full disk, a quota, a file-size limit
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _no_space(err: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind ``err`` (torch.save reports it as a RuntimeError whose context it is)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


def state_nbytes(obj) -> int:
    """Bytes of the tensors in a checkpoint dict (nested dicts, lists and tuples), about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_nbytes(v) for v in obj)
    return 0


def free_bytes(folder: str | Path) -> int:
    """Free bytes for this user in ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def space_warning(folder: str | Path, checkpoint_bytes: int, files: int) -> str | None:
    """A warning when ``folder`` has less free space than ``files`` checkpoints of ``checkpoint_bytes`` need."""
    need, free = checkpoint_bytes * files, free_bytes(folder)
    if free >= need:
        return None
    return (f"{Path(folder)} has {_size(free)} free, but this run's checkpoints need about {_size(need)} "
            f"({files} files of {_size(checkpoint_bytes)}, a temporary one while writing included): free some "
            f"space, write elsewhere (--output_dir) or keep fewer numbered checkpoints (--save_freq)")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def known_hashes(checksums: Path = CHECKSUMS_FILE) -> dict[str, str]:
    """File name -> SHA-256 from a ``sha256sum``-format file (empty when the file is absent)."""
    if not checksums.exists():
        return {}
    out = {}
    for line in checksums.read_text().splitlines():
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$", line)
        if m:
            out[Path(m.group(2)).name] = m.group(1).lower()
    return out


def sha256_digest(value: str) -> str:
    """A SHA-256 given by a user (``--checkpoint_sha256``): 64 hex digits, returned in lower case.

    Raises:
        argparse.ArgumentTypeError (a ValueError) naming the value, before any file is hashed.
    """
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value.strip()):
        shown = value if len(str(value)) <= 80 else f"{str(value)[:77]}..."
        raise argparse.ArgumentTypeError(f"{shown!r} is not a SHA-256: expected 64 hex digits "
                                         f"(as sha256sum prints them)")
    return value.strip().lower()


def verify(path: Path, expected: str | None) -> None:
    """Refuse a file whose SHA-256 differs from ``expected`` (or from CHECKSUMS.txt for its name).

    A malformed ``expected`` is refused before the file is read (hashing a released file takes seconds).
    """
    if expected:
        try:
            expected = sha256_digest(expected)
        except argparse.ArgumentTypeError as e:
            raise CheckpointError(f"{path}: {e}") from None
    expected = expected or known_hashes().get(path.name)
    if not expected:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise CheckpointError(f"{path}: SHA-256 mismatch: expected {expected.lower()}, got {actual}; "
                              f"the file is corrupted or not the released one")


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict:
    """Load a checkpoint safely on the CPU (``weights_only=True``), verifying its hash when known.

    Raises CheckpointError for a missing, truncated, corrupted or non-checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify(path, sha256)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            KeyError) as e:  # KeyError: the safe unpickler on bytes that are no pickle (a text file)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:  # a whole file holding an object outside the allow-list: not a corruption
            raise CheckpointError(f"{path}: holds a Python object of type {refused.group(1)}, which safe loading "
                                  f"(weights_only=True) refuses; expected tensors, plain values and "
                                  f"argparse.Namespace only") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {unreadable_reason(path)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def unreadable_reason(path: Path) -> str:
    """Why ``torch.load`` could not read ``path``, told from its first bytes (torch's own messages run to
    several sentences about ``weights_only``, or are a bare number for a text file)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(256)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):  # the zip archive torch.save writes
        return (f"the zip archive torch.save writes is truncated or corrupted ({size:,} bytes); copy or "
                f"download the file again")
    if head.startswith(b"\x80"):  # a bare pickle: torch.save's legacy format
        return f"the legacy (pickle) torch file is truncated or corrupted ({size:,} bytes)"
    text = head.decode("utf-8", errors="ignore")  # a character cut at byte 256 is dropped, not an error
    if len(text) < len(head) // 2 or not all(c.isprintable() or c.isspace() for c in text):
        return f"not a file written by torch.save ({size:,} bytes starting {head[:16]!r})"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file, not one written by torch.save ({size:,} bytes starting {first!r})"


def model_state(ckpt: dict, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (``model`` key, or a bare state dict)."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no model state dict found (keys: {sorted(ckpt)[:8]})")
    return sd


class _Field(Generic[T]):
    """A field of ``StoredArgs`` read as ``kind``: ``args.seed`` is the stored ``seed`` as an int, None when it
    is missing or cannot be one (a bool never reads as a number)."""

    def __init__(self, kind: Callable[[object], T]) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: StoredArgs | None, owner: type | None = None) -> T | None:
        if obj is None:
            return self  # type: ignore[return-value]
        return obj._typed(self.name, self.kind)


@dataclass(frozen=True)
class StoredArgs:
    """The settings a checkpoint records under ``args``, read back with their types.

    Our checkpoints hold the run's settled configuration as a plain dict, the released ones an
    ``argparse.Namespace`` (with the reference code's names); a missing or ill-typed field reads as None.
    """

    values: Mapping[str, object] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str, default=None):
        return self.values.get(name, default)

    def pick(self, names: Iterable[str]) -> dict:
        """The recorded ones of ``names``, as stored."""
        return {k: self.values[k] for k in names if k in self.values}

    def as_dict(self) -> dict:
        return dict(self.values)

    def _typed(self, name: str, kind: type):
        value = self.values.get(name)
        if value is None or isinstance(value, bool) and kind is not bool:
            return None
        try:
            return kind(value)
        except (TypeError, ValueError):
            return None

    model = _Field(str)
    input_size = _Field(int)
    in_chans = _Field(int)
    seed = _Field(int)
    val_fraction = _Field(float)
    train_fraction = _Field(float)
    pretrain_epoch = _Field(int)

    @property
    def channels(self) -> tuple[str, ...] | None:
        """The input channels in order (``VH VV``); None when not recorded as a list of names."""
        value = self.values.get("channels")
        ok = isinstance(value, list | tuple) and all(isinstance(c, str) for c in value)
        return tuple(value) if ok else None

    @property
    def finetune(self) -> str | None:
        """The pretraining checkpoint a finetuning run started from (None: random init or not recorded)."""
        return self._typed("finetune", str) or None


def checkpoint_args(ckpt: Mapping) -> StoredArgs:
    """The ``args`` of a loaded checkpoint, ours (a dict) or released (an ``argparse.Namespace``); empty
    when it records none."""
    args = ckpt.get("args")
    if args is None:
        return StoredArgs()
    if isinstance(args, argparse.Namespace):
        return StoredArgs(dict(vars(args)))
    if isinstance(args, Mapping):
        return StoredArgs(dict(args))
    raise CheckpointError(f"checkpoint 'args' is a {type(args).__name__}; expected a dict or an argparse.Namespace")


def check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise CheckpointError naming the first key whose shape does not fit the model."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{path}: shape of {k!r} is {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model; wrong --model or --input_size?")


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise CheckpointError naming the missing and unexpected keys when ``state`` is not ``model``'s."""
    own = model.state_dict().keys()
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not match the model: {len(missing)} missing keys "
                              f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}; "
                              f"a finetune or other-model checkpoint?")
