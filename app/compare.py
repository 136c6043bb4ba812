"""The Compare grid: runs x fusion coefficients x seeds, laid out by the axes the user picks.

Every image of a grid is drawn with the same prompt, sampling settings and seed(s), so that what
differs between cells is only the training (and the strength it is applied at). Rows are the
values of one axis; columns are the values of another, split further by every other axis that
varies among the chosen images, so that no two images ever share a cell.
"""
from __future__ import annotations

import hashlib
import math
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
    "rank": (lambda c: c.run.rank, lambda v: f"rank {v}"),
    "training seed": (lambda c: c.run.seed, lambda v: f"train seed {v}"),
    "fusion": (lambda c: c.weight, lambda v: f"w={v:g}"),
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


def _order(values) -> list:
    numbers = all(isinstance(v, (int, float)) for v in values)
    return sorted(set(values), key=(lambda v: (math.isnan(v), v)) if numbers else str)


def layout(cells: Sequence[Cell], rows: str, columns: str):
    """(row labels, column labels, {(row index, column index): cell}). Columns are split by every
    other axis on which the cells differ, in AXES order, the run's name last and only if needed."""
    for axis in (rows, columns):
        if axis not in AXES:
            raise UserError(f"unknown axis {axis!r}: use one of {', '.join(AXES)}")
    if rows == columns:
        raise UserError(f"rows and columns are both {rows!r}: choose two different axes")
    values = {name: [get(c) for c in cells] for name, (get, _) in AXES.items()}
    extra = [a for a in LAYOUT_AXES if a not in (rows, columns) and len(set(values[a])) > 1]
    keys = [tuple(values[a][i] for a in [columns, *extra]) for i in range(len(cells))]
    if len(set(zip(values[rows], keys))) < len(cells) and "run" not in (rows, columns):
        extra.append("run")  # runs alike on every axis (e.g. differing only in steps)
        keys = [tuple(values[a][i] for a in [columns, *extra]) for i in range(len(cells))]
    row_values = _order(values[rows])
    col_keys = sorted(set(keys), key=lambda key: tuple(_sort_key(values[a], v) for a, v in zip([columns, *extra], key)))
    placed = {(row_values.index(values[rows][i]), col_keys.index(keys[i])): c for i, c in enumerate(cells)}
    row_labels = [AXES[rows][1](v) for v in row_values]
    col_labels = [" · ".join(AXES[a][1](v) for a, v in zip([columns, *extra], key)) for key in col_keys]
    return row_labels, col_labels, placed


def _sort_key(values: list, value) -> int:
    return _order(values).index(value)


def render(engine: Engine, cells: Sequence[Cell], rows: str, columns: str,
           progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[Image.Image, str]:
    """The labelled grid of `cells` and the path of its PNG in the cache (for download)."""
    row_labels, col_labels, placed = layout(cells, rows, columns)
    images: dict[tuple[int, int], Image.Image] = {}
    for done, (where, cell) in enumerate(sorted(placed.items(), key=lambda item: item[1].run.name)):
        progress(done, len(placed))
        images[where] = engine.draw(cell.run.path, cell.weight, cell.sampling)
    progress(len(placed), len(placed))
    size = next(iter(images.values())).size
    blank = Image.new("RGB", size, (200, 200, 200))
    grid_rows = [[images.get((i, j), blank) for j in range(len(col_labels))] for i in range(len(row_labels))]
    sampling = cells[0].sampling
    title = (f"{sampling.prompt!r}" + (f", negative {sampling.negative_prompt!r}" if sampling.negative_prompt else "")
             + f"; {sampling.steps} steps, guidance {sampling.guidance:g}; rows: {rows}")
    grid = image_grid(grid_rows, row_labels, col_labels, title=title)
    name = f"grid-{hashlib.sha256(grid.tobytes()).hexdigest()[:16]}.png"
    path = engine.cache / "grids" / name
    if own_file(engine.cache, Path("grids", name)) is None:
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
    return grid, str(path)
