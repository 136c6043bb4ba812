"""The one rule every command follows for what it writes.

An output that exists, or a file the command would write beside it, is refused unless the user
said `--overwrite true`; and where the output cannot be written is found out before the work
(drawing, merging, training), not after it. The writing itself goes through `atomic.atomic_path`.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

from balora_diffusion.config import parse_bool
from balora_diffusion.errors import UserError

OVERWRITE_HINT = "add --overwrite true to replace it"


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--overwrite true|false`, as `train` and `generate` spell it (a bare `--overwrite` means true)."""
    parser.add_argument("--overwrite", type=_bool_word, nargs="?", const=True, default=False, metavar="BOOL",
                        help=f"replace {what} (default false: an existing output is refused)")


def _bool_word(text: str) -> bool:
    try:
        return parse_bool(text)
    except (ValueError, UserError):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def claim(outputs: Iterable[str | Path], overwrite: bool, *, flag: str = "--out") -> None:
    """Refuse `outputs` (a command's target and the files it writes beside it) where one exists and
    `overwrite` is false, or where one could not be created or replaced."""
    outputs = [Path(p).expanduser() for p in outputs]
    for path in outputs:
        if path.is_symlink() or path.exists():
            if not overwrite:
                which = f"{flag} {path}" if path == outputs[0] else f"{flag} {outputs[0]}: {path}"
                raise UserError(f"{which} already exists; {OVERWRITE_HINT}")
        check_writable(path, flag=flag)


def check_record_folder(out: Path, record: str, overwrite: bool) -> None:
    """Refuse an --out folder that holds files other than an earlier output of this command (known by
    its `record` file), or that output unless `overwrite`; and one that cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / record).is_file():
            raise UserError(f"--out {out} holds other files; give an empty or new folder")
        if not overwrite:
            raise UserError(f"--out {out} holds an earlier {Path(record).stem}; {OVERWRITE_HINT}")
    check_writable(out)


def check_writable(path: str | Path, *, flag: str = "--out") -> None:
    """Refuse `path` unless it can be created (or replaced by a rename) in its folder: its nearest
    existing ancestor must be a folder this process can write in."""
    path = Path(path).expanduser()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link where a folder would be made
            raise UserError(f"{flag} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    # trying beats os.access: root passes every permission check, yet a read-only or special
    # file system still refuses the write
    probe = parent / f".{path.name}.probe{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc})") from None
