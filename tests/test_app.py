"""The Gradio app: its callbacks as plain functions, its named endpoints through gradio_client on
127.0.0.1, and the page itself in a real headless browser (Debian's chromium, driven by playwright).

Runs are trained on the random-weight SD-architecture model (16 px images), a few steps each.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.cli import main as cli_main
from balora_diffusion.errors import UserError
from balora_diffusion.runs import RunInfo
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig

gr = pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")

from balora_diffusion.app import training  # noqa: E402
from balora_diffusion.app.app import App, parse_numbers, serve  # noqa: E402
from balora_diffusion.app.compare import Cell, layout  # noqa: E402
from balora_diffusion.app.engine import Sampling  # noqa: E402
from balora_diffusion.app.screenshot import CHROMIUM, free_port, launch_chromium  # noqa: E402

LRS, METHODS = [1e-3, 1e-2], ["lora", "balora"]
QUICK = dict(token=["<zorb>"], init_word="heart", caption_template="a {token}", flip=False, steps=3, batch_size=2,
             lr_text=1e-3, lr_embedding=1e-2, eval_every=3, checkpoint_every=1, heldout_size=2, grid_seeds=[1],
             fusion=[1.0], sample_steps=2, cpu_threads=1)
PROMPT = "a <zorb>"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, random_sd_dir) -> Path:
    """A 2 x 2 sweep (learning rate x method) in runs/sweep/, and an unfinished run beside it."""
    root = tmp_path_factory.mktemp("app") / "runs"
    for lr in LRS:
        for method in METHODS:
            train(TrainConfig(data_dir=str(paths.DEMO_CONCEPT), base_model=str(random_sd_dir), method=method,
                              lr_unet=lr, output_dir=str(root / "sweep" / f"lr{lr:g}-{method}"), **QUICK))
    unfinished = root / "unfinished"
    shutil.copytree(root / "sweep" / f"lr{LRS[0]:g}-lora", unfinished, ignore=shutil.ignore_patterns("run.json", "adapter"))
    return root


@pytest.fixture(scope="module")
def app(runs, random_sd_dir) -> App:
    return App(runs, str(random_sd_dir), device="cpu", cpu_threads=1)


def sweep_names() -> list[str]:
    return [f"sweep/lr{lr:g}-{m}" for lr in LRS for m in METHODS]


def reference_image(model, run: Path | None, weight: float, seed: int = 1, steps: int = 2,
                    prompt: str = PROMPT) -> np.ndarray:
    """The image a user gets from the run's files with diffusers alone, strength through
    cross_attention_kwargs (which scales the UNet and, in encode_prompt, the text-encoder LoRA);
    `run` None: the base model alone."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if run is not None:
        pipe.load_lora_weights(str(run / "adapter"), weight_name=LORA_FILE)
        (embedding,) = [p for p in (run / "adapter").glob("*.safetensors") if p.name != LORA_FILE]
        pipe.load_textual_inversion(str(embedding), token="<zorb>", tokenizer=pipe.tokenizer,
                                    text_encoder=pipe.text_encoder)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
               cross_attention_kwargs={"scale": weight})
    return np.asarray(out.images[0], dtype=np.float64)


# ---------------------------------------------------------------- callbacks as plain functions

def test_list_runs_summarises_every_run(app):
    listed = {r["name"]: r for r in app.list_runs()}
    assert set(listed) == {*sweep_names(), "unfinished"}
    one = listed[f"sweep/lr{LRS[1]:g}-balora"]
    assert (one["method"], one["lr_unet"], one["rank"], one["steps"], one["step"], one["state"]) == \
        ("balora", LRS[1], 4, 3, 3, "finished")
    assert one["heldout_loss"] > 0
    assert listed["unfinished"]["state"] == "stopped"
    assert app.finished() == sorted(sweep_names())


def test_each_image_is_what_diffusers_draws_from_the_runs_files_whatever_was_drawn_before(app, runs, random_sd_dir):
    sampling = Sampling(PROMPT, steps=2)
    a, b = runs / "sweep" / f"lr{LRS[1]:g}-lora", runs / "sweep" / f"lr{LRS[1]:g}-balora"
    drawn = {}
    for run, weight in [(a, 1.0), (b, 1.0), (a, 0.5), (b, 0.0)]:  # every draw swaps the adapter or its strength
        drawn[run, weight] = np.asarray(app.engine.draw(run, weight, sampling), dtype=np.float64)
    for (run, weight), image in drawn.items():
        assert np.abs(image - reference_image(random_sd_dir, run, weight)).mean() < 1.0, (run.name, weight)
    assert np.abs(drawn[a, 1.0] - drawn[a, 0.5]).mean() > 1.0, "the strength changes the image"
    assert np.abs(drawn[a, 1.0] - drawn[b, 1.0]).mean() > 1.0, "two runs draw different images"


