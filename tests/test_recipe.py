"""training/build_tiny_model.py: the quick config builds a loadable pipeline; resuming is exact."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from balora_diffusion import paths, world
from balora_diffusion.generate import generate
from balora_diffusion.models import load_pipeline

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_tiny_model", REPO / "training" / "build_tiny_model.py")
recipe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = recipe  # dataclasses look their module up there
_spec.loader.exec_module(recipe)

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")
TINY = ["--quick", "--pool-size", "24", "--vae-steps", "3", "--unet-steps", "3", "--warmup-steps", "1"]


def test_quick_config_builds_a_loadable_pipeline(tmp_path):
    out = tmp_path / "tiny"
    assert recipe.main(["--quick", "--out", str(out)]) == 0
    assert not recipe.state_dir(recipe.parse_args(["--out", str(out)])[0]).exists()  # removed when complete
    info = json.loads((out / "build_info.json").read_text())
    quick = tomllib.loads(recipe.QUICK_CONFIG.read_text())
    assert info["complete"] and info["unet_steps_done"] == quick["unet_steps"]
    for name in WEIGHTS:
        assert {t.dtype for t in load_file(out / name).values()} == {torch.float16}

    pipe = load_pipeline(out, "cpu")
    assert pipe.unet.config.block_out_channels == quick["unet_channels"]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    scale = pipe.vae.config.scaling_factor
    assert math.isfinite(scale) and scale > 0 and scale == info["scaling_factor"]
    assert all(0.0 <= v <= 1.0 for v in info["vae_roundtrip"].values()) and len(info["vae_roundtrip"]) == 5
    image = generate(pipe, [world.train_scenes()[0].caption()], [0], steps=3, progress=False)[0][0]
    assert image.size == (quick["resolution"],) * 2


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in WEIGHTS for k, v in load_file(folder / name).items()}


def test_an_interrupted_build_resumes_to_the_same_weights(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert recipe.main(TINY + ["--out", str(straight)]) == 0
    # a limit that is over after the first step: checkpoint, then stop with the "resumable" code
    assert recipe.main(TINY + ["--out", str(resumed), "--time-limit", "1e-9"]) == recipe.EXIT_STOPPED
    assert not resumed.exists()
    assert recipe.main(TINY + ["--out", str(resumed)]) == 2  # refuses to silently restart over a checkpoint
    assert recipe.main(TINY + ["--out", str(resumed), "--resume"]) == 0
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe.main(TINY + ["--out", str(out), "--time-limit", "1e-9"]) == recipe.EXIT_STOPPED
    assert recipe.main(TINY + ["--out", str(out), "--resume", "--unet-lr", "0.1"]) == 2
    assert "unet_lr" in capsys.readouterr().err


def test_flags_override_the_config_file():
    cfg, resume = recipe.parse_args(["--quick", "--vae-steps", "7", "--resume"])
    quick = tomllib.loads(recipe.QUICK_CONFIG.read_text())
    assert cfg.vae_steps == 7 and resume
    assert cfg.unet_channels == quick["unet_channels"] and cfg.pool_size == quick["pool_size"]


def test_training_schedule_has_zero_terminal_snr_and_v_prediction():
    sched = recipe.train_scheduler()
    ab = sched.alphas_cumprod
    assert float(ab[-1]) == pytest.approx(0.0, abs=1e-7)  # the last step holds no signal
    assert bool((ab[1:] < ab[:-1]).all())
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    noisy, v = sched.add_noise(x0, noise, t), sched.get_velocity(x0, noise, t)
    a = ab[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    # v-prediction recovers the clean latent at every t, including the pure-noise one
    assert torch.allclose(a * noisy - s * v, x0, atol=1e-5)


def test_lr_factor_warms_up_then_decays_to_a_tenth():
    total, warmup = 100, 10
    factors = [recipe.lr_factor(s, total, warmup) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == pytest.approx(1.0)
    assert factors[warmup] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert recipe.lr_factor(total, total, warmup) == pytest.approx(0.1)


def test_pool_tokens_hold_every_partial_caption_of_every_scene():
    from transformers import CLIPTokenizer

    cfg, _ = recipe.parse_args(["--quick", "--pool-size", "12", "--vae-random-fraction", "0"])
    tokenizer = CLIPTokenizer.from_pretrained(paths.TOKENIZER)
    pool = recipe.render_pool(cfg, tokenizer, torch.device("cpu"))
    data = world.WorldDataset(resolution=cfg.resolution, seed=cfg.seed, length=cfg.pool_size, split="train")
    decode = lambda row: tokenizer.decode(row, skip_special_tokens=True).strip()  # noqa: E731
    assert decode(pool.tokens[-1]) == ""
    for i in (0, 5, 11):
        scene = data[i]["scene"]
        for mask in range(recipe.VARIANTS):
            row = pool.tokens[int(pool.scene_ids[i]) * recipe.VARIANTS + mask]
            assert decode(row) == scene.caption(recipe.omit_set(mask))
    assert recipe.omit_set(0) == () and recipe.omit_set(recipe.VARIANTS - 1) == world.CAPTION_ATTRIBUTES


class _IdentityVAE:
    """Encodes to the image itself: whatever the report measures must survive untouched."""
    device = torch.device("cpu")

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


class _GreyVAE(_IdentityVAE):
    """Keeps brightness, loses colour: object colours and the concept must be reported lost."""

    def decode(self, z):
        return SimpleNamespace(sample=z.mean(1, keepdim=True).expand_as(z))


def test_vae_roundtrip_report_measures_what_survives():
    perfect = recipe.vae_roundtrip_report(_IdentityVAE(), 64)
    assert perfect["world_background_accuracy"] == perfect["world_object_accuracy"] == 1.0
    assert perfect["world_shape_accuracy"] == 1.0
    assert perfect["concept_fidelity_roundtrip"] == perfect["concept_fidelity_input"] > 0.9
    grey = recipe.vae_roundtrip_report(_GreyVAE(), 64)
    assert grey["world_object_accuracy"] < 0.5 and grey["concept_fidelity_roundtrip"] < 0.1


def test_partial_captions_omit_only_the_allowed_attributes(tmp_path, capsys):
    from transformers import CLIPTokenizer

    args = ["--quick", "--pool-size", "16", "--vae-random-fraction", "0", "--attribute-dropout", "1",
            "--caption-dropout", "0.25", "--dropout-attributes", "size", "background"]
    cfg, _ = recipe.parse_args(args)
    build = recipe.Build(cfg)
    build.pool = recipe.render_pool(cfg, CLIPTokenizer.from_pretrained(paths.TOKENIZER), build.device)
    index = torch.arange(16).repeat(8)
    rows = build.caption_rows(index)
    empty = rows == len(build.pool.tokens) - 1
    assert 0 < int(empty.sum()) < len(rows)  # some captions dropped for guidance, not all
    kept = rows[~empty]
    assert torch.equal(kept // recipe.VARIANTS, build.pool.scene_ids[index][~empty])
    assert set(recipe.omit_set(int(m)) for m in kept % recipe.VARIANTS) == {("size", "background")}
    assert recipe.main(["--quick", "--out", str(tmp_path / "m"), "--dropout-attributes", "shape"]) == 2
    assert not (tmp_path / "m").exists()
    assert "dropout_attributes" in capsys.readouterr().err
