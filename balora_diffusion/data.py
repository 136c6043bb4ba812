"""Concept datasets: a folder of images with optional same-name `.txt` captions.

Everything a user can get wrong about the folder is checked when the dataset is built, before the
model is even loaded: a training run must never die at step 300 on an unreadable file.

Batches are a pure function of (seed, step): the image order is a per-epoch permutation and every
crop / flip draws from a generator seeded by (seed, step, slot). A resumed run therefore sees
exactly the batches an uninterrupted one would, without saving any data-loader state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from balora_diffusion.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode (RGBA, LA, P with transparency, L, CMYK, I;16...) -> RGB, alpha over `background`."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit / float grayscale: PIL's convert("RGB") clips instead of rescaling.
        arr = np.asarray(image, dtype=np.float64)
        span = arr.max() - arr.min()
        arr = (arr - arr.min()) / (span if span > 0 else 1.0) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


@dataclass
class Example:
    path: Path
    image: Image.Image
    caption: str


def read_concept_folder(folder: str | Path, tokens: list[str], caption_template: str) -> list[Example]:
    """Images + captions of a concept folder, validated.

    `caption_template` is used for images without a `.txt` file; `{token}` in it stands for the
    placeholder token(s) joined by spaces. Every caption must name every placeholder token, or the
    new embeddings would never receive a gradient from it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"concept folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    examples = []
    for path in paths:
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            caption = caption_template.format(token=" ".join(tokens))
        missing = [t for t in tokens if t not in caption]
        if missing:
            source = caption_file if caption_file.is_file() else "the caption template"
            raise UserError(f"caption of {path.name} ({source}) never names {', '.join(missing)}: {caption!r}")
        examples.append(Example(path, load_image(path), caption))
    return examples


def _crop_box(w: int, h: int, side: int, gen: torch.Generator, random_crop: bool) -> tuple[int, int, int, int]:
    if random_crop:
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
    else:
        left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def prepare(image: Image.Image, resolution: int, gen: torch.Generator, random_crop: bool, flip: bool) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; -> (3, R, R) in [-1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.BICUBIC if scale > 1 else Image.LANCZOS)
    image = image.crop(_crop_box(*image.size, resolution, gen, random_crop))
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        arr = arr.flip(-1)
    return arr.contiguous()


class ConceptData:
    """Deterministic batches of a concept folder for step-indexed training."""

    def __init__(self, examples: list[Example], *, resolution: int, repeats: int = 1, seed: int = 0,
                 random_crop: bool = False, flip: bool = True):
        if repeats < 1:
            raise UserError(f"repeats must be >= 1, got {repeats}")
        self.examples = examples
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.flip = flip
        self.epoch_len = len(examples) * repeats

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_len)
        perm = torch.randperm(self.epoch_len, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return int(perm[offset]) % len(self.examples)

    def item(self, position: int) -> tuple[torch.Tensor, str]:
        ex = self.examples[self._index(position)]
        gen = torch.Generator().manual_seed(self.seed * 7_919 + position)
        return prepare(ex.image, self.resolution, gen, self.random_crop, self.flip), ex.caption

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, list[str]]:
        """This process's share of the global batch of `step` (global batch = batch_size * world_size)."""
        start = step * batch_size * world_size + rank * batch_size
        items = [self.item(start + i) for i in range(batch_size)]
        return torch.stack([px for px, _ in items]), [cap for _, cap in items]
