"""`balora eval` on a short run of the random SD model with tiny saved CLIP and DINOv2 models: the table,
eval.json (its numbers recomputed from the saved images straight through transformers), the grid,
the held-out references, and --best-by's export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig

METRICS = ["clip-t", "clip-i", "dino", "fidelity", "adherence"]


def _config(model_dir, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(
        data_dir=str(paths.DEMO_CONCEPT), base_model=str(model_dir), token=["<zorb>"], init_word="heart",
        caption_template="a {token}", flip=False, output_dir=str(out), steps=6, batch_size=2, lr_unet=1e-2,
        lr_text=1e-3, lr_embedding=1e-2, eval_every=6, checkpoint_every=3, heldout_size=2, grid_seeds=[1],
        fusion=[1.0], sample_steps=2, seed=0), **kw})


@pytest.fixture(scope="module")
def run(random_sd_dir, tmp_path_factory):
    return train(_config(random_sd_dir, tmp_path_factory.mktemp("eval") / "run"))


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _models(clip, dino):
    return ["--clip", clip, "--dino", dino, "--seeds", "1", "--steps", "2", "--prompts-file"]


def test_eval_of_a_run_scores_the_final_adapter_and_each_checkpoint(run, tiny_clip_dir, tiny_dino_dir, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <zorb> on a red background\n\na small <zorb>\n")
    out = tmp_path / "eval"
    result = _eval(run, *_models(tiny_clip_dir, tiny_dino_dir), prompts, "--metrics", *METRICS,
                   "--fusion", "0", "1", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "eval.json").read_text())
    # step-6 is the final adapter's own state: scored once, as "final"
    assert [(r["label"], r["fusion"]) for r in record["results"]] == [
        ("run step-0000003", 0), ("run step-0000003", 1), ("run final", 0), ("run final", 1)]
    subject = record["subjects"][0]
    assert subject["clip_texts"] == ["a heart on a red background", "a small heart"]
    assert "training images (the run held none out" in subject["reference_note"]
    assert len(subject["references"]) == len(list(paths.DEMO_CONCEPT.glob("*.png")))

    clip, clip_processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    dino, dino_processor = AutoModel.from_pretrained(tiny_dino_dir), AutoImageProcessor.from_pretrained(tiny_dino_dir)
    references = [Image.open(p).convert("RGB") for p in subject["references"]]
    for row in record["results"]:
        images = [Image.open(out / name).convert("RGB") for name in row["images"]]
        with torch.no_grad():
            both = clip(**clip_processor(text=subject["clip_texts"], images=images + references, return_tensors="pt",
                                         padding=True))
            cosines = both.logits_per_image / clip.logit_scale.exp()
            cls = [dino(**dino_processor(images=group, return_tensors="pt")).pooler_output
                   for group in (images, references)]
        generated, real = both.image_embeds[:len(images)], both.image_embeds[len(images):]
        assert row["clip-t"] == pytest.approx(float(cosines[[0, 1], [0, 1]].mean()), abs=1e-5)
        assert row["clip-i"] == pytest.approx(float((generated @ real.T).mean()), abs=1e-5)
        dino_cos = torch.nn.functional.cosine_similarity(cls[0][:, None], cls[1][None], dim=-1)
        assert row["dino"] == pytest.approx(float(dino_cos.mean()), abs=1e-5)
        assert 0.0 <= row["fidelity"] <= 1.0

    lines = result.stdout.splitlines()
    assert lines[0].split() == ["adapter", "w", *METRICS]
    final_at_1 = next(line for line in lines if line.startswith("run final ") and line.split()[2] == "1")
    assert final_at_1.split()[3:] == [f"{record['results'][3][m]:.3f}" for m in METRICS]
    assert Image.open(out / "grid.png").size[0] > 2 * 96


def test_held_out_images_are_the_references(random_sd_dir, tiny_clip_dir, tiny_dino_dir, tmp_path):
    from balora_diffusion.data import read_concept_folder, split_holdout

    run = train(_config(random_sd_dir, tmp_path / "held", steps=3, holdout=2, heldout_seed=7))
    result = _eval(run, "--clip", tiny_clip_dir, "--metrics", "clip-i", "--seeds", "1", "--steps", "2",
                   "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    subject = json.loads((tmp_path / "eval" / "eval.json").read_text())["subjects"][0]
    _, held = split_holdout(read_concept_folder(paths.DEMO_CONCEPT, ["<zorb>"], "a {token}"), 2, 7)
    assert subject["references"] == [str(e.path) for e in held] and subject["reference_note"] == "2 held-out images"
    assert "references of" in result.stdout and "2 held-out images" in result.stdout
    # no prompts file: the concept's own evaluation prompts, the token read as its class word
    assert subject["clip_texts"][0] == "a large heart on a blue background"
    # the references are the images the run recorded as held out, not a repeat of the draw
    record = json.loads((run / "run.json").read_text())
    assert record["holdout_images"] == sorted(e.path.name for e in held)
    others = sorted(p.name for p in paths.DEMO_CONCEPT.glob("*.png") if p.name not in record["holdout_images"])[:2]
    (run / "run.json").write_text(json.dumps({**record, "holdout_images": others}))
    again = _eval(run, "--clip", tiny_clip_dir, "--metrics", "clip-i", "--seeds", "1", "--steps", "2",
                  "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    subject = json.loads((tmp_path / "again" / "eval.json").read_text())["subjects"][0]
    assert [Path(r).name for r in subject["references"]] == others


def test_best_by_exports_the_best_checkpoint_and_keeps_an_earlier_one(run, tiny_clip_dir, tiny_dino_dir, tmp_path):
    from balora_diffusion.formats.read import read_adapter

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <zorb>\n")
    args = [run, *_models(tiny_clip_dir, tiny_dino_dir), prompts, "--metrics", "clip-i", "dino",
            "--best-by", "dino", "--fusion", "0.5", "1"]
    result = _eval(*args, "--out", tmp_path / "first")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "first" / "eval.json").read_text())
    at_top = [r for r in record["results"] if r["fusion"] == 1]
    winner = max(at_top, key=lambda r: r["dino"])
    assert record["best"]["label"] == winner["label"] and f"best by dino at w=1: {winner['label']}" in result.stdout
    best = read_adapter(run / "best" / "adapter")
    expected = read_adapter(winner["source"])
    for part, path, module in expected.modules():
        torch.testing.assert_close(best.parts()[part][path].delta(), module.delta())
    assert best.tokens == ["<zorb>"] and any((run / "best" / "kohya").glob("*.safetensors"))
    before = (run / "best" / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()

    again = _eval(*args, "--out", tmp_path / "second")
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert again.stderr.startswith(f"balora: error: --best-by {run / 'best'} already exists; add --overwrite true")
    assert (run / "best" / "adapter" / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert not (tmp_path / "second").exists()


@pytest.mark.parametrize("args, message", [
    (["--metrics", "clip-i", "--best-by", "dino"], "--best-by dino is not among --metrics clip-i"),
    (["--metrics", "fidelity", "--concept", "{empty}"], "no images"),
    (["--metrics", "clip-t", "dino"], "--metrics dino needs --dino MODEL"),
    (["--metrics", "adherence", "--concept", "{bare}"], "--metrics adherence needs a concept.toml in"),
])
def test_bad_eval_options_are_one_line(run, tmp_path, args, message):
    empty, bare = tmp_path / "empty", tmp_path / "bare"
    empty.mkdir()
    bare.mkdir()
    (bare / "00.png").write_bytes((paths.DEMO_CONCEPT / "00.png").read_bytes())  # an image, no concept.toml
    result = _eval(run, *[a.format(empty=empty, bare=bare) for a in args], "--out", tmp_path / "eval")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("balora: error: ") and message in result.stderr
    assert not (tmp_path / "eval").exists()
