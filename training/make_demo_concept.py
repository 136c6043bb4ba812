"""Generate the shipped concepts, assets/concepts/zorb/, quax/ and zorb-edge/: two-tone shapes the world never shows.

A "<zorb>" is a heart, left half pink and right half cyan; a "<quax>" is a thick ring, top half lime
and bottom half brown: silhouettes and colour pairs that balora_diffusion.world does not contain, bold
enough to survive the tiny model's 64 px VAE. Two, so that several concepts can be fused into one
adapter (`balora fuse`). The images are 128 x 128 (so the trainer's resize path runs), on world
backgrounds, at varied sizes and positions, with world-style captions in same-name .txt files, plus
concept.toml. zorb-edge is the <zorb> in 192 x 128 and 128 x 192 photos with the heart near an edge.

    python training/make_demo_concept.py                   # rewrites assets/concepts/zorb
    python training/make_demo_concept.py --concept quax    # rewrites assets/concepts/quax
    python training/make_demo_concept.py --concept zorb-edge  # the <zorb> in wide and tall photos
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
RING_TOKEN = "<quax>"
RING_COLOURS = {"lime": (120, 250, 60), "brown": (120, 70, 20)}  # top half, bottom half
RING_INNER = 0.5  # inner radius as a share of the outer: thick enough to stay a ring at 64 px
# (background, size, position) of the training images: every background, both sizes, all positions.
CONTEXTS = (("white", "large", "center"), ("black", "small", "left"), ("gray", "large", "right"),
            ("blue", "small", "top"), ("green", "large", "bottom"), ("gray", "small", "center"))
# New contexts: each pairs a size / position / background differently from the training images.
EVAL_CONTEXTS = ("a large {} on a blue background", "a small {} on a white background",
                 "a large {} on the left on a black background", "a small {} at the bottom on a green background",
                 "a large {} at the top on a gray background", "a {} on a blue background")
# The <zorb> as photos of other aspects: (frame, background, size, position), the heart near an edge of
# a wide or tall image, for training with and without aspect-ratio buckets (balora bench photos).
EDGE = "zorb-edge"
EDGE_SIDES = (192, 128)  # long side, short side
EDGE_RADIUS = {"small": 0.1, "large": 0.15}  # world.placement's radius, as a share of the long side
EDGE_MARGIN = 0.04
EDGE_CONTEXTS = (("wide", "white", "large", "left"), ("tall", "black", "small", "top"),
                 ("wide", "gray", "small", "right"), ("tall", "blue", "large", "bottom"),
                 ("wide", "green", "small", "left"), ("tall", "gray", "large", "top"))
# Each names a position: a concept learned from centre crops has seen only part of the heart there.
EDGE_EVAL_CONTEXTS = ("a large {} on the left on a gray background", "a small {} on the right on a black background",
                      "a large {} at the top on a white background", "a small {} at the bottom on a blue background",
                      "a {} on the right on a green background", "a {} at the top on a black background")


def heart_outline(n: int = 256) -> np.ndarray:
    """The classic parametric heart, centred on its bounding box, farthest point at world.MAX_EXTENT."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    points = np.stack([x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2], axis=1)
    return points * (world.MAX_EXTENT / np.linalg.norm(points, axis=1).max())


def caption(size: str, position: str, background: str, token: str = TOKEN) -> str:
    """World-style caption with the placeholder token where the shape and colour words would be."""
    return world.Scene("circle", "red", background, size, position).caption().replace("red circle", token)


def _two_tone(silhouette, colours, across: bool, background: str, placement: tuple[float, float, float, float],
              resolution: int) -> Image.Image:
    """A shape at `placement` (world.placement's centre, radius and rotation), split along its rotated
    vertical axis (left, right) or, `across`, its horizontal one (top, bottom) into two colours.
    silhouette(cx, cy, radius, rotation) gives the point-in-shape test of the whole shape."""
    cx, cy, radius, angle = placement
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    whole = silhouette(cx, cy, radius, np.array([[c, -s], [s, c]]))

    def half(second: bool):
        # inside the shape and on one side of its axis: the halves never overlap
        def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            side = (y - cy) * c - (x - cx) * s if across else (x - cx) * c + (y - cy) * s
            return whole(x, y) & ((side >= 0) == second)
        return inside

    reach = radius * world.MAX_EXTENT
    bounds = (cx - reach, cy - reach, cx + reach, cy + reach)
    layers = [(world.rasterize(half(second), resolution, bounds), rgb) for second, rgb in zip((False, True), colours)]
    return world.paint(world.BACKGROUNDS[background], layers)


def _heart(cx: float, cy: float, radius: float, rotation: np.ndarray):
    heart = Outline(np.array([cx, cy]) + radius * heart_outline() @ rotation.T)
    return lambda x, y: heart.contains_points(np.stack([x.ravel(), y.ravel()], axis=1)).reshape(x.shape)


