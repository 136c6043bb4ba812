"""Dataclass configs that are at once TOML files and command-line flags.

A field `foo_bar` is the TOML key `foo_bar` and the flag `--foo-bar`; its help text is the
`help` entry of the field's metadata. Precedence: defaults < `--config FILE` (and the files it
`extends`) < flags given.

The rest of a field's metadata says which values it takes. A config class whose __post_init__
calls `check_config` is checked whichever way it is built (TOML, flags, Python), before anything
heavy runs, and every problem is a one-line UserError naming the option:

    choices=[...]           the value (each element of a list) is one of these
    ge=, gt=, le=, lt=      bounds of a number (of each element of a list); floats must be finite
    nonempty=True           a string or list that may not be empty
    check=f                 f(value) -> None, or the problem as text; runs after every cheaper
                            check, as it may import something slow
    path=True               in a TOML file, relative to that file's folder (flags: to the current
                            folder); the words in `not_paths=[...]` are kept as they are

Types: an int is fine for a float, a bool is no number, and a single value for a list is a
one-element list (`token = "<zorb>"`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from balora_diffusion.errors import UserError
from balora_diffusion.paths import config_file

C = TypeVar("C")


def field(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 (mirrors argparse's name)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as `float`, `list[str]` or `float | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return args[0], True
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _base_type(args[0])
    return tp, False


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PARSERS = {bool: parse_bool, int: int, float: float}
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return _toml_value(value) if isinstance(value, bool) else repr(value)


def _expected(label: str, kind: type, given: str) -> UserError:
    return UserError(f"{label}: expected {_KINDS.get(kind, kind.__name__)}, got {given}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(label: str, meta: dict, kind: type, value: Any) -> Any:
    # bool is a subclass of int, but `steps = true` is a mistake, not 1
    if isinstance(value, bool) or kind is bool:
        fits = isinstance(value, bool) and kind is bool
    else:
        fits = isinstance(value, (int, float) if kind is float else kind)
    if not fits:
        raise _expected(label, kind, _describe(value))
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{label} must be a finite number, got {value}")
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{label} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    for key, (holds, sign) in _BOUNDS.items():
        if key in meta and not holds(value, meta[key]):
            raise UserError(f"{label} must be {sign} {meta[key]}, got {value}")
    return value


def _checked(label: str, meta: dict, annotation: Any, value: Any) -> Any:
    """`value` of one option in its normal form, or a UserError; not yet its `check`."""
    kind, is_list = _base_type(annotation)
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        value = [_scalar(label, meta, kind, item) for item in items]
    else:
        value = _scalar(label, meta, kind, value)
    if meta.get("nonempty") and not value:
        raise UserError(f"{label} must not be empty")
    return value


def _run_check(label: str, meta: dict, value: Any) -> None:
    problem = meta["check"](value) if "check" in meta else None
    if problem:
        raise UserError(f"{label}: {problem}")


def check_config(config: Any) -> None:
    """Check every option of a config dataclass and store it in its normal form; the first bad one
    is a UserError naming it."""
    hints = typing.get_type_hints(type(config))
    fields = dataclasses.fields(config)
    for f in fields:
        setattr(config, f.name, _checked(f.name, f.metadata, hints[f.name], getattr(config, f.name)))
    for f in fields:
        _run_check(f.name, f.metadata, getattr(config, f.name))


def _parse_text(label: str, kind: type, text: str) -> Any:
    try:
        return _PARSERS.get(kind, kind)(text)
    except ValueError:
        raise _expected(label, kind, repr(text)) from None


def parse_flag(cls: type, name: str, text: str | list[str], label: str | None = None) -> Any:
    """A flag's text (a list of texts for a list option) as a checked value of option `name` of
    `cls`; errors name `label`, by default the option's own flag."""
    label = label or _flag(name)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    annotation = typing.get_type_hints(cls)[name]
    kind, is_list = _base_type(annotation)
    value = [_parse_text(label, kind, t) for t in text] if is_list else _parse_text(label, kind, text)
    value = _checked(label, f.metadata, annotation, value)
    _run_check(label, f.metadata, value)
    return value


class _Extend(argparse.Action):
    """`--x a b` and `--x a --x b` both give [a, b]; `--x` with no value gives the empty list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values] if values else [])


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, file_flag: str = "--config") -> None:
    """One flag per field, read as text and checked by `flag_values`; defaults are left as None so
    only flags the user typed override the file. `file_flag` names the TOML file's own flag (a
    config with a `config` option of its own needs another)."""
    parser.add_argument(file_flag, type=Path, default=None,
                        help="TOML file with any of the options below (flags given here override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rules = [f"{sign} {f.metadata[key]}" for key, (_, sign) in _BOUNDS.items() if key in f.metadata]
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else kind.__name__.upper()
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "metavar": metavar,
                                  "help": f"{f.metadata.get('help', '')} "
                                          f"(default: {default!r}{''.join('; ' + r for r in rules)})"}
        if is_list:
            kwargs.update(nargs="*", action=_Extend)
        parser.add_argument(_flag(f.name), **kwargs)


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of `cls` given as flags in `args` (dest = option name), parsed and checked."""
    return {f.name: parse_flag(cls, f.name, getattr(args, f.name))
            for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def config_from_args(cls: type[C], args: argparse.Namespace, file_flag: str = "--config") -> C:
    values: dict[str, Any] = {}
    file = getattr(args, file_flag.lstrip("-").replace("-", "_"))
    if file is not None:
        values.update(read_toml(cls, file))
    values.update(flag_values(cls, args))
    return cls(**values)


def read_toml(cls: type, path: Path, _extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The options set in a TOML file and the files it `extends`, paths made relative to the
    current folder; not yet checked (the config class does that when it is built)."""
    path = config_file(path)
    if any(path.resolve() == child.resolve() for child in _extended_by):
        chain = " extends ".join(str(p) for p in (*_extended_by, path))
        raise UserError(f"config files extend each other in a cycle: {chain}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise UserError(f"config file {path} is not UTF-8 ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"extends"})
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    parent = data.pop("extends", None)
    data = {name: _from_folder(path.parent, fields[name].metadata, value) for name, value in data.items()}
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a file name, got {_describe(parent)}")
    # `extends = "other.toml"` (relative to this file): a family of configs differing in a few keys
    return {**read_toml(cls, path.parent / parent, (*_extended_by, path)), **data}


def _from_folder(folder: Path, meta: dict, value: Any) -> Any:
    """A path option's value read from a file in `folder`, as a path from the current folder."""
    if meta.get("path") and isinstance(value, str) and value and value not in meta.get("not_paths", ()):
        return str(folder / value)
    return value


def to_toml(config: Any) -> str:
    """Render a config as TOML (flat tables of scalars and lists only, which is all our configs hold)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
