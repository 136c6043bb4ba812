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


def write_page(page: Path, figure: Path, render) -> None:
    """A benchmark's results page at `page` (e.g. in docs/results) with its figure copied beside it
    under the page's name: `render(name)` is the page's text linking the figure by that name."""
    target = page.with_suffix(".png")
    with atomic_path(target) as tmp:
        tmp.write_bytes(figure.read_bytes())
    with atomic_path(page) as tmp:
        tmp.write_text(render(target.name), encoding="utf-8")
