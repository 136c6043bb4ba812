"""Concept datasets: a folder of images with optional same-name `.txt` captions.

Everything a user can get wrong about the folder is checked when the dataset is built, before the
model is even loaded: a training run must never die at step 300 on an unreadable file. Two checks
need the model and run as soon as it is there, still before any training: a placeholder token must
fall inside the text encoder's window (`check_caption_tokens`, once the tokenizer knows the token)
and images must not be far smaller than the training resolution (`check_image_sizes`).

Batches are a pure function of (seed, step): the image order is a per-epoch permutation and every
crop / flip draws from a generator seeded by (seed, step, slot). A resumed run therefore sees
exactly the batches an uninterrupted one would, without saving any data-loader state.
"""
from __future__ import annotations

import codecs
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from balora_diffusion.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The byte-order marks editors write (Notepad's "Unicode" is UTF-16-LE with one); without one a
# caption must be UTF-8, since a legacy 8-bit encoding cannot be told apart from another reliably.
CAPTION_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# An image whose shorter side is below this share of the training resolution is refused: upscaled
# more than 4x, each training pixel is interpolated from a sliver of a source pixel and the adapter
# learns the blur as part of the concept. Milder upscaling only softens the images: a warning.
MIN_SIDE_SHARE = 1 / 4


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
    """An image file as upright RGB: phones store the sensor's pixels with an EXIF Orientation tag.

    PIL checks the size in the header, before decoding anything: past twice Image.MAX_IMAGE_PIXELS
    it raises DecompressionBombError, refused here. Between the limit and twice it PIL only warns;
    that range holds real photos (100-megapixel phone and camera modes), so they are accepted and
    the warning, which Python would print as two lines of noise, is silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {path} is too large to train on, downscale it: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8 with or without a byte-order mark, or UTF-16 with one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read caption file {path}: {exc.strerror}") from None
    encoding = next((name for bom, name in CAPTION_BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        offset = exc.start + len(raw) - len(exc.object)  # utf-8-sig reports offsets past its BOM
        problem = f"is not {exc.encoding.upper()} text ({exc.reason}: byte {raw[offset]:#04x} at offset {offset})"
    else:
        if "\0" not in text:
            return text.strip()
        # UTF-16 without a byte-order mark is valid UTF-8 with a NUL beside each ASCII character.
        problem = "holds NUL characters (UTF-16 without a byte-order mark?)"
    raise UserError(f"caption file {path} {problem}: save it as UTF-8")


@dataclass
class Example:
    path: Path
    image: Image.Image
    caption: str
    caption_file: Path | None  # None: the caption template

    @property
    def caption_source(self) -> str:
        return str(self.caption_file) if self.caption_file else "the caption template"


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
            caption = read_caption(caption_file)
        else:
            caption, caption_file = caption_template.format(token=" ".join(tokens)), None
        example = Example(path, load_image(path), caption, caption_file)
        missing = [t for t in tokens if t not in example.caption]
        if missing:
            raise UserError(f"caption of {path.name} ({example.caption_source}) never names {', '.join(missing)}: "
                            f"{example.caption!r}")
        examples.append(example)
    return examples


def window_problem(tokenizer, text: str, tokens: list[str]) -> str | None:
    """What cuts placeholder tokens out of `text`, as "is N tokens and <t> falls past the text
    encoder's first M (start and end included)"; None when the text encoder reads every one. The
    text is truncated to tokenizer.model_max_length ids, start and end tokens included. Needs the
    tokenizer with `tokens` added."""
    window = tokenizer.model_max_length
    kept = tokenizer(text, truncation=True, max_length=window).input_ids
    missing = [t for t, i in zip(tokens, tokenizer.convert_tokens_to_ids(tokens)) if i not in kept]
    if not missing:
        return None
    # verbose=False: the untruncated count is wanted here, not the tokenizer's warning about it
    total = len(tokenizer(text, verbose=False).input_ids)
    return (f"is {total} tokens and {', '.join(missing)} falls past the text encoder's first {window} "
            "(start and end included)")


def check_caption_tokens(examples: list[Example], tokenizer, tokens: list[str]) -> None:
    """Every placeholder token must be among the ids the text encoder reads (window_problem): a
    token cut off there would silently never be trained."""
    for ex in examples:
        if problem := window_problem(tokenizer, ex.caption, tokens):
            raise UserError(f"caption of {ex.path.name} ({ex.caption_source}) {problem}, so it would never be "
                            "trained: shorten the caption or name the token earlier")


def check_image_sizes(examples: list[Example], resolution: int, quiet: bool = False) -> None:
    """Refuse an image whose shorter side is below MIN_SIDE_SHARE of the training resolution; warn,
    in one line on stderr unless `quiet`, about the ones that are upscaled less than that."""
    small = sorted((ex for ex in examples if min(ex.image.size) < resolution), key=lambda ex: min(ex.image.size))
    if not small:
        return
    smallest = small[0]
    w, h = smallest.image.size
    floor = math.ceil(resolution * MIN_SIDE_SHARE)
    if min(w, h) < floor:
        raise UserError(f"image {smallest.path} is {w}x{h}: its shorter side must be at least {floor} px "
                        f"({MIN_SIDE_SHARE:.0%} of the {resolution} px training resolution), or the adapter "
                        "learns upscaling blur")
    if not quiet:
        print(f"balora: warning: {len(small)} image(s) below the {resolution} px training resolution are upscaled "
              f"and train soft; the smallest is {smallest.path} ({w}x{h})", file=sys.stderr)


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

    def _generator(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7_919 + position)

    def item(self, position: int) -> tuple[torch.Tensor, str]:
        ex = self.examples[self._index(position)]
        return prepare(ex.image, self.resolution, self._generator(position), self.random_crop, self.flip), ex.caption

    def _positions(self, step: int, batch_size: int, rank: int, world_size: int) -> range:
        start = step * batch_size * world_size + rank * batch_size
        return range(start, start + batch_size)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, list[str]]:
        """This process's share of the global batch of `step` (global batch = batch_size * world_size)."""
        items = [self.item(p) for p in self._positions(step, batch_size, rank, world_size)]
        return torch.stack([px for px, _ in items]), [cap for _, cap in items]

    # ---- the finite set of pixel tensors a run sees, for encoding each once (latent caching)

    @property
    def variants_are_finite(self) -> bool:
        """Without random crops every position shows one of (example, flipped or not)."""
        return not self.random_crop

    def variants(self) -> list[tuple[int, bool]]:
        """Every (example index, flipped) a run can draw; needs variants_are_finite."""
        return [(i, f) for i in range(len(self.examples)) for f in ((False, True) if self.flip else (False,))]

    def variant_pixels(self, variant: tuple[int, bool]) -> torch.Tensor:
        index, flipped = variant
        pixels = prepare(self.examples[index].image, self.resolution, torch.Generator(), False, False)
        return pixels.flip(-1) if flipped else pixels

    def batch_variants(self, step: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> tuple[list[tuple[int, bool]], list[str]]:
        """batch() as (example, flipped) pairs: the same draws as prepare() makes, without the pixels
        (a centre crop draws nothing, so the flip is the generator's first draw)."""
        if not self.variants_are_finite:
            raise ValueError("random crops have no finite set of variants")
        variants = []
        for position in self._positions(step, batch_size, rank, world_size):
            flipped = self.flip and bool(torch.rand((), generator=self._generator(position)) < 0.5)
            variants.append((self._index(position), flipped))
        return variants, [self.examples[i].caption for i, _ in variants]
