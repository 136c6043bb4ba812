"""Prompt adherence from pixels: does an image of the concept show the context its prompt asks for?

A concept prompt in the procedural world's words places the concept in a context: a background
colour ("on a gray background"), a size ("small", "large") and a position ("on the left", "at the
top"). The context is read back from the pixels the way `world.classify` reads a scene: the border
gives the background, pixels far from it are the object, whose area gives the size and whose
centroid gives the position. A LoRA that "ignores the rest of the prompt" (the concept drawn as in
its training images whatever the prompt says) scores low here while its concept fidelity
(`concept.fidelity`) stays high: the two together are the measurable form of that failure.

Sizes are calibrated on the concept's own training images (their captions say which are small and
which large), so any silhouette works; positions use the world's placement geometry. Only what a
prompt names is scored: a prompt without a position phrase may show the concept anywhere.
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from balora_diffusion import world

ATTRIBUTES = ("background", "size", "position")
# The world's caption phrases (world.Scene.caption); "center" has none, so it is never named.
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# An object reads as off-centre when its centroid is this far (image fractions) from the middle
# along an axis: half the shortest way an off-centre world shape is placed from the middle (a
# large one), so the centre's jitter stays inside and every off-centre placement outside.
POSITION_OFFSET = 0.5 * min(abs(world.placement(size, "left")[0] - 0.5) for size in world.SIZES)
MIN_OBJECT_PIXELS = 4


@dataclass(frozen=True)
class Context:
    """What a prompt asks of the concept's surroundings; None = the prompt does not say."""
    background: str | None = None
    size: str | None = None
    position: str | None = None

    def prompt(self, token: str) -> str:
        """World-style caption with `token` for the object, e.g. "a small <zorb> at the top on a gray background"."""
        size = f"{self.size} " if self.size else ""
        position = f" {POSITION_PHRASES[self.position]}" if self.position else ""
        background = f" on a {self.background} background" if self.background else ""
        return f"a {size}{token}{position}{background}"

    def named(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def parse_context(prompt: str) -> Context:
    """The context a prompt names in the world's words (anything else in it is ignored)."""
    background = re.search(r"\bon an? (\w+) background\b", prompt)
    size = [s for s in world.SIZES if re.search(rf"\b{s}\b", prompt)]
    position = [p for p, phrase in POSITION_PHRASES.items() if phrase in prompt]
    return Context(background=background.group(1) if background and background.group(1) in world.BACKGROUNDS else None,
                   size=size[0] if len(size) == 1 else None, position=position[0] if len(position) == 1 else None)


@dataclass(frozen=True)
class Calibration:
    """How the concept's silhouette sits in a world placement, from its captioned training images:
    area = object fraction per squared placement radius; shift = centroid minus placement centre,
    in placement radii (a heart's centroid sits above the middle of its outline). area None: no
    caption names a size, so sizes are not scored and positions read the centroid as it is."""
    area: float | None = None
    shift: tuple[float, float] = (0.0, 0.0)


def _radius(size: str) -> float:
    return world.placement(size, "center")[2]


# Between the radii of a small and a large world shape, geometrically: the sizes' dividing line.
SIZE_BOUNDARY = float(np.sqrt(_radius("small") * _radius("large")))


@dataclass(frozen=True)
class Reading:
    """A context read from pixels. object_fraction: object pixels over image pixels (0 without an
    object); centroid: the object's (x, y) in image fractions, None without an object."""
    background: str
    object_fraction: float
    centroid: tuple[float, float] | None

    def radius(self, calibration: Calibration) -> float | None:
        if self.centroid is None or calibration.area is None:
            return None
        return float(np.sqrt(self.object_fraction / calibration.area))

    def size(self, calibration: Calibration) -> str | None:
        radius = self.radius(calibration)
        if radius is None:
            return None
        return "large" if radius >= SIZE_BOUNDARY else "small"

    def position(self, calibration: Calibration) -> str | None:
        if self.centroid is None:
            return None
        radius = self.radius(calibration) or 0.0
        dx, dy = (c - 0.5 - s * radius for c, s in zip(self.centroid, calibration.shift))
        if max(abs(dx), abs(dy)) < POSITION_OFFSET:
            return "center"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def read_context(image: Image.Image | np.ndarray) -> Reading:
    pixels = world.as_pixels(image)
    background = world.border_colour(pixels)
    mask = np.linalg.norm(pixels - background, axis=-1) > world.OBJECT_DISTANCE
    name = world.nearest_colour(background, world.BACKGROUNDS)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(name, 0.0, None)
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return Reading(name, float(mask.mean()), (float(cols.mean() + 0.5) / w, float(rows.mean() + 0.5) / h))


def calibrate(examples: Iterable[tuple[Image.Image, str]]) -> Calibration:
    """The Calibration of a concept from (image, caption) pairs in the world's caption words; a
    caption with a size and no position phrase shows the concept in the centre, as in the world."""
    areas, shifts = [], []
    for image, caption in examples:
        context, reading = parse_context(caption), read_context(image)
        if context.size is None or reading.centroid is None:
            continue
        cx, cy, radius, _ = world.placement(context.size, context.position or "center")
        areas.append(reading.object_fraction / radius**2)
        shifts.append(((reading.centroid[0] - cx) / radius, (reading.centroid[1] - cy) / radius))
    if not areas:
        return Calibration()
    return Calibration(float(np.median(areas)), tuple(float(v) for v in np.median(shifts, axis=0)))


def adherence(image: Image.Image | np.ndarray, context: Context, calibration: Calibration) -> dict[str, bool]:
    """Per attribute the context names (size only when calibrated): does the image show it?"""
    reading = read_context(image)
    measured = {"background": reading.background, "size": reading.size(calibration),
                "position": reading.position(calibration)}
    return {key: measured[key] == wanted for key, wanted in context.named().items()
            if key != "size" or calibration.area is not None}


def adherence_score(checks: Sequence[dict[str, bool]]) -> float | None:
    """Mean over images of the share of named attributes shown; None when nothing was scorable."""
    shares = [sum(c.values()) / len(c) for c in checks if c]
    return float(np.mean(shares)) if shares else None


def unseen_contexts(seen: Iterable[Context], n: int, seed: int = 0) -> list[Context]:
    """`n` fully named contexts (background, size, off-centre position) that are none of `seen`:
    places the concept was never trained or evaluated in, a fixed draw for a given seed."""
    seen = set(seen)
    candidates = [Context(b, s, p) for b, s, p in itertools.product(world.BACKGROUNDS, world.SIZES, POSITION_PHRASES)
                  if Context(b, s, p) not in seen]
    return sorted(random.Random(seed).sample(candidates, min(n, len(candidates))),
                  key=lambda c: (c.background, c.size, c.position))