def test_compare_lays_out_learning_rates_by_methods_at_two_strengths_and_caches_on_disk(app, runs, random_sd_dir):
    steps = []
    grid, path = app.compare(sweep_names(), "learning rate", "method", PROMPT, "", "1", 2, 5.0, "0.5, 1",
                             progress=lambda done, total: steps.append((done, total)))
    assert steps[0] == (0, 8) and steps[-1] == (8, 8)
    assert Image.open(path).size == grid.size
    cell = 96  # image_grid's cell size for 16 px images
    assert grid.width > 4 * cell and grid.height > 2 * cell
    # restart: a new app over the same folder draws the same grid without the model
    again = App(runs, str(random_sd_dir), device="cpu", cpu_threads=1)
    again.engine.pipeline = lambda: pytest.fail("a cached grid must not load the model")
    grid2, _ = again.compare(sweep_names(), "learning rate", "method", PROMPT, "", "1", 2, 5.0, "0.5, 1")
    assert np.array_equal(np.asarray(grid), np.asarray(grid2))
    with pytest.raises(pytest.fail.Exception, match="must not load"):
        again.compare(sweep_names(), "learning rate", "method", PROMPT + " again", "", "1", 2, 5.0, "0.5, 1")


def test_the_base_model_and_a_runs_checkpoints_are_drawn_from_what_they_are(app, runs, random_sd_dir):
    run, sampling = runs / "sweep" / f"lr{LRS[1]:g}-lora", Sampling(PROMPT, steps=2)
    # after a run, without its adapter: what diffusers draws from the base model, the token's init word in the prompt
    app.engine.draw(run, 1.0, sampling)
    base = np.asarray(app.engine.draw(None, None, replace(sampling, prompt="a heart")), dtype=np.float64)
    assert np.abs(base - reference_image(random_sd_dir, None, 1.0, prompt="a heart")).mean() < 1.0
    final = np.asarray(app.engine.draw(run, 1.0, sampling), dtype=np.float64)
    last, before = (np.asarray(app.engine.draw(run, 1.0, sampling, step), dtype=np.float64) for step in (3, 2))
    assert np.abs(last - final).mean() < 1.0, "the last checkpoint holds the final adapter"
    assert np.abs(before - final).mean() > 1.0, "an earlier checkpoint draws what the run had learned by then"
    keys = {app.engine.image_key(run, 1.0, sampling, step) for step in (None, 2, 3)}
    assert len(keys | {app.engine.image_key(None, None, sampling)}) == 4


def test_compare_draws_the_base_model_checkpoints_prompts_steps_and_guidances(app):
    def images(runs, prompt=PROMPT, steps="2", guidance="5", checkpoints=False) -> int:
        done = []
        app.compare(runs, "prompt", "checkpoint", prompt, "", "1", steps, guidance, "1", checkpoints,
                    progress=lambda n, total: done.append(total))
        return done[-1]

    lora = f"sweep/lr{LRS[1]:g}-lora"
    assert images([lora, "base model"]) == 2
    # its checkpoints before the last (step 2 of 3) and its final adapter, each for two prompts; the base model too
    assert images([lora, "base model"], PROMPT + "\n\n a <zorb> on a beach ", checkpoints=True) == 6
    assert images([lora], steps="2, 3", guidance="5, 7.5") == 4
    assert images(["unfinished"], checkpoints=True) == 2  # a stopped run: its checkpoints only
    with pytest.raises(UserError, match="sampling steps must be an integer from 1 to 200, got '0'"):
        images([lora], steps="2, 0")
    with pytest.raises(UserError, match="guidance must be a number from 0 to 30, got 'x'"):
        images([lora], guidance="5 x")
    with pytest.raises(UserError, match="prompt is 1001 characters"):
        images([lora], PROMPT + "\n" + "x" * 1001)


