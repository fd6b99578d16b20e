"""The command-line parser of every entry point: one-line errors, the closest flags, checked counts.

``ArgumentParser`` is argparse's, with two differences a user sees: a bad command line ends with one line
on stderr and exit status 2 instead of the usage text (``--help`` still prints it), and an unknown flag names
the closest flags of that command (``unrecognized argument --epoch; did you mean --epochs?``). ``count``
is the ``type=`` of every flag that counts something (samples, epochs, workers): a value below its minimum
is refused while the command line or a config file is parsed, before any data or model is built.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn

# "argument --flag: MESSAGE" (argparse's form, "argument -h/--help: ..." for aliases) -> "--flag MESSAGE".
_ARGUMENT = re.compile(r"^argument (?:-\w/)?(-[-\w]+): ")
_UNRECOGNIZED = "unrecognized arguments: "


class Count:
    """``type=`` of a count flag: an integer >= ``minimum``, refused otherwise with the flag's value.

    Also converts config-file values: an int, or a float with no fractional part; never a bool.
    """

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum
        self.__name__ = "count"  # argparse names the type in some messages

    def __call__(self, value: object) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise argparse.ArgumentTypeError(f"{value!r}: expected {self.expected()}")
        try:
            number = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{value!r}: expected {self.expected()}") from None
        if number < self.minimum:
            raise argparse.ArgumentTypeError(f"{number}: expected {self.expected()}")
        return number

    def expected(self) -> str:
        return {1: "a positive integer", 0: "a non-negative integer"}.get(self.minimum,
                                                                           f"an integer >= {self.minimum}")


def count(minimum: int = 1) -> Count:
    """The ``type=`` of a flag counting something, at least ``minimum`` (1: samples, epochs; 0: workers, 0 = off)."""
    return Count(minimum)


def closest_flags(token: str, flags: list[str], n: int = 3) -> list[str]:
    """The flags of ``flags`` closest to ``token``, best first: the closest, and up to ``n - 1`` others about as
    close (``--epoch`` -> ``--epochs``, not also ``--stop_epoch``); none when every flag is far off."""
    name = token.split("=", 1)[0]
    scored = sorted(((difflib.SequenceMatcher(None, name, flag).ratio(), flag) for flag in flags),
                    key=lambda item: (-item[0], item[1]))
    if not scored or scored[0][0] < 0.6:
        return []
    return [flag for ratio, flag in scored[:n] if ratio >= scored[0][0] - 0.1]


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def unrecognized_message(extras: str, flags: list[str]) -> str:
    """One line for argparse's ``unrecognized arguments: ...``: each unknown flag with its closest flags."""
    parts = []
    for token in extras.split():
        if not token.startswith("-"):
            continue  # the value of an unknown flag, or a stray word (named below when alone)
        close = closest_flags(token, flags)
        hint = f"; did you mean {_one_of(close)}?" if close else " (--help lists the flags)"
        parts.append(f"unrecognized argument {token.split('=', 1)[0]}{hint}")
    return "; ".join(parts) or f"unexpected argument(s) {extras} (--help lists the flags)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors and the closest flags for an unknown one (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --epoch must not silently mean --epochs
        super().__init__(*args, **kwargs)

    def flags(self) -> list[str]:
        """Every ``--flag`` of this command, those of its sub-commands included."""
        found = []
        for action in self._actions:
            found += [s for s in action.option_strings if s.startswith("--") and s != "--help"]
            if isinstance(action, argparse._SubParsersAction):
                found += [f for sub in action.choices.values() for f in ArgumentParser.flags(sub)]
        return list(dict.fromkeys(found))

    def error(self, message: str) -> NoReturn:
        if message.startswith(_UNRECOGNIZED):
            message = unrecognized_message(message[len(_UNRECOGNIZED):], self.flags())
        else:
            message = _ARGUMENT.sub(r"\1 ", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
