"""The Compare grid: runs (their checkpoints, the base model) x fusion coefficients x prompts x
sampling steps x guidances x seeds, laid out by the axes the user picks.

Every run of a grid is drawn with the same prompts, sampling settings and seeds, so that what
differs between its cells is the training (and the strength it is applied at) or a sampling
setting the grid varies on purpose. Rows are the
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
from balora_diffusion.run_layout import CHECKPOINTS
from balora_diffusion.runs import RunInfo, inside, own_file

BASE = "base model"  # the entry of the run choice that draws without any adapter
# a prompt as a row or column label: row labels are not wrapped, so a long one would widen the grid
PROMPT_LABEL_CHARS = 40

# axis name -> (value of a cell, label of a value)
AXES: dict[str, tuple[Callable, Callable]] = {
    "learning rate": (lambda c: c.run.lr_unet, lambda v: f"lr {v:g}"),
    "method": (lambda c: c.run.method, str),
    "fusion": (lambda c: c.weight, lambda v: f"w={v:g}"),
    "rank": (lambda c: c.run.rank, lambda v: f"rank {v}"),
    "training seed": (lambda c: c.run.seed, lambda v: f"train seed {v}"),
    "training steps": (lambda c: c.run.steps, lambda v: f"{v} steps"),
    "checkpoint": (lambda c: c.step, lambda v: f"step {v}" if v else BASE),
    "prompt": (lambda c: c.prompt or c.sampling.prompt, lambda v: _shortened(repr(v))),
    "sampling steps": (lambda c: c.sampling.steps, lambda v: f"{v} sampling steps"),
    "guidance": (lambda c: c.sampling.guidance, lambda v: f"guidance {v:g}"),
    "sampling seed": (lambda c: c.sampling.seed, lambda v: f"seed {v}"),
    "run": (lambda c: c.run.name, str),
}
# what a cell without a value on an axis is: the base model has no adapter, a final adapter no checkpoint
MISSING = {"fusion": "no LoRA", "checkpoint": "final"}
LAYOUT_AXES = [name for name in AXES if name != "run"]
SAMPLING_AXES = ("prompt", "sampling steps", "guidance")  # the title's first part when one value each
MAX_CELLS = 400  # a grid larger than this is a mistake in the inputs, not a request to wait an hour


@dataclass(frozen=True)
class Cell:
    run: RunInfo
    weight: float | None          # None: the base model, without any adapter
    sampling: Sampling            # as drawn
    step: int | None = None       # the step of the run's checkpoint drawn; None: its final adapter; 0: base model
    prompt: str = ""              # the prompt as typed, where the one drawn differs (the base model's)
    note: str = ""                # the cell's own caption


def base_run() -> RunInfo:
    """The base model as a row of the grid: no run attribute applies to it."""
    return RunInfo(name=BASE, path=Path(), state="finished", method=BASE, rank=None, seed=None, steps=None)


def is_base(cell: Cell) -> bool:
    return cell.weight is None


def samplings(prompts: Sequence[str], negative_prompt: str, steps: Sequence[int], guidances: Sequence[float],
              seeds: Sequence[int]) -> list[Sampling]:
    return [Sampling(p, negative_prompt, int(seed), int(n), float(g))
            for p in prompts for n in steps for g in guidances for seed in seeds]


def adapters_of(run: RunInfo, with_checkpoints: bool) -> list[int | None]:
    """The steps to draw `run` at: its final adapter (None), and with `with_checkpoints` every
    checkpoint before it (a run not finished: its checkpoints only); a UserError where that is nothing."""
    if not with_checkpoints:
        return [None]  # Engine says why a run without an adapter cannot be drawn
    final = [None] if run.state == "finished" else []
    from balora_diffusion import checkpoint as ckpt

    # the last checkpoint of a finished run holds its final adapter: drawn once, as "final"
    steps = [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(inside(run.path, run.path / CHECKPOINTS))]
    found = [s for s in steps if not final or s < run.steps] + final
    if not found:
        raise UserError(f"run {run.name} has neither an adapter nor a checkpoint yet")
    return found


def base_prompt(prompt: str, runs: Sequence[RunInfo]) -> tuple[str, str]:
    """The prompt for the base model, which knows no learned token: each run's token replaced by
    the word its embedding started from, where that is known; and the caption saying so."""
    words = {token: run.init_word for run in runs for token in run.tokens if run.init_word}
    replaced = [token for token in sorted(words, key=len, reverse=True) if token in prompt]
    for token in replaced:
        prompt = prompt.replace(token, words[token])
    said = ", ".join(f"{words[t]} for {t}" for t in replaced) or "prompt as typed"
    return prompt, f"{BASE}: {said}"


def cells_for(runs: Sequence[RunInfo], weights: Sequence[float], drawn: Sequence[Sampling],
              base: bool = False, with_checkpoints: bool = False) -> list[Cell]:
    """One cell per run (and checkpoint) x strength x sampling, and with `base` one per sampling of
    the base model; a run's images stay together, so each adapter is loaded once per grid."""
    cells = [Cell(run, float(w), s, step) for run in runs for step in adapters_of(run, with_checkpoints)
             for w in weights for s in drawn]
    if base:
        reference = base_run()
        for s in drawn:
            prompt, note = base_prompt(s.prompt, runs)
            cells.append(Cell(reference, None, replace(s, prompt=prompt), 0, s.prompt, note))
    if len(cells) > MAX_CELLS:
        raise UserError(f"{len(cells)} images asked for; at most {MAX_CELLS} in one grid: choose fewer runs, "
                        "checkpoints, strengths, prompts, sampling steps, guidances or seeds")
    return cells


