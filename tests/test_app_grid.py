"""The Compare grid's layout and labels, without a model: cells of made-up runs, and an engine
that draws a flat colour per cell."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from balora_diffusion.app.compare import BASE, Cell, adapters_of, base_prompt, cells_for, layout, render, samplings
from balora_diffusion.app.engine import Sampling
from balora_diffusion.errors import UserError
from balora_diffusion.generate import image_grid
from balora_diffusion.runs import RunInfo

PROMPT = "a <zorb>"
CELL, PAD = 96, 4  # image_grid's cell and padding for 16 px images


def run_info(name, lr=1e-3, method="lora", rank=4, steps=3, path=None):
    return RunInfo(name=name, path=Path(path or name), state="finished", method=method, lr_unet=lr, rank=rank,
                   steps=steps, tokens=["<zorb>"], init_word="heart")


def cell(name, lr, method, weight, seed=1, rank=4, steps=3):
    return Cell(run_info(name, lr, method, rank, steps), weight, Sampling(PROMPT, seed=seed))


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
    assert grid.fixed == {"rank": 4, "training seed": 0, "training steps": 3, "prompt": PROMPT, "sampling steps": 20,
                          "guidance": 5.0, "sampling seed": 1}


def test_every_fixed_setting_is_in_the_title_and_the_file_name_says_what_the_grid_is(tmp_path):
    cells = [cell("sweep/lr0.001-lora", 1e-3, "lora", 1.0), cell("sweep/lr0.01-lora", 1e-2, "lora", 1.0)]
    grid = layout(cells, "learning rate", "method")
    assert list(grid.fixed) == ["fusion", "rank", "training seed", "training steps", "prompt", "sampling steps",
                                "guidance", "sampling seed"]
    image, path = render(FlatEngine(tmp_path), cells, "learning rate", "method")
    assert Path(path).name.startswith("learning-rate-by-method-a-zorb-")
    assert grid.title() == ("'a <zorb>'; 20 sampling steps, guidance 5; rows: learning rate, "
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
    assert grid.title().endswith("; runs in sweep/")
    assert layout(sweep(), "run", "fusion").rows[:2] == ["lr0.001-balora", "lr0.001-ilora"]


def test_the_base_model_draws_the_init_word_for_the_token_and_says_so():
    runs = [run_info("sweep/lr0.001-lora"), run_info("sweep/lr0.01-lora", lr=1e-2)]
    assert base_prompt("a <zorb> on a <zorbette>", runs) == ("a heart on a <zorbette>", "base model: heart for <zorb>")
    assert base_prompt("a cat", runs) == ("a cat", "base model: prompt as typed")
    cells = cells_for(runs, [0.7, 1.0], samplings([PROMPT], "", [20], [5.0], [1]), base=True)
    (base,) = [c for c in cells if c.weight is None]
    assert (base.sampling.prompt, base.prompt, base.step) == ("a heart", PROMPT, 0)
    grid = layout(cells, "learning rate", "method")
    assert grid.rows == ["lr 0.001", "lr 0.01", "?"] and grid.columns == [BASE, "lora · w=0.7", "lora · w=1"]
    assert grid.placed[2, 0] is base and grid.captions == {(2, 0): "base model: heart for <zorb>"}
    # what the runs share is still said once; the base model has no rank
    assert grid.title() == ("'a <zorb>'; 20 sampling steps, guidance 5; rows: learning rate, columns: method split by fusion; "
                            "every cell: seed 1; runs in sweep/")
    assert layout(cells, "run", "fusion").columns == ["w=0.7", "w=1", "no LoRA"]


def test_checkpoints_are_an_axis_from_the_base_model_to_the_final_adapter(tmp_path):
    for step in (1, 2, 3):  # the last checkpoint of a finished run is its final adapter
        (tmp_path / "run" / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    run = run_info("run", path=tmp_path / "run")
    assert adapters_of(run, False) == [None] and adapters_of(run, True) == [1, 2, None]
    stopped = run_info("stopped", path=tmp_path / "run")
    stopped.state = "stopped"
    assert adapters_of(stopped, True) == [1, 2, 3]
    with pytest.raises(UserError, match="neither an adapter nor a checkpoint"):
        adapters_of(replace(stopped, path=tmp_path / "elsewhere"), True)
    cells = cells_for([run], [1.0], samplings([PROMPT], "", [20], [5.0], [1]), base=True, with_checkpoints=True)
    grid = layout(cells, "run", "checkpoint")
    assert grid.columns == [BASE, "step 1", "step 2", "final"] and len(grid.placed) == 4
    image, _ = render(FlatEngine(tmp_path), cells, "run", "checkpoint")
    tiles = np.asarray(image.convert("L"))[-CELL - PAD:-PAD - 30, :]  # above the captions
    assert len({tiles[:, -(j + 1) * (CELL + PAD) + 8].mean() for j in range(4)}) == 4, "each cell drawn from its own"


def test_prompts_sampling_steps_and_guidances_are_axes_and_leave_the_title_when_they_vary():
    drawn = samplings(["a <zorb>", "a <zorb> on a beach"], "", [20, 30], [5.0, 7.5], [1])
    assert len(drawn) == 8
    cells = cells_for([run_info("a")], [1.0], drawn, base=True)
    grid = layout(cells, "prompt", "sampling steps")
    assert grid.rows == ["'a <zorb>'", "'a <zorb> on a beach'"] and grid.split == ["guidance"]
    # the base model beside each run, in a column of its own captioned as such, not split by every run attribute
    assert grid.columns == [f"{n} sampling steps · guidance {g}" for n in (20, 30) for g in (5, 5, 7.5, 7.5)]
    assert [grid.captions[0, j] for j in range(4)] == ["a", "base model: heart for <zorb>"] * 2
    assert grid.title() == "rows: prompt, columns: sampling steps split by guidance; every cell: seed 1"
    grid = layout(cells_for([run_info("a")], [1.0], drawn), "guidance", "sampling steps")
    assert grid.rows == ["guidance 5", "guidance 7.5"] and grid.columns == [
        "20 sampling steps · 'a <zorb>'", "20 sampling steps · 'a <zorb> on a beach'",
        "30 sampling steps · 'a <zorb>'", "30 sampling steps · 'a <zorb> on a beach'"]
    assert grid.title() == ("rows: guidance, columns: sampling steps split by prompt; every cell: lr 0.001, lora, w=1, "
                            "rank 4, train seed 0, 3 steps, seed 1")
    long = layout(cells_for([run_info("a")], [1.0], samplings(["x" * 100], "", [20], [5.0], [1])), "prompt", "run")
    assert long.rows == ["'" + "x" * 38 + "…"] and long.title().endswith("; prompts in full: " + repr("x" * 100))


class FlatEngine:
    """Draws each run in its own grey, in no time."""

    def __init__(self, cache: Path):
        self.cache = cache

    def draw(self, run: Path | None, weight: float | None, sampling: Sampling, step: int | None = None) -> Image.Image:
        return Image.new("RGB", (16, 16), (hash((str(run), step)) % 200,) * 3)
