"""Write the loss masks of the demo concept: assets/concepts/zorb-masks/NN.mask.png.

Each mask is the coverage of the heart that training/make_demo_concept.py drew into image NN
(same placement, jitter and anti-aliasing): white = subject. They ship beside, not inside, the
concept folder so that the folder trains unchanged; copy them next to the images to train with
`--masked-loss true` (`balora bench photos` does).

    python training/make_demo_masks.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "training"))

from balora_diffusion import paths, world  # noqa: E402
from balora_diffusion.atomic import atomic_path  # noqa: E402
from make_demo_concept import CONTEXTS, _heart  # noqa: E402


def heart_coverage(size: str, position: str, resolution: int, jitter_seed: int) -> np.ndarray:
    cx, cy, radius, angle = world.placement(size, position, jitter_seed)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    reach = radius * world.MAX_EXTENT
    inside = _heart(cx, cy, radius, np.array([[c, -s], [s, c]]))
    return world.rasterize(inside, resolution, (cx - reach, cy - reach, cx + reach, cy + reach))


def main(resolution: int = 128, seed: int = 0) -> int:
    with atomic_path(paths.DEMO_MASKS) as tmp:
        tmp.mkdir()
        for i, (_, size, position) in enumerate(CONTEXTS):
            coverage = heart_coverage(size, position, resolution, seed * 1000 + i)
            Image.fromarray(np.round(coverage * 255).astype(np.uint8), "L").save(tmp / f"{i:02d}.mask.png",
                                                                                 optimize=True)
    print(f"wrote {len(CONTEXTS)} masks to {paths.DEMO_MASKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
