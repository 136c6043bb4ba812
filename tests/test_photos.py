"""Your own photos: loss masks, held-out images, prior preservation against the base model,
aspect-ratio buckets."""
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.experiments.sweep import parse_set
from balora_diffusion.buckets import auto_buckets, choose_buckets, nearest
from balora_diffusion.data import ConceptData, draw_view, read_concept_folder, split_holdout, view_mask
from balora_diffusion.errors import UserError
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.masks import per_sample_mse, to_latent
from balora_diffusion.prior import adapters_off, prior_loss
from balora_diffusion.train import load_models, step_loss, tokenize, train
from balora_diffusion.train_config import TrainConfig

# ---- masks


def _striped(folder: Path, name: str, size: tuple[int, int], subject: tuple[int, int, int, int]) -> None:
    """An image red inside the box `subject` and black elsewhere, with the box as its mask file."""
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = Image.new("RGB", size), Image.new("L", size)
    image.paste((255, 0, 0), subject)
    mask.paste(255, subject)
    image.save(folder / f"{name}.png")
    mask.save(folder / f"{name}.mask.png")
    (folder / f"{name}.txt").write_text("a <sks>")


def test_masks_follow_every_crop_and_flip_and_reach_latent_resolution(tmp_path):
    _striped(tmp_path, "wide", (48, 16), (0, 0, 12, 16))  # a subject at the left edge of a wide image
    [example] = read_concept_folder(tmp_path, ["<sks>"], "{token}", with_masks=True)
    data = ConceptData([example], resolution=16, seed=1, random_crop=True, flip=True, latent_factor=4)
    seen = set()
    for step in range(20):
        pixels, _, masks = data.batch(step, 1)
        red = (pixels[0, 0] > 0).float()[None]  # where the red subject landed after crop and flip
        assert torch.equal(masks[0], to_latent(red, 4)), step
        assert masks.shape == (1, 1, 4, 4)
        seen.add(round(float(masks.sum()), 3))
    assert len(seen) > 2, "the crops must move the subject"


def test_a_resized_mask_is_resized_like_its_image(tmp_path):
    _striped(tmp_path, "big", (64, 64), (0, 0, 32, 64))  # left half
    [example] = read_concept_folder(tmp_path, ["<sks>"], "{token}", with_masks=True)
    view = draw_view(example.image.size, (16, 16), torch.Generator(), False, False)
    assert torch.equal(view_mask(example.mask, view, 2), torch.cat([torch.ones(1, 8, 4), torch.zeros(1, 8, 4)], -1))


def test_masked_error_is_normalised_by_the_weighted_area():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    masks = torch.rand(2, 1, 3, 3)
    error = (pred - target) ** 2
    for w in (0.0, 0.25):
        weights = masks + w * (1 - masks)
        expected = torch.stack([(error[i] * weights[i]).sum() / (4 * weights[i].sum()) for i in range(2)])
        torch.testing.assert_close(per_sample_mse(pred, target, masks, w), expected)
    torch.testing.assert_close(per_sample_mse(pred, target, masks, 1.0), error.mean(dim=(1, 2, 3)))
    binary = (masks > 0.5).float()
    inside = torch.stack([error[i][:, binary[i, 0] > 0].mean() for i in range(2)])
    torch.testing.assert_close(per_sample_mse(pred, target, binary, 0.0), inside)
    assert per_sample_mse(pred, target, torch.zeros_like(masks), 0.0).eq(0).all()  # subject cropped out


def test_the_alpha_channel_is_the_mask_and_mask_files_are_no_images(tmp_path):
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (4, 4, 12, 12))
    image.save(tmp_path / "a.png")
    _striped(tmp_path, "b", (16, 16), (0, 0, 8, 16))
    examples = read_concept_folder(tmp_path, ["<sks>"], "a {token}", with_masks=True)
    assert [ex.path.name for ex in examples] == ["a.png", "b.png"]
    assert examples[0].mask.getbbox() == (4, 4, 12, 12)
    assert read_concept_folder(tmp_path, ["<sks>"], "a {token}")[1].mask is None  # masks only when asked


@pytest.mark.parametrize("problem, match", [("missing", "no mask for"), ("size", "must have its image's size"),
                                            ("zero", "all zero")])
