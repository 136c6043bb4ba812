"""Aspect-ratio buckets: training sizes near the training resolution's pixel count, one per aspect.

Each image trains at the bucket nearest its aspect ratio (resized to cover it, then cropped), so
a wide photo loses a sliver at its ends instead of everything outside a centred square. Sides
are multiples of the model's resolution step (train.resolution_step): a side that does not halve
evenly through the VAE and the UNet's down blocks breaks the UNet's skip connections.
"""
from __future__ import annotations

import math
import re

from balora_diffusion.errors import UserError

# The widest aspect `auto` offers: past 2:1 the short side of a bucket at the training pixel count
# falls far below what the base model saw in training.
MAX_ASPECT = 2.0
_SIZE = re.compile(r"(\d+)x(\d+)")


def option_problem(values: list[str], max_side: int) -> str | None:
    """TrainConfig's check of `buckets`: `off`, `auto`, or sizes WIDTHxHEIGHT up to `max_side`."""
    if values in (["off"], ["auto"]):
        return None
    if not all(_SIZE.fullmatch(v) for v in values):
        return f"expected off, auto or sizes such as 64x48 48x64, got {' '.join(values)}"
    bad = [v for v in values if not 0 < min(parse_size(v)) <= max(parse_size(v)) <= max_side]
    return f"bucket sides are 1 to {max_side} px, got {' '.join(bad)}" if bad else None


def parse_size(text: str) -> tuple[int, int]:
    width, height = _SIZE.fullmatch(text).groups()
    return int(width), int(height)


def auto_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height), both multiples of `step`, with the most pixels not above
    resolution ** 2 for its width and an aspect within MAX_ASPECT either way."""
    area, found = resolution * resolution, []
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            found.append((width, height))
    return found


def choose_buckets(option: list[str], resolution: int, step: int) -> list[tuple[int, int]] | None:
    """The buckets of the `buckets` option; None for `off` (the square crop)."""
    if option == ["off"]:
        return None
    if option == ["auto"]:
        return auto_buckets(resolution, step)
    sizes = [parse_size(v) for v in option]
    for width, height in sizes:
        if width % step or height % step:
            raise UserError(f"bucket {width}x{height}: this base model needs sides that are multiples of {step} px")
    return sorted(set(sizes))


def nearest(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest `size`'s, on a log scale (2:1 is as far from 1:1 as
    1:2); ties go to the bucket with more pixels."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def describe(counts: dict[tuple[int, int], int]) -> str:
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
