"""The run's logs: logging on rank 0, strict JSON lines flushed per record, and their truncation on resume."""
from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from util.files import write_text_atomic


def setup_logging(is_main: bool) -> None:
    """Info-level logging on rank 0, warnings only elsewhere."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def json_safe(value):
    """``value`` with every non-finite float (and in nested dicts and lists) as None: strict JSON, which
    ``json.dumps`` would otherwise break with ``NaN``/``Infinity`` tokens (jq and most parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonLines:
    """Append-only JSON-lines file of strict JSON (non-finite numbers as null), flushed per record (a killed
    run keeps every finished line)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def truncate_lines(path: Path, keep: Callable[[object], bool], parse: Callable[[str], object] = str) -> None:
    """Rewrite a text log keeping the lines for which ``keep(parse(line))`` holds (used on resume).

    A line that does not parse (one cut by a kill) is dropped.
    """
    if not path.exists():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if keep(parse(line)):
                lines.append(line)
        except (ValueError, IndexError):  # json.JSONDecodeError is a ValueError
            continue
    write_text_atomic(path, "".join(x + "\n" for x in lines))


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """``truncate_lines`` of a JSON-lines log, ``keep`` deciding on each record."""
    truncate_lines(path, keep, json.loads)