def test_bad_masks_are_refused_naming_the_file(tmp_path, problem, match):
    _striped(tmp_path, "a", (16, 16), (0, 0, 8, 16))
    if problem == "missing":
        (tmp_path / "a.mask.png").unlink()
    else:
        Image.new("L", (8, 8) if problem == "size" else (16, 16)).save(tmp_path / "a.mask.png")
    with pytest.raises(UserError, match=match):
        read_concept_folder(tmp_path, ["<sks>"], "a {token}", with_masks=True)


def _concept_with_masks(folder: Path) -> Path:
    """The demo concept with its shipped masks beside the images."""
    shutil.copytree(paths.DEMO_CONCEPT, folder)
    for mask in (paths.CONCEPTS / "zorb-masks").glob("*.mask.png"):
        shutil.copy(mask, folder / mask.name)
    return folder


def test_cached_masks_are_the_batches_masks(tmp_path):
    examples = read_concept_folder(_concept_with_masks(tmp_path / "c"), ["<zorb>"], "a {token}", with_masks=True)
    data = ConceptData(examples, resolution=16, repeats=2, seed=5, flip=True, latent_factor=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    cache = LatentCache(data, vae, torch.device("cpu"), batch_size=4)
    for step in range(6):
        _, _, masks = data.batch(step, 3)
        assert torch.equal(cache.batch(step, 3)[2], masks)
    assert masks.shape == (3, 1, 8, 8) and 0 < float(masks.mean()) < 0.5


# ---- held-out images


def test_holdout_keeps_the_same_images_out_and_refuses_keeping_all():
    examples = read_concept_folder(paths.DEMO_CONCEPT, ["<zorb>"], "a {token}")
    kept, held = split_holdout(examples, 2, seed=7)
    assert len(kept) == 4 and len(held) == 2 and not {e.path for e in kept} & {e.path for e in held}
    assert [e.path for e in split_holdout(examples, 2, seed=7)[1]] == [e.path for e in held]
    assert split_holdout(examples, 0, seed=7) == (examples, [])
    with pytest.raises(UserError, match="holdout 6"):
        split_holdout(examples, 6, seed=7)


# ---- one small run of everything, and its exact resume


def _config(model_dir, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(paths.DEMO_CONCEPT), base_model=str(model_dir), token=["<zorb>"], init_word="heart",
                caption_template="a {token}", output_dir=str(out), steps=4, batch_size=2, lr_unet=1e-2,
                lr_text=1e-3, lr_embedding=1e-2, eval_every=2, checkpoint_every=2, heldout_size=4, grid_seeds=[1],
                fusion=[1.0], sample_steps=1, cpu_threads=1, method="balora")
    base.update(kw)
    return TrainConfig(**base)


def test_masks_holdout_prior_and_buckets_resume_exactly(random_sd_dir, tmp_path):
    concept = _concept_with_masks(tmp_path / "concept")
    # a wide and a tall photo beside the square ones: three buckets
    Image.open(concept / "00.png").resize((128, 64)).save(concept / "06.png")
    Image.open(concept / "00.mask.png").resize((128, 64)).save(concept / "06.mask.png")
    Image.open(concept / "01.png").resize((64, 128)).save(concept / "07.png")
    Image.open(concept / "01.mask.png").resize((64, 128)).save(concept / "07.mask.png")
    everything = dict(data_dir=str(concept), masked_loss=True, unmasked_weight=0.1, holdout=2,
                      prior_prompt="a heart", prior_weight=0.5, buckets=["auto"], flip=True)
    straight = train(_config(random_sd_dir, tmp_path / "straight", steps=8, **everything))
    first = _config(random_sd_dir, tmp_path / "resumed", steps=4, **everything)
    train(first)
    resumed = train(replace(first, steps=8, resume="latest"))

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records(resumed) == records(straight)
    final = json.loads((straight / "run.json").read_text())["final"]
    assert final["heldout_loss"] == final["fit_loss"] and math.isfinite(final["holdout_loss"])
    assert final["holdout_loss"] != final["fit_loss"]


def test_buckets_are_reported_at_the_start(random_sd_dir, tmp_path, capsys):
    concept = tmp_path / "concept"
    _striped(concept, "wide", (32, 16), (0, 0, 8, 16))
    _striped(concept, "square", (16, 16), (0, 0, 8, 16))
    train(_config(random_sd_dir, tmp_path / "out", data_dir=str(concept), token=["<sks>"], steps=1,
                  buckets=["20x12", "16x16"], heldout_size=2))
    assert "buckets (width x height: images): 16x16: 1, 20x12: 1" in capsys.readouterr().out


# ---- prior preservation


def test_the_prior_term_is_zero_at_a_zero_lora_and_its_gradient_enters_the_step(random_sd_dir):
    cfg = _config(random_sd_dir, "unused", prior_prompt="a heart", prior_weight=0.5, cache_latents=False)
    accelerator = Accelerator(cpu=True)
    examples = read_concept_folder(cfg.data_dir, cfg.token, cfg.caption_template)
    pipe, data, text, pairs = load_models(cfg, accelerator, examples)
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train(), text_encoder.train()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100, 700])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = tokenize(pipe.tokenizer, ["a heart"] * 2)

    def prior():
        def condition():
            return text.condition([ids], torch.device("cpu"), [])
        return prior_loss(unet, unet, condition, condition, [text_encoder], noisy, timesteps, None)
    # peft starts B at zero: the adapted model is the base model, so the prior term is exactly 0
    assert prior().item() == 0.0
    with torch.no_grad():
        for pair in pairs:
            pair.B.normal_(std=0.05)
    assert prior().item() > 0
    with adapters_off(unet, text_encoder):  # nested in prior_loss's own: both sides are the base model
        assert prior().item() == 0.0
    assert all(pair.A.requires_grad and pair.B.requires_grad for pair in pairs), "adapters back on, trainable"

    def grads(c):
        unet.zero_grad(), text_encoder.zero_grad()
        step_loss(c, 3, accelerator, data, pipe.vae, text, unet, scheduler).backward()
        return [p.grad.clone() for pair in pairs for p in (pair.A, pair.B)]
    # the loss is linear in the prior weight, so is its gradient: g(w) = g(0) + w (g(1) - g(0))
    half, none, full = grads(cfg), grads(replace(cfg, prior_prompt="")), grads(replace(cfg, prior_weight=1.0))
    for a, b, c in zip(half, none, full):
        torch.testing.assert_close(a, b + 0.5 * (c - b), atol=1e-6, rtol=1e-4)
    assert sum(float((c - b).abs().sum()) for b, c in zip(none, full)) > 0, "the prior term has a gradient"


