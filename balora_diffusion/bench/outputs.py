"""Benchmark figures, written atomically (balora_diffusion.atomic) as small PNGs."""
from __future__ import annotations

import io
from pathlib import Path

from balora_diffusion.atomic import atomic_path


def save_figure(path: Path, fig) -> Path:
    """Save a matplotlib figure as a 256-colour PNG: a third of the size of the RGBA one, for plots alike."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return Path(path)
