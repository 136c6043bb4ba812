"""A concept folder (images, captions, concept.toml) and an automatic fidelity score from pixels.

concept.toml:

    token = "<zorb>"                 # placeholder token the captions use
    initializer = "heart"            # real word whose embedding initialises the new token
    class_word = "heart"             # what the concept is an instance of (prior prompts)
    caption_template = "a {token}"   # caption of an image without a same-name .txt file
    eval_prompts = ["a large <zorb> on a blue background", ...]

    [colours]                        # the concept's own colours, sRGB 0-255
    pink = [255, 105, 190]
    cyan = [0, 200, 210]

The score reads a generated image the way `world.classify` does: the border gives the
background, pixels far from it are the object. It is the share of the object explained by the
concept's colours (pure, blended with the background at soft edges, or blended with each other
where they meet) times the presence of every one of those colours.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from balora_diffusion import world
from balora_diffusion.config import read_toml
from balora_diffusion.data import image_files
from balora_diffusion.errors import UserError

# RGB distance from the nearest explaining colour (or blend) that still counts fully / not at all;
# linear between, so small colour drift in generated images costs a little, not everything.
MATCH_FULL, MATCH_NONE = 30.0, 60.0
# Each colour must cover this share of the object, split evenly among the colours, for full presence.
PRESENCE_SHARE = 0.2


@dataclass(frozen=True)
class Concept:
    name: str
    path: Path
    token: str
    initializer: str
    class_word: str
    caption_template: str
    colours: dict[str, tuple[int, int, int]]
    eval_prompts: tuple[str, ...]
    images: tuple[Path, ...]


def _require(table: dict, key: str, kind: type, source: Path):
    if key not in table:
        raise UserError(f"{source}: missing key {key!r}")
    if not isinstance(table[key], kind):
        raise UserError(f"{source}: {key!r} must be a {kind.__name__}, got {table[key]!r}")
    return table[key]


def _colour(name: str, value, source: Path) -> tuple[int, int, int]:
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise UserError(f"{source}: colour {name!r} must be three integers 0-255, got {value!r}")
    return tuple(value)


def load_concept(path: str | Path) -> Concept:
    """Read `path`/concept.toml and list the folder's images; every problem is a UserError."""
    folder = Path(path)
    source = folder / "concept.toml"
    if not source.is_file():
        raise UserError(f"no concept.toml in {folder}")
    table = read_toml(Concept, source)  # also rejects keys that are not Concept fields
    token = _require(table, "token", str, source)
    template = _require(table, "caption_template", str, source)
    if "{token}" not in template:
        raise UserError(f"{source}: caption_template must contain {{token}}, got {template!r}")
    colours = {name: _colour(name, value, source) for name, value in _require(table, "colours", dict, source).items()}
    if not colours:
        raise UserError(f"{source}: [colours] is empty")
    prompts = _require(table, "eval_prompts", list, source)
    if not prompts or not all(isinstance(p, str) and token in p for p in prompts):
        raise UserError(f"{source}: eval_prompts must be a non-empty list of prompts naming {token}")
    images = tuple(image_files(folder))
    if not images:
        raise UserError(f"no images in {folder}")
    return Concept(name=folder.name, path=folder, token=token,
                   initializer=_require(table, "initializer", str, source),
                   class_word=_require(table, "class_word", str, source), caption_template=template,
                   colours=colours, eval_prompts=tuple(prompts), images=images)


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each RGB pixel (N, 3) from the colour segment start-end (the blends of the two)."""
    direction = end - start
    t = np.clip((pixels - start) @ direction / max(float(direction @ direction), 1e-12), 0.0, 1.0)
    return np.linalg.norm(pixels - start - t[:, None] * direction, axis=1)


def _match(distance: np.ndarray) -> np.ndarray:
    return np.clip((MATCH_NONE - distance) / (MATCH_NONE - MATCH_FULL), 0.0, 1.0)


def fidelity(image: Image.Image | np.ndarray, concept: Concept) -> float:
    """How much `image` shows an object in the concept's colours, in [0, 1] (0 without an object)."""
    pixels = world.as_pixels(image)
    background = world.border_colour(pixels)
    flat = pixels.reshape(-1, 3)
    obj = flat[np.linalg.norm(flat - background, axis=1) > world.OBJECT_DISTANCE]
    if len(obj) == 0:
        return 0.0
    colours = [np.asarray(c, dtype=np.float64) for c in concept.colours.values()]
    ends = [background, *colours]
    explained = np.min([_segment_distance(obj, a, b) for i, a in enumerate(ends) for b in ends[i + 1:]], axis=0)
    share = float(_match(explained).mean())
    presence = min(min(1.0, float(_match(np.linalg.norm(obj - c, axis=1)).mean()) / (PRESENCE_SHARE / len(colours)))
                   for c in colours)
    return share * presence


def fidelity_batch(images, concept: Concept) -> float:
    """Mean fidelity over a sequence of images."""
    scores = [fidelity(image, concept) for image in images]
    if not scores:
        raise ValueError("fidelity_batch needs at least one image")
    return float(np.mean(scores))