def _shortened(text: str) -> str:
    return text if len(text) <= PROMPT_LABEL_CHARS else text[:PROMPT_LABEL_CHARS - 1] + "…"


def _value(axis: str, cell: Cell):
    value = AXES[axis][0](cell)
    return None if isinstance(value, float) and math.isnan(value) else value  # NaN != NaN: no grouping by it


def _label(axis: str, value, folder: str = "") -> str:
    """`folder`: the folder every run of the grid is in, left out of run names (the title says it)."""
    if value is None:
        return MISSING.get(axis, "?")
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
    captions: dict[tuple[int, int], str]     # run names in columns that runs share, and the cells' notes
    split: list[str]                         # axes that split a column
    fixed: dict[str, object]                 # axis -> its one value, where every cell has the same
    axes: tuple[str, str]                    # (rows, columns)
    folder: str                              # the folder of every run ("sweep/"), left out of their names
    shortened: list[str]                     # prompts whose row or column label is cut short

    def title(self, negative_prompt: str = "") -> str:
        """What every cell shares, so that a saved grid says everything it was drawn with."""
        rows, columns = self.axes
        fixed = dict(self.fixed)
        prompt, steps, guidance = (fixed.pop(a, None) for a in SAMPLING_AXES)
        sampling = ", ".join(([f"{steps} sampling steps"] if steps is not None else [])
                             + ([f"guidance {guidance:g}"] if guidance is not None else []))
        head = [f"{prompt!r}" if prompt is not None else "",
                f"negative {negative_prompt!r}" if negative_prompt else ""]
        parts = [", ".join(filter(None, head)), sampling,
                 f"rows: {rows}, columns: {columns}" + (f" split by {', '.join(self.split)}" if self.split else ""),
                 f"every cell: {', '.join(_label(a, v) for a, v in fixed.items())}" if fixed else "",
                 f"runs in {self.folder}" if self.folder else "",
                 f"prompts in full: {' | '.join(map(repr, self.shortened))}" if self.shortened else ""]
        return "; ".join(filter(None, parts))


def _check_axes(rows: str, columns: str) -> None:
    for axis in (rows, columns):
        if axis not in AXES:
            raise UserError(f"unknown axis {axis!r}: use one of {', '.join(AXES)}")
    if rows == columns:
        raise UserError(f"rows and columns are both {rows!r}: choose two different axes")


def _splits(cells: Sequence[Cell], rows: str, others: list[str]) -> list[str]:
    """The axes of `others` on which two of `cells` (one column's) in the same row differ, the base
    model compared only with itself: it differs from every run on every run attribute, and a
    column of its own, captioned, says that better than a label of all of them."""
    by_row = defaultdict(list)
    for cell in cells:
        by_row[_value(rows, cell), is_base(cell)].append(cell)
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
    folder = _shared_folder([c for c in cells if not is_base(c)])
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
            if caption := " · ".join(filter(None, [_label("run", cell.run.name, folder) if shared and not is_base(cell)
                                                   else "", cell.note])):
                captions[where] = caption
        labels += [" · ".join([_label(columns, column, folder), *(_label(a, v) for a, v in zip(split, k))])
                   for k in ranked]
    fixed = {a: values.pop() for a in others if a not in split_any
             and len(values := {_value(a, c) for c in cells}) == 1 and None not in values}
    return Layout([_label(rows, v, folder) for v in row_values], labels, placed, captions,
                  [a for a in others if a in split_any], fixed, (rows, columns), folder,
                  [] if "prompt" in fixed else _shortened_prompts(cells))


