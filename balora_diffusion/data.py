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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from balora_diffusion import masks
from balora_diffusion.buckets import nearest as bucket_nearest
from balora_diffusion.errors import UserError
from balora_diffusion.families import SizeCondition

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
    mask: Image.Image | None = None  # mode L, the image's size; read only for a masked loss

    @property
    def caption_source(self) -> str:
        return str(self.caption_file) if self.caption_file else "the caption template"


def image_files(folder: Path) -> list[Path]:
    """The training images of a concept folder, sorted: never a `NAME.mask.png` beside them."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not masks.is_mask_file(p) and p.is_file())


def read_concept_folder(folder: str | Path, tokens: list[str], caption_template: str,
                        with_masks: bool = False) -> list[Example]:
    """Images + captions (+ masks, `with_masks`: see masks.py) of a concept folder, validated.

    `caption_template` is used for images without a `.txt` file; `{token}` in it stands for the
    placeholder token(s) joined by spaces. Every caption must name every placeholder token, or the
    new embeddings would never receive a gradient from it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"concept folder not found: {folder}")
    paths = image_files(folder)
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    examples = []
    for path in paths:
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = read_caption(caption_file)
        else:
            caption, caption_file = caption_template.format(token=" ".join(tokens)), None
        image = load_image(path)
        example = Example(path, image, caption, caption_file, masks.read_mask(path, image.size) if with_masks else None)
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


@dataclass(frozen=True)
class View:
    """Where one draw puts an image: resized to cover the training size, cropped to it, maybe
    flipped. Its mask takes the same view, so mask and pixels stay aligned."""
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flipped: bool
    upscaled: bool


def draw_view(image_size: tuple[int, int], size: tuple[int, int], gen: torch.Generator, random_crop: bool,
              flip: bool) -> View:
    """Scale (w, h) to cover `size` (W, H), crop W x H (centred, or drawn from `gen`), flip with
    probability 1/2 (drawn from `gen` after the crop)."""
    (w, h), (width, height) = image_size, size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    if random_crop:
        left = int(torch.randint(0, rw - width + 1, (1,), generator=gen))
        top = int(torch.randint(0, rh - height + 1, (1,), generator=gen))
    else:
        left, top = (rw - width) // 2, (rh - height) // 2
    flipped = flip and bool(torch.rand((), generator=gen) < 0.5)
    return View((rw, rh), (left, top, left + width, top + height), flipped, scale > 1)


def size_condition(image_size: tuple[int, int], view: View) -> SizeCondition:
    """The image's original (height, width), the crop's top-left corner in the resized image (of the
    mirror image when flipped, which is what the model sees), and the (height, width) trained at."""
    left, top, right, bottom = view.box
    return SizeCondition(original=(image_size[1], image_size[0]),
                         crop=(top, view.resized[0] - right if view.flipped else left),
                         target=(bottom - top, right - left))


def view_pixels(image: Image.Image, view: View) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    image = image.resize(view.resized, Image.BICUBIC if view.upscaled else Image.LANCZOS).crop(view.box)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return (arr.flip(-1) if view.flipped else arr).contiguous()


def view_mask(mask: Image.Image, view: View, latent_factor: int) -> torch.Tensor:
    """(1, H / latent_factor, W / latent_factor) in [0, 1]: the mask at latent resolution."""
    # a box filter averages exactly the source pixels each target pixel covers: a mask's share of subject
    mask = mask.resize(view.resized, Image.BILINEAR if view.upscaled else Image.BOX).crop(view.box)
    arr = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return masks.to_latent(arr.flip(-1) if view.flipped else arr, latent_factor).contiguous()


def prepare(image: Image.Image, resolution: int, gen: torch.Generator, random_crop: bool, flip: bool) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; -> (3, R, R) in [-1, 1]."""
    return view_pixels(image, draw_view(image.size, (resolution, resolution), gen, random_crop, flip))


def split_holdout(examples: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held out): `count` images drawn with `seed` kept out of training, the rest in
    folder order. The same seed holds out the same images in every run of a folder."""
    if count >= len(examples):
        raise UserError(f"holdout {count} keeps every image out of training: the folder has {len(examples)}; "
                        "hold out fewer")
    chosen = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