def test_every_input_of_an_image_is_in_its_cache_key(app, runs, tmp_path):
    run = runs / "sweep" / f"lr{LRS[0]:g}-lora"
    base = Sampling(PROMPT, "", 1, 2, 5.0)
    variants = [replace(base, prompt="x"), replace(base, negative_prompt="x"), replace(base, seed=2),
                replace(base, steps=3), replace(base, guidance=4.0)]
    keys = {app.engine.image_key(run, 1.0, s) for s in [base, *variants]} | {app.engine.image_key(run, 0.5, base)}
    assert len(keys) == len(variants) + 2
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert app.engine.image_key(other, 1.0, base) == app.engine.image_key(run, 1.0, base)  # content, not path
    emb = other / "adapter" / "zorb.safetensors"
    emb.write_bytes(emb.read_bytes()[:-4] + b"\0\0\0\1")
    assert app.engine.image_key(other, 1.0, base) != app.engine.image_key(run, 1.0, base)


def _cell(name, lr, method, weight, seed=1, rank=4):
    run = RunInfo(name=name, path=Path(name), state="finished", method=method, lr_unet=lr, rank=rank)
    return Cell(run, weight, Sampling(PROMPT, seed=seed))


def test_layout_puts_every_image_in_its_own_cell():
    cells = [_cell(f"{m}{lr}", lr, m, w) for lr in (1e-2, 1e-3) for m in ("lora", "balora") for w in (1.0, 0.7)]
    grid = layout(cells, "learning rate", "method")
    assert grid.rows == ["lr 0.001", "lr 0.01"]
    assert grid.columns == ["balora · w=0.7", "balora · w=1", "lora · w=0.7", "lora · w=1"]
    assert len(grid.placed) == len(cells)
    for (i, j), cell in grid.placed.items():
        assert grid.rows[i] == f"lr {cell.run.lr_unet:g}" and grid.columns[j] == f"{cell.run.method} · w={cell.weight:g}"
    # runs that differ on no axis share a split column, each cell captioned with its run's name
    twins = [_cell("a", 1e-3, "lora", 1.0), _cell("b", 1e-3, "lora", 1.0)]
    grid = layout(twins, "learning rate", "method")
    assert grid.columns == ["lora", "lora"] and grid.captions == {(0, 0): "a", (0, 1): "b"}
    # a missing combination (lr 0.001 with balora) stays empty
    grid = layout(cells[:-2], "learning rate", "method")
    assert len(grid.placed) == 6 and (0, 0) not in grid.placed and (0, 1) not in grid.placed and (0, 2) in grid.placed
    with pytest.raises(UserError, match="both 'method'"):
        layout(cells, "method", "method")
    with pytest.raises(UserError, match="unknown axis 'colour'"):
        layout(cells, "colour", "method")


def test_bad_compare_inputs_are_one_clear_message(app):
    args = dict(runs=sweep_names()[:1], rows="learning rate", columns="method", prompt=PROMPT, negative_prompt="",
                seeds="1", steps=2, guidance=5.0, fusion="1")
    for change, message in [({"runs": []}, "choose at least one run"), ({"prompt": " "}, "prompt is empty"),
                            ({"seeds": "1, x"}, "seeds: expected integers"), ({"fusion": "nan"}, "finite"),
                            ({"runs": ["../sweep"]}, "not a run name"), ({"runs": ["unfinished"]}, "no adapter yet"),
                            ({"steps": 0}, "sampling steps must be an integer from 1 to 200"),
                            ({"seeds": ", ".join(map(str, range(500)))}, "at most 400"),
                            # a cleared number box arrives as None
                            ({"steps": None}, "sampling steps must be"), ({"guidance": None}, "guidance must be"),
                            ({"seeds": None}, "seeds: expected integers"), ({"steps": 2.5}, "must be an integer"),
                            ({"seeds": str(2**63)}, "seeds must be 0 to"), ({"seeds": "-1"}, "seeds must be 0 to"),
                            ({"prompt": "a <zorb> " * 100_000}, "prompt is 899999 characters; at most 1000"),
                            ({"negative_prompt": "x" * 1001}, "negative prompt is 1001 characters"),
                            ({"prompt": "word " * 80 + "<zorb>"}, "prompt is 83 tokens and <zorb> falls past"),
                            ({"negative_prompt": "word " * 80 + "<zorb>"}, "negative prompt is 83 tokens")]:
        with pytest.raises(UserError, match=message):
            app.compare(**{**args, **change})
    # the token is no word of the base tokenizer's: it counts as one token, as the run's pipeline reads it
    app.compare(**{**args, "prompt": "word " * 74 + "<zorb>"})
    assert parse_numbers("0.7 1,0", float, "x") == [0.7, 1.0, 0.0]


