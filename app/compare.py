"""The Compare grid: runs x fusion coefficients x seeds, laid out by the axes the user picks.

Every image of a grid is drawn with the same prompt, sampling settings and seed(s), so that what
differs between cells is only the training (and the strength it is applied at). Rows are the
values of one axis; columns are the values of another. A column is split further only by the
axes that vary inside one of its cells, and runs alike on every axis share a split column,
each cell captioned with its run's name: one extra run widens its own column, not the grid.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from balora_diffusion.app.engine import Engine, Sampling
from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError
from balora_diffusion.generate import image_grid
from balora_diffusion.runs import RunInfo, own_file

# axis name -> (value of a cell, label of a value)
AXES: dict[str, tuple[Callable, Callable]] = {
    "learning rate": (lambda c: c.run.lr_unet, lambda v: f"lr {v:g}"),
    "method": (lambda c: c.run.method, str),
    "fusion": (lambda c: c.weight, lambda v: f"w={v:g}"),
    "rank": (lambda c: c.run.rank, lambda v: f"rank {v}"),
    "training seed": (lambda c: c.run.seed, lambda v: f"train seed {v}"),
    "training steps": (lambda c: c.run.steps, lambda v: f"{v} steps"),
    "sampling seed": (lambda c: c.sampling.seed, lambda v: f"seed {v}"),
    "run": (lambda c: c.run.name, str),
}
LAYOUT_AXES = [name for name in AXES if name != "run"]
MAX_CELLS = 400  # a grid larger than this is a mistake in the inputs, not a request to wait an hour


@dataclass(frozen=True)
class Cell:
    run: RunInfo
    weight: float
    sampling: Sampling


def cells_for(runs: Sequence[RunInfo], weights: Sequence[float], sampling: Sampling,
              seeds: Sequence[int]) -> list[Cell]:
    """One cell per run x strength x sampling seed; a run's images stay together, so each run's
    adapter is loaded once per grid."""
    cells = [Cell(run, float(w), replace(sampling, seed=int(s)))
             for run in runs for w in weights for s in seeds]
    if len(cells) > MAX_CELLS:
        raise UserError(f"{len(cells)} images asked for; at most {MAX_CELLS} in one grid: choose fewer runs, "
                        "strengths or seeds")
    return cells


def _value(axis: str, cell: Cell):
    value = AXES[axis][0](cell)
    return None if isinstance(value, float) and math.isnan(value) else value  # NaN != NaN: no grouping by it


def _label(axis: str, value, folder: str = "") -> str:
    """`folder`: the folder every run of the grid is in, left out of run names (the title says it)."""
    if value is None:
        return "?"
    return value.removeprefix(folder) if axis == "run" else AXES[axis][1](value)


def _shared_folder(cells: Sequence[Cell]) -> str:
    folders = {c.run.name.rpartition("/")[0] for c in cells}
    return f"{folders.pop()}/" if len(folders) == 1 and "" not in folders else ""


def _order(values) -> list:
    present = {v for v in values if v is not None}
    numbers = all(isinstance(v, (int, float)) for v in present)
    return sorted(present, key=None if numbers else str) + ([None] if None in values else [])


@dataclass(frozen=True)
class Layout:
    rows: list[str]                          # row labels
    columns: list[str]                       # column labels
    placed: dict[tuple[int, int], Cell]      # (row, column) -> cell; a missing one is drawn grey
    captions: dict[tuple[int, int], str]     # run names of the cells in columns that runs share
    split: list[str]                         # axes that split a column
    fixed: list[str]                         # labels of the axes with one value in every cell
    axes: tuple[str, str]                    # (rows, columns)
    folder: str                              # the folder of every run ("sweep/"), left out of their names

    def title(self, sampling: Sampling) -> str:
        """What every cell shares, so that a saved grid says everything it was drawn with."""
        rows, columns = self.axes
        return (f"{sampling.prompt!r}" + (f", negative {sampling.negative_prompt!r}" if sampling.negative_prompt else "")
                + f"; {sampling.steps} sampling steps, guidance {sampling.guidance:g}; rows: {rows}, "
                f"columns: {columns}" + (f" split by {', '.join(self.split)}" if self.split else "")
                + (f"; every cell: {', '.join(self.fixed)}" if self.fixed else "")
                + (f"; runs in {self.folder}" if self.folder else ""))


def _check_axes(rows: str, columns: str) -> None:
    for axis in (rows, columns):
        if axis not in AXES:
            raise UserError(f"unknown axis {axis!r}: use one of {', '.join(AXES)}")
    if rows == columns:
        raise UserError(f"rows and columns are both {rows!r}: choose two different axes")


def _splits(cells: Sequence[Cell], rows: str, others: list[str]) -> list[str]:
    """The axes of `others` on which two of `cells` (one column's) in the same row differ."""
    by_row = defaultdict(list)
    for cell in cells:
        by_row[_value(rows, cell)].append(cell)
    return [a for a in others if any(len({_value(a, c) for c in group}) > 1 for group in by_row.values())]


def _column_keys(cells: Sequence[Cell], rows: str, split: list[str]) -> dict[int, tuple]:
    """id(cell) -> (values on `split`, place among the runs that share its row and those values)."""
    slots = defaultdict(list)
    for cell in cells:
        slots[_value(rows, cell), *(_value(a, cell) for a in split)].append(cell)
    keys = {}
    for slot, members in slots.items():
        for place, cell in enumerate(sorted(members, key=lambda c: c.run.name)):
            keys[id(cell)] = (*slot[1:], place)
    return keys


def layout(cells: Sequence[Cell], rows: str, columns: str) -> Layout:
    """Rows by `rows`, columns by `columns`, each column split only by the axes that vary within
    it in one row (in AXES order); runs alike on every axis get a split column each, captioned."""
    _check_axes(rows, columns)
    others = [a for a in LAYOUT_AXES if a not in (rows, columns)]
    row_values = _order([_value(rows, c) for c in cells])
    folder = _shared_folder(cells)
    placed, captions, labels, split_any = {}, {}, [], []
    for column in _order([_value(columns, c) for c in cells]):
        members = [c for c in cells if _value(columns, c) == column]
        split = _splits(members, rows, others)
        split_any += [a for a in split if a not in split_any]
        keys = _column_keys(members, rows, split)
        orders = [_order([_value(a, c) for c in members]) for a in split]
        ranked = sorted(set(keys.values()), key=lambda k: (*(o.index(v) for o, v in zip(orders, k)), k[-1]))
        shared = any(k[-1] for k in ranked)
        for cell in members:
            where = (row_values.index(_value(rows, cell)), len(labels) + ranked.index(keys[id(cell)]))
            placed[where] = cell
            if shared:
                captions[where] = _label("run", cell.run.name, folder)
        labels += [" · ".join([_label(columns, column, folder), *(_label(a, v) for a, v in zip(split, k))])
                   for k in ranked]
    fixed = [_label(a, values.pop()) for a in others if a not in split_any
             and len(values := {_value(a, c) for c in cells}) == 1]
    return Layout([_label(rows, v, folder) for v in row_values], labels, placed, captions,
                  [a for a in others if a in split_any], fixed, (rows, columns), folder)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def render(engine: Engine, cells: Sequence[Cell], rows: str, columns: str,
           progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[Image.Image, str]:
    """The labelled grid of `cells` and the path of its PNG in the cache (for download), named
    by its axes and prompt."""
    grid = layout(cells, rows, columns)
    images: dict[tuple[int, int], Image.Image] = {}
    for done, (where, cell) in enumerate(sorted(grid.placed.items(), key=lambda item: item[1].run.name)):
        progress(done, len(grid.placed))
        images[where] = engine.draw(cell.run.path, cell.weight, cell.sampling)
    progress(len(grid.placed), len(grid.placed))
    size = next(iter(images.values())).size
    blank = Image.new("RGB", size, (200, 200, 200))
    grid_rows = [[images.get((i, j), blank) for j in range(len(grid.columns))] for i in range(len(grid.rows))]
    sampling = cells[0].sampling
    picture = image_grid(grid_rows, grid.rows, grid.columns, title=grid.title(sampling), captions=grid.captions)
    name = (f"{_slug(rows)}-by-{_slug(columns)}-{_slug(sampling.prompt)[:40]}-"
            f"{hashlib.sha256(picture.tobytes()).hexdigest()[:12]}.png")
    path = engine.cache / "grids" / name
    if own_file(engine.cache, Path("grids", name)) is None:
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
    return picture, str(path)