def _shortened_prompts(cells: Sequence[Cell]) -> list[str]:
    return [p for p in _order([_value("prompt", c) for c in cells]) if _label("prompt", p) != repr(p)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


NO_SPLIT = "none"  # the "split by" choice of one grid


def split_groups(cells: Sequence[Cell], rows: str, columns: str, split: str) -> list[tuple[str, list[Cell]]]:
    """(label, cells) of each grid that `split` (an axis, or NO_SPLIT) makes: one per value of it,
    in its order, each laid out by `rows` and `columns` on its own."""
    if not split or split == NO_SPLIT:
        return [("", list(cells))]
    _check_axes(rows, columns)
    if split not in AXES:
        raise UserError(f"unknown axis to split by {split!r}: use one of {', '.join(AXES)} or {NO_SPLIT}")
    if split in (rows, columns):
        raise UserError(f"the grid is split by {split!r}, which is already its {'rows' if split == rows else 'columns'}"
                        ": choose another axis, or none")
    folder = _shared_folder([c for c in cells if not is_base(c)])
    return [(f"{split}: {_label(split, value, folder)}", [c for c in cells if _value(split, c) == value])
            for value in _order([_value(split, c) for c in cells])]


def stacked(pictures: Sequence[Image.Image], gap: int = 12) -> Image.Image:
    """The pictures one below the other on white, left-aligned, `gap` pixels apart."""
    if len(pictures) == 1:
        return pictures[0]
    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)
                               + gap * (len(pictures) - 1)), "white")
    top = 0
    for picture in pictures:
        canvas.paste(picture, (0, top))
        top += picture.height + gap
    return canvas


def render(engine: Engine, cells: Sequence[Cell], rows: str, columns: str,
           progress: Callable[[int, int], None] = lambda done, total: None,
           split: str = NO_SPLIT) -> tuple[Image.Image, str]:
    """The labelled grid of `cells` (with `split`, one grid per value of that axis, one below the
    other) and the path of its PNG in the cache (for download), named by its axes and first prompt."""
    grids = [(label, layout(group, rows, columns)) for label, group in split_groups(cells, rows, columns, split)]
    images: dict[tuple[int, int, int], Image.Image] = {}
    # by adapter, so that each is swapped in once
    order = sorted(((k, where, cell) for k, (_, grid) in enumerate(grids) for where, cell in grid.placed.items()),
                   key=lambda item: (item[2].run.name, str(item[2].step)))
    for done, (k, where, cell) in enumerate(order):
        progress(done, len(order))
        images[k, *where] = engine.draw(None if is_base(cell) else cell.run.path, cell.weight, cell.sampling, cell.step)
    progress(len(order), len(order))
    size = next(iter(images.values())).size
    blank = Image.new("RGB", size, (200, 200, 200))
    negative = cells[0].sampling.negative_prompt
    pictures = []
    for k, (label, grid) in enumerate(grids):
        grid_rows = [[images.get((k, i, j), blank) for j in range(len(grid.columns))] for i in range(len(grid.rows))]
        title = "; ".join(filter(None, [label, grid.title(negative)]))
        pictures.append(image_grid(grid_rows, grid.rows, grid.columns, title=title, captions=grid.captions))
    picture = stacked(pictures)
    first = cells[0].prompt or cells[0].sampling.prompt
    by = f"-split-{_slug(split)}" if len(grids) > 1 or grids[0][0] else ""
    name = (f"{_slug(rows)}-by-{_slug(columns)}{by}-{_slug(first)[:40]}-"
            f"{hashlib.sha256(picture.tobytes()).hexdigest()[:12]}.png")
    path = engine.cache / "grids" / name
    if own_file(engine.cache, Path("grids", name)) is None:
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
    return picture, str(path)
