"""The app's Compare path and `balora sweep` on the newer kinds of run: an SDXL run (drawn by an app on
the SDXL base model) and a DoRA run draw the image `balora generate` draws, and a sweep runs on an SDXL
base model."""
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.cli import main
from balora_diffusion.errors import UserError
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")

from balora_diffusion.app.app import App  # noqa: E402
from balora_diffusion.app.engine import Sampling  # noqa: E402

PROMPT, SEED, STEPS, STRENGTH = "a <zorb>", 3, 2, 1.0


def _train(model, out, **kw):
    return train(TrainConfig(**{**dict(
        data_dir=str(paths.DEMO_CONCEPT), base_model=str(model), token=["<zorb>"], init_word="heart",
        caption_template="a {token}", output_dir=str(out), steps=2, batch_size=2, lr_unet=1e-2, lr_text=1e-3,
        lr_embedding=1e-2, eval_every=2, checkpoint_every=2, heldout_size=2, grid_seeds=[1], fusion=[1.0],
        sample_steps=1, seed=0, cpu_threads=1), **kw}))


@pytest.fixture(scope="module")
def runs(tiny_sdxl, random_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("surfaces") / "runs"
    _train(tiny_sdxl, root / "xl")
    _train(random_sd_dir, root / "dora", adapter_kind="dora", unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    return root


def _generated(run, model, out) -> np.ndarray:
    assert main(["generate", "--adapter", str(run), "--base-model", str(model), "--prompt", PROMPT, "--seeds",
                 str(SEED), "--steps", str(STEPS), "--fusion", str(STRENGTH), "--out", str(out),
                 "--device", "cpu"]) == 0
    (record,) = json.loads((out / "generate.json").read_text())["images"]
    return np.asarray(Image.open(out / record["file"]).convert("RGB"))


@pytest.mark.parametrize("name, model", [("xl", "tiny_sdxl"), ("dora", "random_sd_dir")])
def test_compare_draws_what_generate_draws_and_not_the_base_models_image(name, model, runs, request, tmp_path):
    model = request.getfixturevalue(model)
    app = App(runs, str(model), device="cpu", cpu_threads=1)
    grid, png = app.compare([name, "base model"], "run", "fusion", PROMPT, "", str(SEED), STEPS, 5.0,
                            str(STRENGTH))
    assert grid.size[0] > 0 and (runs / ".app-cache" / "grids").is_dir() and png.endswith(".png")
    sampling = Sampling(PROMPT, seed=SEED, steps=STEPS, guidance=5.0)
    drawn = app.engine.cached(app.engine.image_key(runs / name, STRENGTH, sampling))
    assert drawn is not None, "the grid's cell is the engine's image of the run"
    drawn = np.asarray(drawn)
    assert np.array_equal(drawn, _generated(runs / name, model, tmp_path / "gen"))
    # the grid's base-model cell draws the init word for the token
    base = app.engine.cached(app.engine.image_key(None, None, replace(sampling, prompt="a heart")))
    assert base is not None and np.abs(drawn.astype(int) - np.asarray(base).astype(int)).mean() > 0.5
    # and the adapter's weights, not only its token, draw the run's image
    assert not np.array_equal(drawn, np.asarray(app.engine.draw(runs / name, 0.0, sampling)))


def test_a_run_of_another_family_than_the_apps_base_model_is_one_error(runs, random_sd_dir):
    app = App(runs, str(random_sd_dir), device="cpu", cpu_threads=1)
    with pytest.raises(UserError, match="names no layer of the base model"):
        app.compare(["xl"], "run", "fusion", PROMPT, "", str(SEED), STEPS, 5.0, str(STRENGTH))


def test_a_sweep_runs_on_an_sdxl_base_model(tiny_sdxl, tmp_path):
    out = tmp_path / "grid"
    assert main(["sweep", "--set", f"data_dir={paths.DEMO_CONCEPT}", f"base_model={tiny_sdxl}", "token=<zorb>",
                 "init_word=heart", "steps=2", "eval_every=1", "checkpoint_every=1", "sample_steps=1", "grid_seeds=1",
                 "fusion=1", "heldout_size=2", "batch_size=2", "cpu_threads=1", "--methods", "lora",
                 "--lrs", "1", "3", "--unseen-contexts", "1", "--out", str(out)]) == 0
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert [c["name"] for c in cells] == ["lora-lrx1-s0", "lora-lrx3-s0"]
    for c in cells:
        assert c["status"] == "done", c
        assert (out / c["name"] / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        assert [s for s, _ in c["heldout_loss"]] == [0, 1, 2]
        assert 0 <= c["fidelity"]["1"] <= 1 and 0 <= c["adherence"]["1"]["all"] <= 1  # scored on SDXL too
    assert (out / "summary.md").is_file()
