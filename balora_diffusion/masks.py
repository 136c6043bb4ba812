"""Loss masks: which pixels of a training image are the subject.

A mask is `NAME.mask.png` beside the image (white = subject, black = background, grays between)
or, without one, the image's own alpha channel. It goes through every resize, crop and flip its
image goes through (data.View), is averaged down to latent resolution (each latent cell is
weighted by the share of its pixels that are subject) and weights the denoising error there.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from balora_diffusion.errors import UserError

SUFFIX = ".mask.png"


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIX)


def mask_file(image: Path) -> Path:
    return image.with_name(image.stem + SUFFIX)


def _upright(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return ImageOps.exif_transpose(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from None


def has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)


def read_mask(image_path: Path, size: tuple[int, int]) -> Image.Image:
    """The mask (mode L) of the upright image at `image_path`, whose upright size is `size`."""
    path = mask_file(image_path)
    if path.is_file():
        mask = _upright(path).convert("L")
        if mask.size != size:
            raise UserError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path.name} is "
                            f"{size[0]}x{size[1]}: a mask must have its image's size")
        source = str(path)
    else:
        image = _upright(image_path)
        if not has_alpha(image):
            raise UserError(f"no mask for {image_path}: put {path.name} beside it (white = subject) or give the "
                            "image an alpha channel, or train with --masked-loss false")
        mask, source = image.convert("RGBA").getchannel("A"), f"the alpha channel of {image_path}"
    if mask.getextrema()[1] == 0:
        raise UserError(f"mask {source} is all zero: it marks no subject to train on")
    return mask


def to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(1, H, W) in [0, 1] -> (1, H / factor, W / factor): each latent cell's share of subject."""
    return F.avg_pool2d(mask[None], factor)[0]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None,
                   unmasked_weight: float) -> torch.Tensor:
    """Mean squared error per sample; with `masks` (B, 1, h, w) each latent cell is weighted
    w = m + unmasked_weight * (1 - m) and the sum divided by the weighted area (times the
    channels), so a small subject trains as hard as a large one."""
    error = (pred - target) ** 2
    if masks is None:
        return error.mean(dim=(1, 2, 3))
    weights = masks + unmasked_weight * (1 - masks)
    area = weights.sum(dim=(1, 2, 3)) * error.shape[1]
    # a random crop can cut the whole subject out: that sample then adds nothing
    return (error * weights).sum(dim=(1, 2, 3)) / area.clamp(min=torch.finfo(area.dtype).tiny)
