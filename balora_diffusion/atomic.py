"""Write files so that a reader never sees half of one: write a temporary sibling, then rename."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# ".NAME.tmpPID": what `temp_sibling` names, so what a killed write leaves behind
_TEMP_NAME = re.compile(r"\..+\.tmp\d+")


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, that `remove_leftovers` knows."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    Works for files and for folders (a folder is swapped in whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        _follow_umask(tmp)
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _follow_umask(tmp: Path) -> None:
    """Give what was written the permissions of a plain new file: some writers (safetensors) write
    through a private temporary file of their own, mode 0600."""
    # The umask is read by setting it: the strictest one for that instant, so that a file another
    # thread creates meanwhile is never more open than asked.
    umask = os.umask(0o077)
    os.umask(umask)
    for written in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        os.chmod(written, (0o777 if written.is_dir() else 0o666) & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_leftover(path: Path) -> bool:
    """Whether `path` is named as a killed atomic write leaves it (`temp_sibling`)."""
    return bool(_TEMP_NAME.fullmatch(path.name))


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete what killed atomic writes left in `folder` and return it. Only for a caller that knows
    no other process is writing there (a training that holds its run folder's lock)."""
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if _TEMP_NAME.fullmatch(p.name))
    for path in found:
        _remove(path)
    return found


def json_safe(value: Any) -> Any:
    """Non-finite floats become None: strict JSON has no inf / nan (a fresh LoRA pair's condition
    number is inf), and other tools refuse Python's `Infinity`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Strict JSON (non-finite numbers as null), written atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=1, default=str, allow_nan=False) + "\n")
    return Path(path)
