"""Dataclass → command line: one typed dataclass is a trainer's settings, its field comments are the ``--help``
text, and values come from the defaults, then a JSON config file (``--config NAME|PATH``), then the command line
(which wins). Unknown keys and values of the wrong type are refused with one line naming the key and the file.

    @dataclass
    class Settings:
        lr: float = 1e-3  # peak learning rate
        betas: Tuple[float, float] = (0.9, 0.95)  # AdamW betas

    parser = ArgumentParser(prog="python -m my.trainer")
    parser.add_argument("--config", default="")
    add_dataclass_flags(parser, Settings)          # --lr, --betas B1 B2, bools as --flag [BOOL]
    ns = parser.parse_args(argv)
    values = {**read_config_file(ns.config, family="my_"), **given(ns)}
    settings = from_dict(Settings, values, source=ns.config or "command line")

Flags are kebab-case with the snake_case spelling (as in config files) accepted (:class:`training.options.ArgumentParser`).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, get_args, get_origin, get_type_hints

from .options import REPO, UsageError, resolve_config


def parse_bool(text: str) -> bool:
    """A command-line boolean: 1/true/yes/on or 0/false/no/off (any case)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def coerce(value: Any, hint: Any, name: str = "", source: str = "config") -> Any:
    """A config value as the field's type; a value of another type is an error naming the key and the file
    ("batch_size": "8" or 8.5), while an integral float for an int and an int for a float are accepted."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"{source}: {name!r} must be {expected}, got {value!r}")
    if get_origin(hint) is tuple:
        item, n = get_args(hint)[0], len(get_args(hint))
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise bad(f"a list of {n} numbers")
        return tuple(coerce(v, item, name, source) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad("a whole number")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise bad("a string")
    return value


def field_comments(config_class: type) -> Dict[str, str]:
    """The ``# ...`` comment after each field of a dataclass's source, reused as its ``--help`` text."""
    out = {}
    for line in inspect.getsource(config_class).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def add_dataclass_flags(parser: argparse.ArgumentParser, config_class: type,
                        aliases: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """One flag per field (default None, so "not given" is told apart from a value): ``--batch-size`` (and
    ``--batch_size``); a bool alone means true (``--deterministic``) and takes a value (``--deterministic false``);
    a tuple field takes its n values; a dict field takes a JSON object. ``aliases``: extra spellings per field name
    (e.g. output_dir: ["--out"])."""
    hints = get_type_hints(config_class)
    comments = field_comments(config_class)
    for f in dataclasses.fields(config_class):
        hint = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs: Dict[str, Any] = {"default": None, "dest": f.name,
                                  "help": f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")}
        if hint is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif get_origin(hint) is tuple:
            kwargs.update(type=get_args(hint)[0], nargs=len(get_args(hint)))
        elif get_origin(hint) is dict or hint is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs.update(type=hint)
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(*names, *(aliases or {}).get(f.name, ()), **kwargs)


def given(namespace: argparse.Namespace, skip: Iterable[str] = ("config",)) -> Dict[str, Any]:
    """The values the command line set (flags left out are None and not included)."""
    return {k: v for k, v in vars(namespace).items() if k not in set(skip) and v is not None}


def from_dict(config_class: type, values: Mapping[str, Any], source: str = "config",
              help_command: str = "--help") -> Any:
    """An instance of ``config_class`` from ``values``; unknown keys are refused naming ``source`` (ValueError)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {unknown}. Valid names: `{help_command}`.")
    hints = get_type_hints(config_class)
    return config_class(**{k: coerce(v, hints[k], k, source) for k, v in values.items()})


def to_dict(settings: Any) -> Dict[str, Any]:
    """A dataclass instance as JSON-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def read_config_file(name: str, family: str = "", path_args: Sequence[str] = (),
                     root: Path = REPO, translate: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The values of ``--config NAME|PATH`` ({} for ''): a JSON object (its ``_comment`` key dropped). Values of
    ``path_args`` given relative to the repository are resolved against ``root`` when they do not exist relative
    to the working directory, so a command runs from any folder. ValueError names the file on bad JSON."""
    if not name:
        return {}
    path = resolve_config(name, family)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of argument names and values")
    config.pop("_comment", None)
    for key in path_args:
        value = config.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists() \
                and (root / value).exists():
            config[key] = str(root / value)
    if translate is not None:
        translate(config)
    return config


def config_file_as_defaults(parser: argparse.ArgumentParser, name: str, family: str = "",
                            select: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """For a trainer whose flags are an argparse parser (no dataclass): ``--config NAME|PATH``'s values become the
    parser's defaults, so the command line still wins. Keys may be spelt snake_case or kebab-case; ``select`` picks
    what applies (e.g. a stage's section). A key that is no flag's is refused naming the file (UsageError).
    Returns the values applied ({} without a config)."""
    if not name:
        return {}
    values = read_config_file(name, family)
    if select is not None:
        values = select(values)
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise UsageError(f"{resolve_config(name, family)}: unknown key(s) {unknown}; valid keys are the flags of "
                         f"--help")
    parser.set_defaults(**values)
    return values
