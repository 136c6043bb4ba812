"""Dataclass configs that are at once TOML files and command-line flags.

A field `foo_bar` is the TOML key `foo_bar` and the flag `--foo-bar`; its help text is the
`help` entry of the field's metadata. Precedence: defaults < `--config FILE` (and the files it
`extends`) < flags given.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are left as None so only flags the user typed override the file."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with any of the options below (flags given here override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        elem, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"default": None, "dest": f.name,
                                  "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if elem is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        else:
            kwargs.update(type=elem)
        if is_list:
            kwargs["nargs"] = "*"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_toml(cls, args.config))
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)


def read_toml(cls: type, path: Path) -> dict[str, Any]:
    path = config_file(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"extends"})
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    # `extends = "other.toml"` (relative to this file): a family of configs differing in a few keys
    return {**read_toml(cls, Path(path).parent / parent), **data}


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
