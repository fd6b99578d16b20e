"""Files replaced whole: written beside their name and renamed over it, so a crash or kill never leaves a
partial file (checkpoints, results, configurations, truncated logs)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a partial file; a
    failed write (disk full, unpicklable object) removes the temporary file and re-raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def link_or_copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Give the file ``src`` a second name ``dst``: a hard link where the file system allows, else a copy.

    The link (or copy) is made under a temporary name and renamed over ``dst``, so ``dst`` is always whole.
    Writers replace files (``replace_atomic``), never write into them, so a later write of ``src`` leaves
    ``dst`` with the bytes it had.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links here (FAT, some network and object-store mounts, cross-device)
        with open(src, "rb") as fh:
            return replace_atomic(dst, lambda out: shutil.copyfileobj(fh, out, 1 << 20))
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``replace_atomic`` for UTF-8 text (results.json, config.yaml, a truncated log)."""
    return replace_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


