"""Generate the shipped demo concept, assets/concepts/zorb/: a two-tone heart the world never shows.

A "<zorb>" is a heart, left half pink and right half cyan: a silhouette and a colour pair that
balora_diffusion.world does not contain, bold enough to survive the tiny model's 64 px VAE.
The images are 128 x 128 (so the trainer's resize path runs), on world backgrounds, at varied
sizes and positions, with world-style captions in same-name .txt files, plus concept.toml.

    python training/make_demo_concept.py              # rewrites assets/concepts/zorb
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Outline
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from balora_diffusion import paths, world  # noqa: E402
from balora_diffusion.atomic import atomic_path  # noqa: E402

TOKEN = "<zorb>"
COLOURS = {"pink": (255, 105, 190), "cyan": (0, 200, 210)}  # left half, right half
# (background, size, position) of the training images: every background, both sizes, all positions.
CONTEXTS = (("white", "large", "center"), ("black", "small", "left"), ("gray", "large", "right"),
            ("blue", "small", "top"), ("green", "large", "bottom"), ("gray", "small", "center"))
# New contexts: each pairs a size / position / background differently from the training images.
EVAL_PROMPTS = (f"a large {TOKEN} on a blue background", f"a small {TOKEN} on a white background",
                f"a large {TOKEN} on the left on a black background", f"a small {TOKEN} at the bottom on a green background",
                f"a large {TOKEN} at the top on a gray background", f"a {TOKEN} on a blue background")


def heart_outline(n: int = 256) -> np.ndarray:
    """The classic parametric heart, centred on its bounding box, farthest point at world.MAX_EXTENT."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    points = np.stack([x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2], axis=1)
    return points * (world.MAX_EXTENT / np.linalg.norm(points, axis=1).max())


def caption(size: str, position: str, background: str) -> str:
    """World-style caption with the placeholder token where the shape and colour words would be."""
    return world.Scene("circle", "red", background, size, position).caption().replace("red circle", TOKEN)


def render_zorb(background: str, size: str, position: str, resolution: int = 128,
                jitter_seed: int | None = None) -> Image.Image:
    """A <zorb> placed like a world shape of that size and position (same jitter ranges)."""
    cx, cy, radius, angle = world.placement(size, position, jitter_seed)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rotation = np.array([[c, -s], [s, c]])
    heart = Outline(np.array([cx, cy]) + radius * heart_outline() @ rotation.T)

    def half(right: bool):
        # inside the heart and on one side of its (rotated) vertical axis: the halves never overlap
        def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            hit = heart.contains_points(np.stack([x.ravel(), y.ravel()], axis=1)).reshape(x.shape)
            return hit & (((x - cx) * c + (y - cy) * s >= 0) == right)
        return inside

    reach = radius * world.MAX_EXTENT
    bounds = (cx - reach, cy - reach, cx + reach, cy + reach)
    layers = [(world.rasterize(half(right), resolution, bounds), rgb) for right, rgb in zip((False, True), COLOURS.values())]
    return world.paint(world.BACKGROUNDS[background], layers)


def concept_toml() -> str:
    lines = [f"token = {json.dumps(TOKEN)}", 'initializer = "heart"', 'class_word = "heart"',
             'caption_template = "a {token}"', "eval_prompts = ["]
    lines += [f"    {json.dumps(p)}," for p in EVAL_PROMPTS] + ["]", "", "[colours]"]
    lines += [f"{name} = [{', '.join(map(str, rgb))}]" for name, rgb in COLOURS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=paths.DEMO_CONCEPT,
                        help="concept folder to (re)write as a whole (default: assets/concepts/zorb)")
    parser.add_argument("--resolution", type=int, default=128, help="side of the square images in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image position/size/rotation jitter")
    args = parser.parse_args(argv)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for i, (background, size, position) in enumerate(CONTEXTS):
            render_zorb(background, size, position, args.resolution, jitter_seed=args.seed * 1000 + i).save(
                tmp / f"{i:02d}.png", optimize=True)
            (tmp / f"{i:02d}.txt").write_text(caption(size, position, background) + "\n", encoding="utf-8")
        (tmp / "concept.toml").write_text(concept_toml(), encoding="utf-8")
    print(f"wrote {len(CONTEXTS)} images of {TOKEN} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
