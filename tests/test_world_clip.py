"""The shipped world CLIP (assets/world-clip): its recipe builds and resumes exactly, the shipped model
reads world renders it never saw, `balora eval` scores a demo run with it offline by default, and
`balora bench agreement` ranks a sweep's cells through eval's own drawing."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from balora_diffusion import metrics, paths
from balora_diffusion.bench import agreement
from balora_diffusion.checkpoint import list_checkpoints
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_world_clip", REPO / "training" / "build_world_clip.py")
recipe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = recipe  # dataclasses look their module up there
_spec.loader.exec_module(recipe)

TINY = ["--quick", "--steps", "4", "--checkpoint-every", "2"]


def _balora(*args, env=None):
    return subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def test_quick_recipe_writes_a_loadable_clip_and_resumes_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert recipe.main([*TINY, "--out", str(whole)]) == 0
    assert not recipe.state_dir(recipe.parse_args(["--out", str(whole)])[0]).exists()  # removed when complete
    loaded = metrics.load_clip(str(whole))
    assert loaded.model.dtype == torch.float32  # stored in fp16, scored in fp32
    assert {t.dtype for t in load_file(whole / "model.safetensors").values()} == {torch.float16}
    assert loaded.processor.image_processor.crop_size == {"height": 64, "width": 64}
    info = json.loads((whole / "build_info.json").read_text())
    assert info["steps_done"] == 4 and set(info["heldout"]) == {"world scenes, new renders",
                                                                "world held-out colour pairs", "hearts", "rings"}
    card = (whole / "README.md").read_text()
    assert info["command"] in card and "--quick" in info["command"]

    # stopped at the first checkpoint by the time limit, then resumed: the same weights as one go
    assert recipe.main([*TINY, "--out", str(split), "--time-limit", "0.00001"]) == recipe.EXIT_STOPPED
    assert not split.exists() and list_checkpoints(recipe.state_dir(recipe.parse_args(
        ["--out", str(split)])[0]))
    assert recipe.main([*TINY, "--out", str(split)]) == 2  # a leftover checkpoint is not silently restarted
    assert recipe.main([*TINY, "--out", str(split), "--resume"]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# Renders no training pool drew (their jitter seeds are far from the recipe's random draws), each with
# a wrong caption that changes one attribute the card says the model tells apart.
HELD_OUT = [
    (recipe.Item("star", "red", "black", "large", "center"), "colour", "yellow"),
    (recipe.Item("circle", "blue", "white", "small", "left"), "shape", "square"),
    (recipe.Item("triangle", "orange", "gray", "large", "top"), "background", "black"),
    (recipe.Item("square", "green", "blue", "large", "center"), "colour", "purple"),
    (recipe.Item("heart", "heart colours", "blue", "large", "center"), "background", "white"),
    (recipe.Item("heart", "heart colours", "gray", "small", "right"), "shape", "ring"),
    (recipe.Item("ring", "ring colours", "white", "large", "bottom"), "background", "green"),
    (recipe.Item("star", "purple", "white", "small", "right"), "shape", "circle"),
]


def test_the_shipped_clip_prefers_the_true_caption_of_world_renders():
    info = json.loads((paths.WORLD_CLIP / "build_info.json").read_text())
    # what the recipe measured on its own held-out renders backs the threshold below
    for attribute in ("shape", "colour", "background"):
        assert info["heldout"]["world scenes, new renders"][attribute] >= 0.8, attribute
    assert sum(p.stat().st_size for p in paths.WORLD_CLIP.iterdir()) < 8 * 2**20
    clip = metrics.load_clip(str(paths.WORLD_CLIP))
    right = 0
    for i, (item, attribute, value) in enumerate(HELD_OUT):
        wrong = recipe.Item(**{**item.__dict__, attribute: value,
                               **({"colour": f"{value} colours"} if value in recipe.CONCEPT_SHAPES else {})})
        image = Image.fromarray(item.render(10**9 + i))
        true_score = metrics.clip_t(clip, [image], [item.caption()])
        right += true_score > metrics.clip_t(clip, [image], [wrong.caption()])
    assert right >= 6, f"{right} of {len(HELD_OUT)}"


def _demo_config(tmp_path) -> Path:
    config = tmp_path / "short.toml"
    config.write_text(f'extends = "{paths.config_file("demo")}"\nsample_steps = 2\ngrid_seeds = [1]\n'
                      "fusion = [1.0]\neval_every = 2\ncheckpoint_every = 2\n")
    return config


def test_eval_of_a_demo_run_scores_it_offline_with_the_world_clip(tmp_path):
    run = tmp_path / "demo"
    result = _balora("demo", "--config", _demo_config(tmp_path), "--steps", "2", "--seeds", "1",
                     "--output-dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    # an empty Hugging Face home: nothing can come from a cache
    result = _balora("eval", run, "--seeds", "1", "--steps", "2", "--out", tmp_path / "eval",
                     env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["adapter", "w", "clip-t", "clip-i", "fidelity", "adherence"]
    row = next(line for line in lines if line.startswith("demo final")).split()
    assert all(value != "-" for value in row[3:5])  # CLIP-T and CLIP-I scored
    assert f"CLIP: the shipped world CLIP ({paths.WORLD_CLIP})" in result.stdout
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["models"] == {"clip": str(paths.WORLD_CLIP)}
    assert record["settings"]["metrics"] == ["clip-t", "clip-i", "fidelity", "adherence"]
    assert record["subjects"][0]["clip_texts"][0] == "a large heart on a blue background"


def test_spearman_ranks_ties_and_refuses_no_ranking():
    assert agreement.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert list(agreement.ranks([0.5, 0.1, 0.5])) == [2.5, 1.0, 2.5]
    assert agreement.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert agreement.spearman([1, 2, 3], [1, 1, 1]) is None
    assert agreement.spearman([1, 2], [1, 2]) is None


def test_bench_agreement_ranks_a_tiny_sweep_with_evals_own_drawing(random_sd_dir, tmp_path):
    sweep = tmp_path / "sweep"
    for name, lr in (("low", 1e-4), ("mid", 3e-3), ("high", 3e-2)):
        train(TrainConfig(data_dir=str(paths.DEMO_CONCEPT), base_model=str(random_sd_dir), token=["<zorb>"],
                          init_word="heart", caption_template="a {token}", flip=False, output_dir=str(sweep / name),
                          steps=2, batch_size=2, lr_unet=lr, lr_text=lr / 10, lr_embedding=lr, eval_every=2,
                          checkpoint_every=2, heldout_size=2, grid_seeds=[1], fusion=[1.0], sample_steps=2, seed=0))
    out, page = tmp_path / "agreement", tmp_path / "docs" / "metrics.md"
    result = _balora("bench", "agreement", "--quick", "--sweep", sweep, "--out", out, "--page", page)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "agreement.json").read_text())
    cells = {c["cell"]: c for c in record["cells"]}
    assert sorted(cells) == ["high", "low", "mid"]
    for name, row in record["analysis"].items():
        clip_metric, world_metric = row["clip"], row["world"]
        assert row["cells"] == 3
        assert row["rho"] == agreement.spearman([c[clip_metric] for c in record["cells"]],
                                                [c[world_metric] for c in record["cells"]])
        assert name in result.stdout
    text = page.read_text()
    assert "balora bench agreement --quick" in text and "computed, not measured" in text
    assert page.with_suffix(".png").is_file() and (out / "agreement.md").is_file()

    # the same numbers as `balora eval` on one of the cells: the agreement draws through eval's code
    result = _balora("eval", sweep / "mid", "--metrics", *agreement.METRICS, "--seeds", "1", "--steps", "2",
                     "--guidance", "5", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"][0]
    for metric in agreement.METRICS:
        assert cells["mid"][metric] == pytest.approx(scored[metric], abs=1e-6)

    again = _balora("bench", "agreement", "--quick", "--sweep", sweep, "--out", out)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite true" in again.stderr
