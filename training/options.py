"""Validation of a trainer's options in one place: every bad value is reported in one line, and ``main`` exits
with status 2 (as argparse does for a bad flag), never with a traceback from deep inside the run.

    problems = check_numbers(values, positive=("batch_size", "log_every"), non_negative=("max_steps",))
    if problems: return usage_error("python -m generation.train_ar", problems)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Sequence, Union, get_type_hints


class UsageError(ValueError):
    """A bad option value; the message is one line naming the option, the value and what it must be."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_numbers(values: Mapping[str, Any], *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                  unit_interval: Iterable[str] = ()) -> List[str]:
    """The problems (one string per option) of ``values`` (option name → value; names absent or None are not
    checked): ``positive`` must be > 0, ``non_negative`` ≥ 0, ``unit_interval`` within [0, 1]."""
    problems = []
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (unit_interval, lambda v: 0 <= v <= 1, "between 0 and 1")):
        for name in names:
            value = values.get(name)
            if value is None:
                continue
            if not _is_number(value) or not ok(value):
                problems.append(f"{flag(name)} must be a number {rule}, got {value!r}")
    return problems


def check_field_types(values: Mapping[str, Any], config_class: type) -> List[str]:
    """The problems of values whose type does not fit the dataclass field they set (e.g. ``"lr": "fast"`` in a
    config file, where argparse's type conversion never ran). ints are accepted where floats are expected."""
    hints = get_type_hints(config_class)
    problems = []
    for f in dataclasses.fields(config_class):
        if f.name not in values or values[f.name] is None:
            continue
        value, want = values[f.name], hints.get(f.name)
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif want is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            problems.append(f"{flag(f.name)} must be {want.__name__}, got {value!r}")
    return problems


class RunError(RuntimeError):
    """A run cannot go on, for a reason one line states (a folder in use or holding another run, no usable
    checkpoint, a full disk): every trainer's ``main`` prints it and exits 1. Library code raises this, never
    ``SystemExit``."""


# what a trainer's ``main`` turns into one line and an exit status (:func:`failure_status`); anything else is a bug
# and keeps its traceback
FAILURES = (UsageError, RunError, FloatingPointError, ValueError, FileNotFoundError)


def failure_status(prog: str, error: BaseException) -> int:
    """Print a trainer's failure as one line on stderr and return its exit status: 1 when the run cannot go on
    (:class:`RunError`, non-finite weights: ``FloatingPointError``), 2 for bad input (:class:`UsageError`, with
    the ``--help`` hint; any other ``ValueError`` / ``FileNotFoundError``, e.g. a config, cache or model file
    whose message names the fix).

        try:
            return train(parse_args(argv))
        except FAILURES as error:
            return failure_status(PROG, error)
    """
    if isinstance(error, UsageError):
        return usage_error(prog, error)
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 1 if isinstance(error, (RunError, FloatingPointError)) else 2


def usage_error(prog: str, problems: Union[str, Sequence[str], BaseException]) -> int:
    """Print the problems as one line on stderr and return 2 (the exit status of a usage error)."""
    if isinstance(problems, BaseException):
        problems = str(problems)
    text = problems if isinstance(problems, str) else "; ".join(problems)
    print(f"{prog}: error: {text} (see {prog} --help)", file=sys.stderr, flush=True)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the project's command-line convention: flags are kebab-case (``--batch-size``) and
    the snake_case spelling (``--batch_size``, as in config files) is accepted for each of them; usage errors (an
    unknown flag, a value of the wrong type, a missing argument) are one line naming the fix (``--help`` shows the
    full usage), like every other bad value; exit status 2."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._kebab_case(token) for token in args], namespace)

    def _kebab_case(self, token: str) -> str:
        if not isinstance(token, str) or not token.startswith("--") or "_" not in token.partition("=")[0]:
            return token
        flag, equals, value = token.partition("=")
        kebab = flag.replace("_", "-")
        if flag not in self._option_string_actions and kebab in self._option_string_actions:
            return kebab + equals + value
        return token

    def error(self, message: str):
        usage_error(self.prog, message)
        sys.exit(2)


REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on a GPU, fp32 on a CPU


def resolve_config(name: str, family: str = "") -> Path:
    """A config file from ``--config NAME|PATH``: the path itself, or ``configs/NAME.json`` (relative to the
    working directory or the repository). ``family`` (e.g. "synthesis_") only shapes the error's list."""
    for candidate in (Path(name), REPO / name, REPO / "configs" / name, REPO / "configs" / f"{name}.json"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in (REPO / "configs").glob(f"{family}*.json"))
    raise UsageError(f"--config {name}: no such file or configs/ name (available: {', '.join(available)})")