def test_a_finished_run_joins_the_chosen_runs_of_its_token_with_its_own_prompt(app, runs):
    other = runs / "other-token"
    shutil.copytree(runs / sweep_names()[0], other)
    for name in ("run.json", "config.json"):
        (other / name).write_text((other / name).read_text().replace("<zorb>", "<blip>"))
    try:
        chosen = ["other-token", "unfinished", "removed", sweep_names()[1]]
        assert app.selection_with(sweep_names()[0], chosen) == ([sweep_names()[1], sweep_names()[0]], "a <zorb>")
        assert app.selection_with("other-token", sweep_names()) == (["other-token"], "a <blip>")
    finally:
        shutil.rmtree(other)


def test_the_runs_table_shows_numbers_as_typed(tmp_path, runs, random_sd_dir):
    shutil.copytree(runs / sweep_names()[0], tmp_path / "runs" / "r")
    for name in ("run.json", "config.json"):
        path = tmp_path / "runs" / "r" / name
        path.write_text(path.read_text().replace('"lr_unet": 0.001', '"lr_unet": 0.018000000000000002'))
    (row,) = App(tmp_path / "runs", str(random_sd_dir), device="cpu").table()
    assert row[2] == 0.018 and str(row[2]) == "0.018"


def test_curves_and_downloads(app, runs):
    fig = app.curves(sweep_names())
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:2] == ["training loss (moving average over 10 steps)", "held-out loss"]
    assert any("imbalance" in t for t in titles) and any("condition number of B" in t for t in titles)
    assert {line.get_label() for line in fig.axes[0].lines} == {f"{n.split('-')[-1]}: {n}" for n in sweep_names()}
    files = [Path(p) for p in app.downloads(sweep_names()[0])]
    # the diffusers folder as a zip; the kohya LoRA and the embedding under the names the run gave them
    assert [p.name for p in files] == ["sweep_lr0.001-lora-diffusers.zip", "lr0.001-lora.safetensors", "zorb.safetensors"]
    assert all(p.is_relative_to(app.engine.cache) for p in files)
    run = runs / sweep_names()[0]
    assert files[1].read_bytes() == (run / "kohya" / "lr0.001-lora.safetensors").read_bytes()
    with zipfile.ZipFile(files[0]) as archive:
        assert sorted(archive.namelist()) == ["sweep_lr0.001-lora/pytorch_lora_weights.safetensors",
                                              "sweep_lr0.001-lora/zorb.safetensors"]
        assert archive.read("sweep_lr0.001-lora/zorb.safetensors") == (run / "adapter" / "zorb.safetensors").read_bytes()
    with pytest.raises(UserError, match="no adapter files"):
        app.downloads("unfinished")


# ---------------------------------------------------------------- files that link out of the runs folder

def _beside_outside(tmp_path, runs, random_sd_dir, inner: str, outer: str) -> tuple[App, Path, Path]:
    """An app over a runs folder holding a copy of sweep run `inner` (as "run"), and a copy of sweep
    run `outer` outside that folder."""
    run = shutil.copytree(runs / "sweep" / inner, tmp_path / "runs" / "run")
    outside = shutil.copytree(runs / "sweep" / outer, tmp_path / "outside")
    return App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1), run, outside


def test_an_adapter_folder_linking_out_is_never_drawn(tmp_path, runs, random_sd_dir, app):
    hostile, run, outside = _beside_outside(tmp_path, runs, random_sd_dir, f"lr{LRS[1]:g}-lora", f"lr{LRS[1]:g}-balora")
    os.symlink(outside / "adapter", run / "adapter" / "adapter")  # where a folder reader looks first
    sampling = Sampling(PROMPT, seed=7, steps=2)
    drawn = np.asarray(hostile.engine.draw(run, 1.0, sampling), dtype=np.float64)
    own = np.asarray(app.engine.draw(runs / "sweep" / f"lr{LRS[1]:g}-lora", 1.0, sampling), dtype=np.float64)
    assert np.abs(drawn - own).mean() < 1.0


def test_a_checkpoint_linking_out_is_never_drawn(tmp_path, runs, random_sd_dir):
    hostile, run, outside = _beside_outside(tmp_path, runs, random_sd_dir, f"lr{LRS[0]:g}-lora", f"lr{LRS[1]:g}-lora")
    (run / "adapter" / LORA_FILE).unlink()  # the embedding stays: the run looks half-exported
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
        os.symlink(outside / "checkpoints" / checkpoint.name, checkpoint)
    with pytest.raises(UserError, match="no adapter yet"):
        hostile.compare(["run"], "learning rate", "method", PROMPT, "", "1", 2, 5.0, "1")
    with pytest.raises(UserError, match="lies outside"):
        hostile.compare(["run"], "learning rate", "checkpoint", PROMPT, "", "1", 2, 5.0, "1", True)


