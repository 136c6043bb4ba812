"""What benchmarks write: their figures, atomically (balora_diffusion.atomic) as small PNGs, and the
claim on their --out (balora_diffusion.outputs)."""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from balora_diffusion.atomic import atomic_path
from balora_diffusion.outputs import claim


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


def claim_out(args, names: Iterable[str]) -> None:
    """Refuse the files a benchmark writes in --out (none without --out) where one exists, unless
    --overwrite true, or where it cannot be written: before the benchmark spends its minutes."""
    if args.out is not None:
        claim([Path(args.out) / name for name in names], args.overwrite)
