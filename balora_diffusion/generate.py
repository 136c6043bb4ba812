"""Labelled image grids, and written images.

`generate` and `set_scheduler` are balora_diffusion.draw's seeded sampler and sampler switch, under
the names scripts have imported them by from here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from balora_diffusion.atomic import atomic_path
from balora_diffusion.draw import generate, set_scheduler

__all__ = ["generate", "set_scheduler", "image_grid", "save_image", "write_grid"]

def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Greedy word wrap to `width` pixels; a word wider than that is broken (a long run name would
    otherwise run into its neighbour's label)."""
    lines: list[str] = []
    for word in text.split():
        for piece in _pieces(draw, word, font, width):
            if lines and draw.textlength(lines[-1] + " " + piece, font=font) <= width:
                lines[-1] += " " + piece
            else:
                lines.append(piece)
    return "\n".join(lines)


def _pieces(draw: ImageDraw.ImageDraw, word: str, font, width: int) -> list[str]:
    """`word` cut into pieces no wider than `width` pixels (one character at least), after a
    "/", "-" or "_" where one falls in the piece."""
    pieces = []
    while word:
        fits = max(1, next((n for n in range(len(word), 0, -1) if draw.textlength(word[:n], font=font) <= width), 1))
        if fits < len(word):
            fits = max((word.rfind(c, 0, fits) + 1 for c in "/-_"), default=0) or fits
        pieces.append(word[:fits])
        word = word[fits:]
    return pieces


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, *, cell: int | None = None,
               title: str | None = None, font_size: int = 13, pad: int = 4,
               captions: Mapping[tuple[int, int], str] | None = None) -> Image.Image:
    """A grid with one row per entry of `rows`, optional text labels on the left and on top,
    an optional title, and optional captions over the foot of cells ({(row, column): text}).
    Cells are resized to `cell` pixels (default: twice the image size, at least 96) with
    nearest-neighbour, so small images stay crisp."""
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")
    first = next(img for r in rows for img in r)
    cell = cell or max(96, 2 * first.width)
    font = _font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def extent(text: str) -> tuple[int, int]:
        """Right and bottom edge of `text` drawn at the origin (glyphs start below it, not at it)."""
        return scratch.multiline_textbbox((0, 0), text, font=font)[2:]

    rows_text = [str(t) for t in row_labels] if row_labels is not None else []
    cols_text = [_wrap(scratch, str(t), font, cell) for t in col_labels] if col_labels is not None else []
    label_w = max((extent(t)[0] for t in rows_text), default=-pad) + 2 * pad
    header_h = max((extent(t)[1] for t in cols_text), default=-pad) + 2 * pad
    title_text = _wrap(scratch, title, font, label_w + n_cols * (cell + pad)) if title else ""
    title_h = extent(title_text)[1] + 2 * pad if title else 0

    width = label_w + n_cols * (cell + pad) + pad
    height = title_h + header_h + n_rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.multiline_text((pad, pad), title_text, fill="black", font=font)
    top = title_h + header_h
    for j, text in enumerate(cols_text):
        w, h = extent(text)
        x = label_w + j * (cell + pad) + (cell - w) // 2
        draw.multiline_text((x, top - h - pad), text, fill="black", font=font, align="center")
    for i, row in enumerate(rows):
        y = top + i * (cell + pad)
        if rows_text:
            draw.text((pad, y + (cell - extent(rows_text[i])[1]) // 2), rows_text[i], fill="black", font=font)
        for j, img in enumerate(row):
            tile = img.convert("RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + pad), y))
            if (i, j) in (captions or {}):
                text = _wrap(scratch, captions[i, j], font, cell - 2 * pad)
                bottom = y + cell - extent(text)[1] - 2 * pad
                draw.rectangle((label_w + j * (cell + pad), bottom, label_w + j * (cell + pad) + cell - 1, y + cell - 1),
                               fill="white")
                draw.multiline_text((label_w + j * (cell + pad) + pad, bottom + pad // 2), text, fill="black", font=font)
    return canvas


def save_image(path: str | Path, image: Image.Image) -> Path:
    """PNG written under a temporary name and renamed: never a half-written file."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def write_grid(path: str | Path, rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, **grid_kwargs: Any) -> Path:
    return save_image(path, image_grid(rows, row_labels, col_labels, **grid_kwargs))
