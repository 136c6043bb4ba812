"""Write files so that a reader never sees half of one: write a temporary sibling, then rename."""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    Works for files and for folders (a folder is swapped in whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


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