def test_a_cached_image_linking_out_is_never_shown(tmp_path, runs, random_sd_dir):
    hostile, run, _ = _beside_outside(tmp_path, runs, random_sd_dir, f"lr{LRS[0]:g}-lora", f"lr{LRS[0]:g}-lora")
    sampling = Sampling(PROMPT, steps=2)
    planted = hostile.engine.cache / "images" / f"{hostile.engine.image_key(run, 1.0, sampling)}.png"
    planted.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", planted)
    drawn = np.asarray(hostile.engine.draw(run, 1.0, sampling))
    assert not (drawn == [255, 0, 0]).all()


def test_a_grid_or_download_in_the_cache_linking_out_is_never_handed_out(tmp_path, runs, random_sd_dir):
    hostile, run, _ = _beside_outside(tmp_path, runs, random_sd_dir, f"lr{LRS[0]:g}-lora", f"lr{LRS[0]:g}-lora")
    (tmp_path / "secret").write_bytes(b"secret")
    _, grid = hostile.compare(["run"], "learning rate", "method", PROMPT, "", "1", 2, 5.0, "1")
    handed = [Path(grid), *map(Path, hostile.downloads("run"))]
    for path in handed:
        path.unlink()
        os.symlink(tmp_path / "secret", path)
    _, grid = hostile.compare(["run"], "learning rate", "method", PROMPT, "", "1", 2, 5.0, "1")
    again = [Path(grid), *map(Path, hostile.downloads("run"))]
    assert again == handed and not any(p.is_symlink() or p.read_bytes() == b"secret" for p in again)


def test_a_cache_folder_linking_out_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "runs" / ".app-cache")
    with pytest.raises(UserError, match="outside"):
        App(tmp_path / "runs", device="cpu")


# ---------------------------------------------------------------- uploads and training

def _uploads(tmp_path, n=3, captions=True) -> list[Path]:
    pngs = sorted(paths.DEMO_CONCEPT.glob("*.png"))[:n]
    return pngs + ([p.with_suffix(".txt") for p in pngs] if captions else [])


@pytest.mark.parametrize("case, message", [
    ("too few", "2 image"), ("too many", "31 image"), ("not an image", "cannot read image"),
    ("not allowed", "neither an image"), ("too large", "larger than"), ("orphan caption", "without an image"),
    ("same name", "two uploads are named 00")])
def test_bad_uploads_are_refused_and_leave_nothing(tmp_path, monkeypatch, case, message):
    files = _uploads(tmp_path)
    if case == "too few":
        files = files[:2]
    elif case == "too many":
        files = [shutil.copy(files[0], tmp_path / f"{i:02d}.png") for i in range(31)]
    elif case == "not an image":
        files.append(tmp_path / "fake.png")
        files[-1].write_text("<html>")
    elif case == "not allowed":
        files.append(tmp_path / "run.sh")
        files[-1].write_text("rm -rf /")
    elif case == "too large":
        monkeypatch.setattr(training, "MAX_FILE_MB", 0.001)
    elif case == "orphan caption":
        files.append(tmp_path / "lonely.txt")
        files[-1].write_text("a <zorb>")
    elif case == "same name":
        files.append(tmp_path / "00.jpg")
        Image.open(files[0]).save(files[-1])
    with pytest.raises(UserError, match=message):
        training.stage_uploads(files, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("change, message", [
    ({"token": ""}, "the token is empty"), ({"token": "<a b>"}, "one word"), ({"init_word": " "}, "init_word"),
    ({"steps": None}, "steps must be an integer from 1"), ({"rank": None}, "rank must be"),
    ({"rank": 1.5}, "rank must be an integer"), ({"lr_unet": None}, "learning rate \\(UNet\\) must be"),
    ({"lr_text": "fast"}, "learning rate \\(text encoder\\) must be"), ({"method": "bolora"}, "bolora"),
    ({"name": "../up"}, "not a run name")])
def test_bad_train_options_are_one_message_and_leave_no_folder(tmp_path, random_sd_dir, change, message):
    app = App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)
    options = dict(files=_uploads(tmp_path), name="", token="<zorb>", init_word="heart", method="lora", lr_unet=1e-3,
                   lr_text=1e-4, steps=2, rank=2)
    try:
        with pytest.raises(UserError, match=message):
            app.train(**{**options, **change})
    finally:
        if app.trainer.job is not None:
            app.trainer.job.process.kill()
    assert app.trainer.job is None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".app-cache"]