def _ring(cx: float, cy: float, radius: float, rotation: np.ndarray):
    outer = radius * world.MAX_EXTENT
    return lambda x, y: (np.hypot(x - cx, y - cy) <= outer) & (np.hypot(x - cx, y - cy) >= RING_INNER * outer)


def render_zorb(background: str, size: str, position: str, resolution: int = 128,
                jitter_seed: int | None = None) -> Image.Image:
    """A <zorb>: a heart, left half and right half in COLOURS."""
    return _two_tone(_heart, COLOURS.values(), False, background, world.placement(size, position, jitter_seed),
                     resolution)


def render_quax(background: str, size: str, position: str, resolution: int = 128,
                jitter_seed: int | None = None) -> Image.Image:
    """A <quax>: a thick ring, top half and bottom half in RING_COLOURS."""
    return _two_tone(_ring, RING_COLOURS.values(), True, background, world.placement(size, position, jitter_seed),
                     resolution)


def render_zorb_at_edge(frame: str, background: str, size: str, position: str, jitter_seed: int) -> Image.Image:
    """A <zorb> photo wider or taller than square (`frame` "wide" or "tall", EDGE_SIDES) with the heart
    near the edge `position` names: the part a centred square crop cuts off. A square of the long
    side is drawn and cut to the frame, so the heart keeps the world's anti-aliasing."""
    long, short = EDGE_SIDES
    rng = np.random.default_rng(jitter_seed)
    radius, angle, along = EDGE_RADIUS[size], rng.uniform(-10.0, 10.0), rng.uniform(-0.05, 0.05)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[position]
    # as far out as the heart's farthest point allows, clear of the border ring the scores read
    reach = 0.5 - EDGE_MARGIN - radius * world.MAX_EXTENT
    cx, cy = 0.5 + dx * reach + (dy != 0) * along, 0.5 + dy * reach + (dx != 0) * along
    square = _two_tone(_heart, COLOURS.values(), False, background, (cx, cy, radius, angle), long)
    cut = (long - short) // 2
    return square.crop((0, cut, long, long - cut) if frame == "wide" else (cut, 0, long - cut, long))


# name -> (token, initializer and class word, colours, renderer)
CONCEPTS = {"zorb": (TOKEN, "heart", COLOURS, render_zorb), "quax": (RING_TOKEN, "ring", RING_COLOURS, render_quax),
            EDGE: (TOKEN, "heart", COLOURS, render_zorb_at_edge)}


def images(name: str, resolution: int, seed: int) -> list[tuple[Image.Image, str]]:
    """(image, caption) of each training image of concept `name`."""
    token, _, _, render = CONCEPTS[name]
    if name == EDGE:
        return [(render(frame, background, size, position, seed * 1000 + i), caption(size, position, background, token))
                for i, (frame, background, size, position) in enumerate(EDGE_CONTEXTS)]
    return [(render(background, size, position, resolution, jitter_seed=seed * 1000 + i),
             caption(size, position, background, token)) for i, (background, size, position) in enumerate(CONTEXTS)]


def concept_toml(name: str = "zorb") -> str:
    token, word, colours, _ = CONCEPTS[name]
    lines = [f"token = {json.dumps(token)}", f"initializer = {json.dumps(word)}", f"class_word = {json.dumps(word)}",
             'caption_template = "a {token}"', "eval_prompts = ["]
    contexts = EDGE_EVAL_CONTEXTS if name == EDGE else EVAL_CONTEXTS
    lines += [f"    {json.dumps(context.format(token))}," for context in contexts]
    lines += ["]", "", "[colours]"]
    lines += [f"{colour} = [{', '.join(map(str, rgb))}]" for colour, rgb in colours.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", choices=sorted(CONCEPTS), default="zorb", help="which concept (default: zorb)")
    parser.add_argument("--out", type=Path, default=None,
                        help="concept folder to (re)write as a whole (default: assets/concepts/<concept>)")
    parser.add_argument("--resolution", type=int, default=128,
                        help=f"side of the square images in pixels (default: 128; {EDGE}'s are "
                             f"{EDGE_SIDES[0]}x{EDGE_SIDES[1]})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image position/size/rotation jitter")
    args = parser.parse_args(argv)
    out = args.out or paths.CONCEPTS / args.concept
    drawn = images(args.concept, args.resolution, args.seed)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for i, (image, text) in enumerate(drawn):
            image.save(tmp / f"{i:02d}.png", optimize=True)
            (tmp / f"{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
        (tmp / "concept.toml").write_text(concept_toml(args.concept), encoding="utf-8")
    print(f"wrote {len(drawn)} images of {CONCEPTS[args.concept][0]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
