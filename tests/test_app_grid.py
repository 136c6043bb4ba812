"""The Compare grid's layout and labels, without a model: cells of made-up runs, and an engine
that draws a flat colour per cell."""
from pathlib import Path

import numpy as np
from PIL import Image

from balora_diffusion.app.compare import Cell, layout, render
from balora_diffusion.app.engine import Sampling
from balora_diffusion.generate import image_grid
from balora_diffusion.runs import RunInfo

PROMPT = "a <zorb>"
CELL, PAD = 96, 4  # image_grid's cell and padding for 16 px images


def cell(name, lr, method, weight, seed=1, rank=4, steps=3):
    run = RunInfo(name=name, path=Path(name), state="finished", method=method, lr_unet=lr, rank=rank, steps=steps)
    return Cell(run, weight, Sampling(PROMPT, seed=seed))


def sweep(extra=()) -> list[Cell]:
    """3 methods x 2 learning rates at fusion 0.7 and 1, and the runs in `extra` (name, lr, method, steps)."""
    runs = [(f"sweep/lr{lr:g}-{m}", lr, m, 3) for lr in (1e-3, 1e-2) for m in ("lora", "ilora", "balora")]
    return [cell(name, lr, m, w, steps=steps) for name, lr, m, steps in [*runs, *extra] for w in (0.7, 1.0)]


def test_one_more_run_of_a_swept_setting_splits_only_its_own_column():
    # alike on every axis: the two runs share a column slot, told apart by their names in the cells
    grid = layout(sweep([("sweep/lr0.001-lora-again", 1e-3, "lora", 3)]), "learning rate", "method")
    assert grid.rows == ["lr 0.001", "lr 0.01"]
    assert grid.columns == ["balora · w=0.7", "balora · w=1", "ilora · w=0.7", "ilora · w=1",
                            "lora · w=0.7", "lora · w=0.7", "lora · w=1", "lora · w=1"]
    assert len(grid.placed) == 14 and {(1, 5), (1, 7)}.isdisjoint(grid.placed)
    assert {grid.captions[0, j] for j in (4, 6)} == {"lr0.001-lora"}
    assert {grid.captions[0, j] for j in (5, 7)} == {"lr0.001-lora-again"}
    assert all(j >= 4 for _, j in grid.captions)
    # a run that differs on an axis (here its training steps) splits its column by that axis
    grid = layout(sweep([("sweep/lr0.001-lora-long", 1e-3, "lora", 30)]), "learning rate", "method")
    assert grid.columns[4:] == ["lora · w=0.7 · 3 steps", "lora · w=0.7 · 30 steps",
                                "lora · w=1 · 3 steps", "lora · w=1 · 30 steps"]
    assert len(grid.columns) == 8 and not grid.captions


def test_an_axis_that_follows_the_rows_does_not_split_the_columns():
    # a run has one method: rows = run, columns = fusion is runs x fusions, nothing else
    grid = layout(sweep(), "run", "fusion")
    assert grid.columns == ["w=0.7", "w=1"] and len(grid.rows) == 6 and len(grid.placed) == 12
    assert grid.fixed == ["rank 4", "train seed 0", "3 steps", "seed 1"]


def test_every_fixed_setting_is_in_the_title_and_the_file_name_says_what_the_grid_is(tmp_path):
    cells = [cell("sweep/lr0.001-lora", 1e-3, "lora", 1.0), cell("sweep/lr0.01-lora", 1e-2, "lora", 1.0)]
    grid = layout(cells, "learning rate", "method")
    assert grid.fixed == ["w=1", "rank 4", "train seed 0", "3 steps", "seed 1"]
    image, path = render(FlatEngine(tmp_path), cells, "learning rate", "method")
    assert Path(path).name.startswith("learning-rate-by-method-a-zorb-")
    assert grid.title(cells[0].sampling) == ("'a <zorb>'; 20 sampling steps, guidance 5; rows: learning rate, "
                                              "columns: method; every cell: w=1, rank 4, train seed 0, "
                                              "3 steps, seed 1; runs in sweep/")


def test_long_labels_and_captions_stay_in_their_own_column():
    names = [f"experiments/concept-zorb/lr{lr:g}-lora-rank4-seed0" for lr in (1e-3, 2e-3, 4e-3)]
    tiles = [[Image.new("RGB", (16, 16), "white")] * 3]
    image = image_grid(tiles, ["lora"], names, captions={(0, j): name for j, name in enumerate(names)})
    pixels = np.asarray(image.convert("L"))
    label_w = image.width - 3 * (CELL + PAD) - PAD
    for j in range(1, 3):  # the gap between two columns holds no text
        gap = label_w + j * (CELL + PAD) - PAD
        assert (pixels[:, gap:gap + PAD] > 200).all(), f"a label runs into column {j}"


def test_captions_and_run_labels_leave_out_the_folder_all_the_runs_share():
    grid = layout(sweep([("sweep/lr0.001-lora-again", 1e-3, "lora", 3)]), "learning rate", "method")
    assert grid.captions[0, 4] == "lr0.001-lora" and grid.captions[0, 5] == "lr0.001-lora-again"
    assert grid.title(Sampling(PROMPT)).endswith("; runs in sweep/")
    assert layout(sweep(), "run", "fusion").rows[:2] == ["lr0.001-balora", "lr0.001-ilora"]


class FlatEngine:
    """Draws each run in its own grey, in no time."""

    def __init__(self, cache: Path):
        self.cache = cache

    def draw(self, run: Path, weight: float, sampling: Sampling) -> Image.Image:
        return Image.new("RGB", (16, 16), (hash(str(run)) % 200,) * 3)
