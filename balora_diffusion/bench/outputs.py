"""Benchmark result files, written atomically (balora_diffusion.atomic): strict JSON and small PNGs."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable

from balora_diffusion.atomic import atomic_path, write_json_atomic


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary sibling of `path`, then rename it into place; returns `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def json_safe(value: Any) -> Any:
    """Non-finite floats become None (strict JSON has no inf / nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    write_json_atomic(path, json_safe(data))
    return Path(path)


def save_figure(path: Path, fig) -> Path:
    """Save a matplotlib figure as a 256-colour PNG: a third of the size of the RGBA one, for plots alike."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    return _atomic(path, lambda tmp: small.save(tmp, format="PNG", optimize=True))
