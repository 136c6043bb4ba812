"""A folder written by `balora fuse --out` in the runs folder is a run of Compare: drawn against
the adapters it was fused from, rows = adapters, columns = each concept's prompt; and the grid
split by a third axis ("split by"), one grid per value."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion.cli import main as cli_main
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import TEXT_ENCODER, UNET, Adapter, LoraModule
from balora_diffusion.formats.run_files import write_run_adapters

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")

from balora_diffusion.app.app import App  # noqa: E402
from balora_diffusion.app.compare import layout, split_groups  # noqa: E402

# (part, path, weight shape) of the random-weight model: attention of the UNet and of the text encoder
LAYERS = [(UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (32, 32)),
          (UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
          (TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj", (32, 32))]


def _part(folder: Path, token: str, seed: int, prompt: str) -> None:
    """A run folder holding one concept's adapter (as a training writes it) and its prompt."""
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(tokens=[token], embedding=torch.randn(1, 32, generator=gen), info={"token": [token]})
    for part, path, shape in LAYERS:
        adapter.parts()[part][path] = LoraModule(torch.randn(2, shape[1], generator=gen) * 0.3,
                                                 torch.randn(shape[0], 2, generator=gen) * 0.3, alpha=3.0)
    folder.mkdir(parents=True)
    write_run_adapters(folder, adapter)
    (folder / "run.json").write_text(json.dumps({"method": "lora", "config": {
        "token": [token], "rank": 2, "method": "lora", "grid_prompts": [prompt], "init_word": "thing"}}))


@pytest.fixture(scope="module")
def app(tmp_path_factory, random_sd_dir) -> App:
    runs = tmp_path_factory.mktemp("fused") / "runs"
    _part(runs / "aaa", "<aaa>", 1, "a <aaa> on a blue background")
    _part(runs / "bbb", "<bbb>", 2, "a large <bbb>")
    prompts = runs.parent / "prompts.txt"
    prompts.write_text("a <aaa> on a blue background\na small <aaa>\na large <bbb>\na <bbb> on a white background\n")
    assert cli_main(["fuse", "--base-model", str(random_sd_dir), "--steps", "2", "--adapter", str(runs / "aaa"),
                     str(runs / "bbb"), "--out", str(runs / "aaa+bbb"), "--prompts-file", str(prompts)]) == 0
    return App(runs, str(random_sd_dir), device="cpu", cpu_threads=1)


def test_a_fused_adapter_is_compared_with_its_parts_over_each_concepts_prompt(app):
    listed = {r["name"]: r for r in app.list_runs()}
    assert listed["aaa+bbb"]["state"] == "finished" and listed["aaa+bbb"]["method"] == "fuse-gradient"
    assert listed["aaa+bbb"]["tokens"] == ["<aaa>", "<bbb>"]
    runs = ["aaa", "bbb", "aaa+bbb"]
    prompts = app.prompts_of(runs)
    assert prompts == "a <aaa> on a blue background\na large <bbb>"
    image, png = app.compare(runs, "run", "prompt", prompts, "", "1", 2, 5.0, "1")
    grid = layout(_cells(app, runs, prompts), "run", "prompt")
    assert grid.rows == ["aaa", "aaa+bbb", "bbb"] and len(grid.columns) == 2 and len(grid.placed) == 6
    assert grid.split == []
    # the fused adapter draws something else than either part, on each concept's own prompt
    for column in range(2):
        fused = np.asarray(app.engine.draw(grid.placed[1, column].run.path, 1.0, grid.placed[1, column].sampling))
        for row in (0, 2):
            part = app.engine.draw(grid.placed[row, column].run.path, 1.0, grid.placed[row, column].sampling)
            assert not np.array_equal(fused, np.asarray(part))
    assert Image.open(png).size == image.size


def _cells(app, runs, prompts):
    from balora_diffusion.app import compare as grids
    from balora_diffusion.runs import read_run

    drawn = grids.samplings(prompts.splitlines(), "", [2], [5.0], [1])
    return grids.cells_for([read_run(app.runs, n) for n in runs], [1.0], drawn)


def test_split_by_draws_one_grid_per_value_of_the_third_axis(app):
    runs, prompts = ["aaa", "bbb", "aaa+bbb"], "a <aaa> on a blue background\na large <bbb>"
    single, _ = app.compare(runs, "run", "fusion", prompts, "", "1", 2, 5.0, "0.5, 1")
    split, png = app.compare(runs, "run", "fusion", prompts, "", "1", 2, 5.0, "0.5, 1", split="prompt")
    groups = split_groups(_cells(app, runs, prompts), "run", "fusion", "prompt")
    assert [label for label, _ in groups] == ["prompt: 'a <aaa> on a blue background'", "prompt: 'a large <bbb>'"]
    # unsplit, the two prompts split each fusion column in two; split, each grid has one prompt
    assert layout(_cells(app, runs, prompts), "run", "fusion").split == ["prompt"]
    assert [layout(group, "run", "fusion").fixed["prompt"] for _, group in groups] == prompts.splitlines()
    assert split.height > single.height and split.width < single.width
    assert "-split-prompt-" in Path(png).name
    with pytest.raises(UserError, match="already its rows"):
        app.compare(runs, "run", "fusion", prompts, "", "1", 2, 5.0, "1", split="run")
    with pytest.raises(UserError, match="unknown axis to split by"):
        app.compare(runs, "run", "fusion", prompts, "", "1", 2, 5.0, "1", split="colour")
