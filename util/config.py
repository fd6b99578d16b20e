"""Configuration: shared parent parsers, YAML config files, precedence, resolved-config output.

Precedence: parser defaults < ``--config file.yaml`` < explicit command-line flags. A YAML key, a flag and
an attribute are the same snake_case string; an unknown key or an ill-typed value is a ConfigError that
names the nearest valid key.
"""
from __future__ import annotations

import argparse
import difflib
import faulthandler
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import yaml

from sarwmix.errors import ConfigError, SarwmixError
from util.distributed import cleanup_distributed, end_process, is_main_process
from util.files import write_text_atomic
from util.preemption import EXIT_PREEMPTED, Preempted


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def int_list(v: str | Sequence[int]) -> list[int]:
    if isinstance(v, str):
        return [int(x) for x in v.replace(",", " ").split()]
    return [int(x) for x in v]


def nearest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return close[0] if close else "?"


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _convert(conv: Callable, x):
    """Convert one YAML/override value with a flag's type, refusing silent casts (True -> 1, 1.5 -> 1)."""
    if conv is int:
        if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
            raise ValueError(f"{x!r} is not an integer")
        return int(x)
    if conv is float:
        if isinstance(x, bool):
            raise ValueError(f"{x!r} is not a number")
        return float(x)
    if conv is str:
        if not isinstance(x, (str, int, float)) or isinstance(x, bool):
            raise ValueError(f"{x!r} is not a string")
        return str(x)
    return conv(x)


def coerce(parser: argparse.ArgumentParser, key: str, value, source: str):
    """Check a config value against its flag (type, choices, nargs) and convert it."""
    actions = _actions(parser)
    if key not in actions:
        raise ConfigError(f"{source}: unknown key {key!r}; did you mean {nearest(key, list(actions))!r}?")
    act = actions[key]
    if value is None:
        return None
    store_bool = isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                argparse.BooleanOptionalAction))
    conv = str2bool if store_bool else (act.type or str)
    try:
        if act.nargs in ("+", "*"):
            value = [_convert(conv, x) for x in (value if isinstance(value, (list, tuple)) else [value])]
        else:
            value = _convert(conv, value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: bad value for {key!r}: {e}") from None
    if act.choices is not None and value not in act.choices:
        raise ConfigError(f"{source}: {key}={value!r} is not one of {list(act.choices)}")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      extra: Callable[[argparse.ArgumentParser, argparse.Namespace], dict] | None = None
                      ) -> argparse.Namespace:
    """Parse ``argv`` honouring defaults < --config YAML (< ``extra`` overrides) < explicit flags.

    ``extra(parser, first_pass_args)`` may return more key/values (e.g. from ``--override``) that rank
    above the YAML file but below explicit flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    values: dict = {}
    if getattr(first, "config", None):
        values.update({k: coerce(parser, k, v, str(first.config)) for k, v in load_yaml(first.config).items()})
    if extra is not None:
        values.update(extra(parser, first))
    if not values:
        return first
    explicit = _explicit_dests(parser, argv)
    for k, v in values.items():
        if k not in explicit:
            setattr(first, k, v)
    return first


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations given explicitly on the command line."""
    opts = {}
    for a in parser._actions:
        for s in a.option_strings:
            opts[s] = a.dest
    found = set()
    for tok in argv:
        name = tok.split("=", 1)[0]
        if name in opts:
            found.add(opts[name])
    return found


def write_config(args: argparse.Namespace | Mapping, path: Path, omit: Collection[str] = ()) -> None:
    """Write the resolved configuration as YAML (plain types only), without the keys in ``omit`` (flags
    that do not apply to this run, e.g. the other pretraining mode's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in plain_dict(args).items() if k not in omit}
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=True))


def plain_dict(args: argparse.Namespace | Mapping) -> dict:
    """Namespace or mapping -> dict of plain Python values (safe for YAML and ``weights_only`` checkpoints)."""
    d = vars(args) if isinstance(args, argparse.Namespace) else args
    out = {}
    for k, v in d.items():
        if isinstance(v, (tuple, list)):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        elif not isinstance(v, (int, float, str, bool, type(None), dict)):
            v = str(v)
        out[k] = v
    return out


class RunConfig(Mapping):
    """The settled configuration of a run: read-only, read by attribute like the Namespace it was built from.

    Built once (``RunConfig.freeze``) after every value is settled (derived lr and batch, a hold-out adopted
    from an evaluated checkpoint); ``config.yaml`` and the ``args`` of every checkpoint are ``as_dict()``.
    Lists are held as tuples, so no value can be changed in place either.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object]) -> None:
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in plain_dict(values).items()}
        object.__setattr__(self, "_values", MappingProxyType(frozen))

    @classmethod
    def freeze(cls, args: argparse.Namespace | Mapping) -> RunConfig:
        return cls(vars(args) if isinstance(args, argparse.Namespace) else args)

    def __getattr__(self, name: str):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the run configuration has no {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the run configuration is settled: {name!r} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the run configuration is settled: {name!r} cannot be deleted")

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunConfig({dict(self._values)!r})"

    def as_dict(self) -> dict:
        """Plain values (lists, not tuples): what ``config.yaml`` and checkpoints store."""
        return plain_dict(self._values)

    def replace(self, **values) -> RunConfig:
        """A copy with ``values`` set: known keys keep their place, new ones come last."""
        return RunConfig({**self._values, **values})


def run_cli(main: Callable[[argparse.Namespace], object], parse: Callable[[], argparse.Namespace]) -> None:
    """Parse and run; a user error (SarwmixError) ends with one line on stderr and exit code 2; a run stopped
    by a preemption signal after its checkpoint ends with one line and ``EXIT_PREEMPTED`` (75).

    A process killed by a fatal signal (an abort or a segmentation fault inside a C++ library: a
    communication backend, a reader) first writes the Python stacks of its threads to stderr, the job log,
    so the log says what each rank was doing when it died. A rank of a process group ends through
    ``util.distributed.end_process``, without the interpreter's finalisation.
    """
    if not faulthandler.is_enabled():  # a caller's own handler (pytest's, PYTHONFAULTHANDLER) stays
        faulthandler.enable(all_threads=True)
    try:
        main(parse())
    except SarwmixError as e:
        print(f"error: {e}", file=sys.stderr)
        end_process(2)
    except Preempted as e:
        if is_main_process():  # every rank stops alike: one line for the job
            print(f"preempted: {e}; checkpoint.pth holds the position: run again with --resume auto to "
                  f"continue (exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        cleanup_distributed()
        end_process(EXIT_PREEMPTED)
    else:
        end_process()  # a rank of a finished run ends here (see end_process); one process returns