def test_a_second_training_is_refused_while_one_runs(tmp_path, random_sd_dir):
    trainer = training.Trainer(tmp_path / "runs", cpu_threads=1)
    values = {**QUICK, "base_model": str(random_sd_dir), "steps": 2000, "checkpoint_every": 1000}
    job = trainer.start("first", _uploads(tmp_path), values)
    try:
        with pytest.raises(UserError, match="a training is running already"):
            trainer.start("second", _uploads(tmp_path), values)
        assert not (tmp_path / "runs" / "second").exists()
        # stopped once its first step is logged (its loop and Ctrl-C handling are then in place),
        # however long a busy machine takes to get there, and waited for however long it takes to end
        while job.step() < 1 and job.running():
            time.sleep(0.1)
        assert job.running(), job.last_message()
        assert trainer.stop() == "stopping first"
        job.process.wait()
    finally:
        if job.running():
            job.process.kill()
    assert job.process.returncode == 130
    assert job.outcome().startswith("first stopped at step ")
    # the refused caption check and a finished run name are refused before anything starts
    with pytest.raises(UserError, match="never names <zorb>"):
        trainer.start("third", _uploads(tmp_path, captions=False), {**values, "caption_template": "a photo"})
    assert not (tmp_path / "runs" / "third").exists()
    with pytest.raises(UserError, match="exists"):
        trainer.start("first", _uploads(tmp_path), values)


def _stopped_after_a_step(app: App, job) -> int:
    """Stop `job` once it has logged a step; the step of the checkpoint it ends with."""
    try:
        while job.step() < 1 and job.running():
            time.sleep(0.1)
        assert app.stop() == f"stopping {job.name}", job.last_message()
        job.process.wait(timeout=300)
    finally:
        if job.running():
            job.process.kill()
    assert job.process.returncode == 130, job.last_message()
    (checkpoint,) = (job.folder / "checkpoints").iterdir()
    return int(checkpoint.name.split("-")[-1])


def test_stop_keeps_the_step_reached_and_the_page_continues_or_overwrites_it(tmp_path, random_sd_dir):
    app = App(tmp_path / "runs", str(random_sd_dir), device="cpu", cpu_threads=1)
    options = dict(files=_uploads(tmp_path), name="short", token="<zorb>", init_word="heart", method="lora",
                   lr_unet=1e-3, lr_text=1e-4, steps=400, rank=2)
    job = app.train(**options)
    step = _stopped_after_a_step(app, job)
    assert 1 <= step < 100  # before the first periodic checkpoint (every 100 steps)
    assert job.outcome() == (f"short stopped at step {step} of 400: Continue goes on from there; "
                             "Overwrite (ticked) and Train starts it again")
    with pytest.raises(UserError, match="'short' exists"):
        app.train(**options)
    job = app.resume("short")
    job.process.wait(timeout=600)
    assert job.outcome() == "short finished: 400 steps", job.last_message()
    assert json.loads((job.folder / "run.json").read_text())["resumed_from"] == step
    with pytest.raises(UserError, match="short has finished"):
        app.resume("short")
    job = app.train(**{**options, "steps": 2, "method": "balora"}, overwrite=True)
    job.process.wait(timeout=600)
    assert job.outcome() == "short finished: 2 steps", job.last_message()
    assert app.list_runs()[0]["method"] == "balora" and app.list_runs()[0]["steps"] == 2


# ---------------------------------------------------------------- the command