def test_a_prior_prompt_naming_the_token_is_refused(random_sd_dir, tmp_path):
    with pytest.raises(UserError, match="without the learned token"):
        train(_config(random_sd_dir, tmp_path / "out", prior_prompt="a <zorb>"))
    assert not (tmp_path / "out").exists()


# ---- buckets


def test_auto_buckets_keep_the_pixel_count_the_step_and_the_aspect_limit():
    found = auto_buckets(512, 64)
    assert found == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]  # 768x320 is past 2:1
    for w, h in found:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2
        assert w * (h + 64) > 512 * 512, "each bucket is the tallest for its width"
    assert nearest((4000, 3000), found) == (576, 448)  # 4:3
    assert nearest((1000, 1000), found) == (512, 512)
    with pytest.raises(UserError, match="multiples of 64"):
        choose_buckets(["500x500"], 512, 64)
    assert choose_buckets(["off"], 512, 64) is None


def test_every_batch_comes_from_one_bucket_and_each_epoch_shows_every_image(tmp_path):
    for i, size in enumerate([(32, 16)] * 3 + [(16, 32)] * 2 + [(16, 16)]):
        _striped(tmp_path, f"{i}", size, (0, 0, 8, 8))
    examples = read_concept_folder(tmp_path, ["<sks>"], "a {token}", with_masks=True)
    data = ConceptData(examples, resolution=16, repeats=2, seed=3, flip=True, latent_factor=4,
                       buckets=[(20, 12), (12, 20), (16, 16)])
    assert data.bucket_counts() == {(20, 12): 3, (12, 20): 2, (16, 16): 1}
    per_epoch = 3 + 2 + 1  # ceil(6 / 2) + ceil(4 / 2) + ceil(2 / 2) global batches of 2
    shown = []
    for step in range(per_epoch):
        pixels, _, masks = data.batch(step, 1, rank=0, world_size=2)
        other, _, _ = data.batch(step, 1, rank=1, world_size=2)
        both, _, _ = data.batch(step, 2)
        assert torch.equal(torch.cat([pixels, other]), both)
        assert masks.shape[-2:] == (pixels.shape[-2] // 4, pixels.shape[-1] // 4)
        shown += [i for _, i in data._draws(step, 2, 0, 1)]
    assert sorted(shown) == sorted(list(range(6)) * 2)
    assert [i for _, i in data._draws(per_epoch, 2, 0, 1)] != [i for _, i in data._draws(0, 2, 0, 1)]


def test_cached_latents_with_buckets_are_the_encoded_batches(tmp_path):
    for i, size in enumerate([(32, 16), (16, 32), (16, 16)]):
        _striped(tmp_path, f"{i}", size, (0, 0, 8, 8))
    examples = read_concept_folder(tmp_path, ["<sks>"], "a {token}")
    data = ConceptData(examples, resolution=16, seed=3, flip=True, buckets=[(20, 12), (12, 20), (16, 16)],
                       latent_factor=2)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(paths.TINY_SD / "vae").eval()
    cache = LatentCache(data, vae, torch.device("cpu"), batch_size=2)
    for step in range(4):
        pixels, _, _ = data.batch(step, 1)
        with torch.no_grad():
            direct = vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(cache.batch(step, 1)[0].mean, direct, atol=1e-5, rtol=1e-4)


def test_the_new_options_sweep_and_parse_from_flags():
    assert parse_set("masked_loss=true,false") == ("masked_loss", [True, False])
    assert parse_set("buckets=auto,off") == ("buckets", [["auto"], ["off"]])
    with pytest.raises(UserError, match="buckets"):
        TrainConfig(buckets=["64x"])
    with pytest.raises(UserError, match="buckets"):
        TrainConfig(buckets=["auto", "64x48"])


# ---- the photo options from each place a user sets them

PHOTO_OPTIONS = {"buckets": ["auto"], "masked_loss": True, "unmasked_weight": 0.1, "prior_prompt": "a heart",
                 "prior_weight": 0.5, "holdout": 2}
QUICK = {"token": "<zorb>", "init_word": "heart", "steps": "1", "eval_every": "1", "checkpoint_every": "1",
         "sample_steps": "1", "grid_seeds": "1", "fusion": "1", "heldout_size": "2", "batch_size": "2",
         "cpu_threads": "1"}


def _photo_run(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    assert len(run["holdout_images"]) == 2 and math.isfinite(run["final"]["holdout_loss"])
    return {key: run["config"][key] for key in PHOTO_OPTIONS}


def test_the_photo_options_work_from_flags_a_config_file_and_a_sweep(random_sd_dir, tmp_path):
    from balora_diffusion.cli import main

    concept = _concept_with_masks(tmp_path / "concept")
    common = {"data_dir": str(concept), "base_model": str(random_sd_dir), **QUICK}
    flags = [f for key, value in common.items() for f in (f"--{key.replace('_', '-')}", value)]
    assert main(["train", *flags, "--buckets", "auto", "--masked-loss", "true", "--unmasked-weight", "0.1",
                 "--prior-prompt", "a heart", "--prior-weight", "0.5", "--holdout", "2",
                 "--output-dir", str(tmp_path / "flags")]) == 0
    assert _photo_run(tmp_path / "flags") == PHOTO_OPTIONS
    config = tmp_path / "photos.toml"
    config.write_text('buckets = ["auto"]\nmasked_loss = true\nunmasked_weight = 0.1\nprior_prompt = "a heart"\n'
                      'prior_weight = 0.5\nholdout = 2\n')
    assert main(["train", "--config", str(config), *flags, "--output-dir", str(tmp_path / "toml")]) == 0
    assert _photo_run(tmp_path / "toml") == PHOTO_OPTIONS
    sets = [f"{key}={value}" for key, value in common.items()] + [
        "buckets=auto", "masked_loss=true", "unmasked_weight=0.1", "prior_prompt=a heart", "prior_weight=0.5",
        "holdout=2"]
    assert main(["sweep", "--set", *sets, "--methods", "balora", "--lrs", "1", "--out", str(tmp_path / "sweep")]) == 0
    (cell,) = [p.parent for p in (tmp_path / "sweep").glob("*/run.json")]
    assert _photo_run(cell) == PHOTO_OPTIONS