class ConceptData:
    """Deterministic batches of a concept folder for step-indexed training.

    With `buckets`, each image trains at the bucket nearest its aspect ratio and every step's
    global batch comes from one bucket: per epoch, each bucket's images (times `repeats`) are
    shuffled and cut into global batches, a short last one filled from the start of the same
    shuffle, and the batches of all buckets shuffled together; all of it from (seed, epoch).
    Without, each image is cropped to a square and positions are permuted per epoch as they
    always were. Batches come with masks (at latent resolution, `latent_factor` pixels a cell)
    when the examples have them."""

    def __init__(self, examples: list[Example], *, resolution: int, repeats: int = 1, seed: int = 0,
                 random_crop: bool = False, flip: bool = True, buckets: list[tuple[int, int]] | None = None,
                 latent_factor: int = 8):
        if repeats < 1:
            raise UserError(f"repeats must be >= 1, got {repeats}")
        self.examples = examples
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.flip = flip
        self.repeats = repeats
        self.epoch_len = len(examples) * repeats
        self.bucketed = buckets is not None
        self.sizes = [bucket_nearest(ex.image.size, buckets) if buckets else (resolution, resolution)
                      for ex in examples]
        self.latent_factor = latent_factor
        self.masked = all(ex.mask is not None for ex in examples)
        self._epoch_batches: dict[tuple[int, int], list[list[int]]] = {}

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {size: self.sizes.count(size) for size in set(self.sizes)}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_len)
        perm = torch.randperm(self.epoch_len, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return int(perm[offset]) % len(self.examples)

    def _bucket_batches(self, epoch: int, global_batch: int) -> list[list[int]]:
        key = (epoch, global_batch)
        if key not in self._epoch_batches:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for size in sorted(set(self.sizes)):
                members = [i for i, s in enumerate(self.sizes) if s == size] * self.repeats
                order = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
                full = order * math.ceil(global_batch / len(order))  # a bucket smaller than one batch
                order += full[:-len(order) % global_batch]
                batches += [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
            self._epoch_batches = {key: [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]}
        return self._epoch_batches[key]

    def _draws(self, step: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
        """(position, example index) of each item of this process's share of step `step`."""
        start = step * batch_size * world_size + rank * batch_size
        positions = range(start, start + batch_size)
        if not self.bucketed:
            return [(p, self._index(p)) for p in positions]
        global_batch = batch_size * world_size
        per_epoch = sum(math.ceil(n * self.repeats / global_batch) for n in self.bucket_counts().values())
        epoch, offset = divmod(step, per_epoch)
        chosen = self._bucket_batches(epoch, global_batch)[offset][rank * batch_size:(rank + 1) * batch_size]
        return list(zip(positions, chosen))

    def _generator(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7_919 + position)

    def _view(self, position: int, index: int) -> View:
        ex = self.examples[index]
        return draw_view(ex.image.size, self.sizes[index], self._generator(position), self.random_crop, self.flip)

    def item(self, position: int, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels and latent-resolution mask (None without masks) of example `index` at `position`."""
        return self._pixels_and_mask(self.examples[index], self._view(position, index))

    def size_conditions(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[SizeCondition]:
        """Where each image of batch(step, ...) came from: its original size and the crop (what SDXL's
        UNet is told); the same draws as batch(), without the pixels."""
        return [size_condition(self.examples[i].image.size, self._view(p, i))
                for p, i in self._draws(step, batch_size, rank, world_size)]

    def _pixels_and_mask(self, ex: Example, view: View) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = view_mask(ex.mask, view, self.latent_factor) if self.masked else None
        return view_pixels(ex.image, view), mask

    def batch(self, step: int, batch_size: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """This process's share of the global batch of `step` (global batch = batch_size * world_size):
        pixels, captions, and latent-resolution masks (None without masks)."""
        draws = self._draws(step, batch_size, rank, world_size)
        items = [self.item(p, i) for p, i in draws]
        masks = torch.stack([m for _, m in items]) if self.masked else None
        return torch.stack([px for px, _ in items]), [self.examples[i].caption for _, i in draws], masks

    def square_view(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The centre square crop at the training resolution, unflipped: what the fixed-noise
        evaluation losses see whatever the buckets, so runs with and without them compare."""
        return self._pixels_and_mask(ex, self._square(ex))

    def square_size_condition(self, ex: Example) -> SizeCondition:
        return size_condition(ex.image.size, self._square(ex))

    def _square(self, ex: Example) -> View:
        size = (self.resolution, self.resolution)
        return draw_view(ex.image.size, size, torch.Generator(), False, False)

    # ---- the finite set of pixel tensors a run sees, for encoding each once (latent caching)

    @property
    def variants_are_finite(self) -> bool:
        """Without random crops every position shows one of (example, flipped or not)."""
        return not self.random_crop

    def variants(self) -> list[tuple[int, bool]]:
        """Every (example index, flipped) a run can draw; needs variants_are_finite."""
        return [(i, f) for i in range(len(self.examples)) for f in ((False, True) if self.flip else (False,))]

    def variant(self, variant: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels and mask of (example index, flipped)."""
        index, flipped = variant
        ex = self.examples[index]
        view = draw_view(ex.image.size, self.sizes[index], torch.Generator(), False, False)
        return self._pixels_and_mask(ex, replace(view, flipped=flipped))

    def batch_variants(self, step: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> tuple[list[tuple[int, bool]], list[str]]:
        """batch() as (example, flipped) pairs: the same draws as draw_view() makes, without the pixels
        (a centre crop draws nothing, so the flip is the generator's first draw)."""
        if not self.variants_are_finite:
            raise ValueError("random crops have no finite set of variants")
        variants = []
        for position, index in self._draws(step, batch_size, rank, world_size):
            flipped = self.flip and bool(torch.rand((), generator=self._generator(position)) < 0.5)
            variants.append((index, flipped))
        return variants, [self.examples[i].caption for i, _ in variants]