@pytest.mark.parametrize("flags, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 would open the app to the network"),
    (["--host", "192.168.1.5", "--allow-remote", "true"], "needs an --auth-file"),
    (["--host", "0.0.0.0", "--allow-remote", "true", "--auth-file", "AUTH"], "line 1: expected user:password"),
    (["--port", "70000"], "port must be < 65536"),
    (["--base-model", "nowhere"], "base model not found"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_the_command_refuses_unsafe_or_bad_options_in_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "auth").write_text("nopassword\n")
    flags = [str(tmp_path / "auth") if f == "AUTH" else f for f in flags]
    assert cli_main(["app", "--runs", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("balora: error: ") and message in err


def test_a_port_in_use_is_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "app", "--runs", str(tmp_path / "runs"),
                                 "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("balora: error: ") and str(port) in lines[0], lines


# ---------------------------------------------------------------- a live server

@pytest.fixture(scope="module")
def server(app):
    port = free_port()
    ui = serve(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    ui.close()


def test_gradio_client_lists_compares_and_trains(server, app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    assert {r["name"] for r in client.predict(api_name="/list_runs")} == {*sweep_names(), "unfinished"}
    image, png = client.predict(sweep_names(), "learning rate", "method", PROMPT, "", "1", 2, 5.0, "0.5, 1",
                                api_name="/compare")
    expected, _ = app.compare(sweep_names(), "learning rate", "method", PROMPT, "", "1", 2, 5.0, "0.5, 1")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(expected))
    with pytest.raises(AppError, match="not a run name"):
        client.predict(["../../etc"], "learning rate", "method", PROMPT, "", "1", 2, 5.0, "1", api_name="/compare")

    status, _, files = client.predict([handle_file(p) for p in _uploads(tmp_path)], "from-client", "<zorb>", "heart",
                                      "ilora", 1e-2, 1e-3, 2, 2, api_name="/train")
    assert status == "from-client finished: 2 steps", status
    assert [Path(f).name for f in files] == ["from-client-diffusers.zip", "from-client.safetensors", "zorb.safetensors"]
    listed = {r["name"]: r for r in client.predict(api_name="/list_runs")}
    assert (listed["from-client"]["state"], listed["from-client"]["method"], listed["from-client"]["rank"]) == \
        ("finished", "ilora", 2)
    image, _ = client.predict(["from-client"], "learning rate", "method", PROMPT, "", "1", 2, 5.0, "1",
                              api_name="/compare")
    assert Image.open(image).width > 96


def test_the_page_draws_a_grid_in_a_real_browser(server, app, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import expect, sync_playwright

    # what the page shows before anything is changed: every finished run there is when it loads (also
    # those trained since the server started), drawn with the defaults
    expected, _ = app.compare(app.finished(), "learning rate", "method", app.default_prompt(), "", "1", 20, 5.0,
                              "0.7, 1")
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(server)
            expect(page.get_by_role("tab", name="Compare")).to_be_visible()
            table = page.get_by_role("grid", name="runs")
            # every finished run listed, those trained since the server started too: the page's load,
            # which also chooses them for Compare, has landed
            for name in app.finished():
                expect(table.get_by_role("gridcell", name=name, exact=True)).to_be_visible(timeout=60_000)
            page.get_by_role("button", name="Draw grid").click()
            grid = page.locator("#grid img")
            expect(grid).to_be_visible(timeout=120_000)
            page.wait_for_function("document.querySelector('#grid img').complete")
            size = grid.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert tuple(size) == expected.size
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            # a mistake is a message in the page, and the page goes on working
            page.get_by_label("prompt", exact=True).fill("")
            page.get_by_role("button", name="Draw grid").click()
            expect(page.get_by_text("the prompt is empty").first).to_be_visible(timeout=30_000)
            page.get_by_role("tab", name="Curves").click()
            page.get_by_role("button", name="Plot").click()
            expect(page.locator("#curves img")).to_be_visible(timeout=60_000)
        finally:
            browser.close()


def test_with_an_auth_file_the_server_wants_a_login(app):
    from gradio_client import Client

    port = free_port()
    ui = serve(app, "127.0.0.1", port, auth=[("ann", "secret")], block=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):
            Client(url, verbose=False)
        names = {r["name"] for r in Client(url, auth=("ann", "secret"), verbose=False).predict(api_name="/list_runs")}
        assert set(sweep_names()) <= names
    finally:
        ui.close()


def test_a_message_in_the_page_keeps_its_token_and_names_no_server_path(server, app, tmp_path, capfd):
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from playwright.sync_api import expect, sync_playwright

    fake = tmp_path / "fake.png"
    fake.write_text("<html>")
    client = Client(server, verbose=False)
    for uploads, name, message in [(_uploads(tmp_path) + [fake], "", "cannot read image fake.png"),
                                   (_uploads(tmp_path), "sweep", "'sweep' exists in the runs folder already")]:
        with pytest.raises(AppError) as caught:
            client.predict([handle_file(p) for p in uploads], name, "<zorb>", "heart", "lora", 1e-2, 1e-3, 2, 2,
                           api_name="/train")
        assert message in str(caught.value) and "/" + "tmp" not in str(caught.value), str(caught.value)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.goto(server)
            # the page's load sets the prompt of the runs there are now: typed before, it is replaced
            expect(page.get_by_label("prompt", exact=True)).to_have_value(app.default_prompt())
            page.get_by_label("prompt", exact=True).fill("word " * 80 + "<zorb>")
            page.get_by_role("button", name="Draw grid").click()
            expect(page.get_by_text("<zorb> falls past the text encoder's first").first).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    assert "Traceback" not in capfd.readouterr().err


def _choose(page, label: str, option: str) -> None:
    """Pick `option` in the dropdown labelled `label` (a multiselect one adds it)."""
    box = page.get_by_label(label, exact=True)
    box.click()
    # the list of the box (an earlier one's may still be in the page)
    page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option", name=option, exact=True).click()


def test_the_whole_loop_in_a_real_browser_without_a_shell(server, app, tmp_path):
    """Train a run from the page, stop it, continue it, download its adapter, and compare it with the
    sweep's runs and the base model over two prompts and its checkpoints."""
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import expect, sync_playwright

    prompts = "a <zorb>\na <zorb> on a beach"
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(server)
            expect(page.get_by_label("prompt", exact=True)).not_to_have_value("")  # the page's load is done
            page.get_by_role("tab", name="Train").click()
            masks = [paths.DEMO_CONCEPT.parent / "zorb-masks" / f"{p.stem}.mask.png" for p in _uploads(tmp_path, 3, False)]
            page.locator("#uploads input[type=file]").set_input_files([str(p) for p in [*_uploads(tmp_path), *masks]])
            expect(page.locator("#uploads").get_by_role("cell", name="02.txt")).to_be_visible(timeout=30_000)
            expect(page.locator("#upload-check")).to_contain_text("3 image(s), 3 caption(s), 3 mask(s)",
                                                                  timeout=30_000)
            page.get_by_role("button", name="Your own photos: buckets, masks, hold-out, prior preservation").click()
            page.locator("#masked-loss input").check()
            page.locator("#run-name textarea").fill("loop")
            page.locator("#token textarea").fill("<zorb>")
            page.locator("#init-word textarea").fill("heart")
            page.get_by_label("steps", exact=True).fill("120")
            page.get_by_label("rank", exact=True).fill("2")
            page.get_by_role("button", name="Train", exact=True).click()
            status = page.locator("#train-status")
            expect(status).to_contain_text("training loop: step", timeout=120_000)
            expect(status).not_to_contain_text("step 0 of", timeout=120_000)
            page.get_by_role("button", name="Stop (keeps the step reached)").click()
            expect(status).to_contain_text("loop stopped at step", timeout=120_000)
            page.get_by_role("button", name="Continue the stopped run").click()
            expect(status).to_contain_text("loop finished: 120 steps", timeout=600_000)
            # the samples of step 100 (every 100 steps, the starting value), then the final grid
            expect(page.locator("#samples-note")).to_contain_text("loop: samples of the finished run",
                                                                  timeout=30_000)
            expect(page.locator("#live-samples img")).to_be_visible()
            with page.expect_download() as download:
                page.locator("#adapter-files").get_by_role("row", name="loop-diffusers.zip").get_by_role("link").click()
            with zipfile.ZipFile(download.value.path()) as archive:
                assert "loop/pytorch_lora_weights.safetensors" in archive.namelist()

            # the finished run is chosen for Compare beside the runs of its token; the base model is added
            page.get_by_role("tab", name="Compare").click()
            _choose(page, "runs to compare", "base model")
            _choose(page, "rows", "prompt")
            _choose(page, "columns", "checkpoint")
            page.get_by_role("textbox", name="prompt", exact=True).fill(prompts)
            page.get_by_label("their checkpoints too").check()
            page.get_by_label("sampling steps (e.g. 20, 30)").fill("2")
            page.get_by_label("fusion coefficients (LoRA strength)").fill("1")
            page.get_by_role("button", name="Draw grid").click()
            grid = page.locator("#grid img")
            expect(grid).to_be_visible(timeout=300_000)
            page.wait_for_function("document.querySelector('#grid img').complete")
            size = grid.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        finally:
            browser.close()
    assert "loop" in app.finished()
    assert json.loads((app.runs / "loop" / "run.json").read_text())["config"]["masked_loss"] is True
    assert (app.runs / "loop" / "grid-step000100.png").is_file()
    expected, _ = app.compare([*app.finished(), "base model"], "prompt", "checkpoint", prompts, "", "1", "2", "5",
                              "1", True)
    assert tuple(size) == expected.size  # "loop" alone has a checkpoint of step 100: its own column
