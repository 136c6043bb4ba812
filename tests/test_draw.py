"""draw.py, the one way the toolkit draws with adapters: the weights it draws with against the math,
the sampler, and every consumer drawing the same image for the same adapter, seed and settings."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion.draw import DEFAULT_GUIDANCE, DEFAULT_STEPS, Drawer, Sampling, use_scheduler
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import TEXT_ENCODER, UNET, Adapter, LoraModule
from balora_diffusion.formats.names import canonical_text_path
from balora_diffusion.formats.run_files import write_run_adapters
from balora_diffusion.models import load_pipeline

UNET_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV_LAYER = "down_blocks.0.attentions.0.proj_in"
TEXT_LAYER = "encoder.layers.1.self_attn.q_proj"
PROMPT = "a <dtok> on a red background"
FAST = Sampling(steps=1)


@pytest.fixture(scope="module")
def pipe(random_sd_dir):
    return load_pipeline(random_sd_dir, device="cpu")


def _text_layer(pipe) -> torch.nn.Module:
    return {canonical_text_path(n): m for n, m in pipe.text_encoder.named_modules()}[TEXT_LAYER]


def _module(layer: torch.nn.Module, rank: int, alpha: float, seed: int) -> LoraModule:
    """A random LoRA module for `layer` (scaled to change the image but keep it finite)."""
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = layer.weight.shape[:2]
    kernel = tuple(layer.weight.shape[2:])
    down = torch.randn((rank, in_dim, *kernel), generator=g) * 0.3
    up = torch.randn((out_dim, rank, *([1] * len(kernel))), generator=g) * 0.3
    return LoraModule(down, up, alpha)


def make_adapter(pipe, seed: int, token: str | None = "<dtok>") -> Adapter:
    adapter = Adapter(
        part_modules={UNET: {UNET_LAYER: _module(pipe.unet.get_submodule(UNET_LAYER), 2, 4.0, seed),
                             CONV_LAYER: _module(pipe.unet.get_submodule(CONV_LAYER), 3, 3.0, seed + 1)},
                      TEXT_ENCODER: {TEXT_LAYER: _module(_text_layer(pipe), 2, 1.0, seed + 2)}},
        tokens=[token] if token else [], format="test", source=f"adapter {seed}",
        info={"name": f"adapter-{seed}", "token": [token] if token else []})
    if token:
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        adapter.embedding = torch.randn((1, width), generator=torch.Generator().manual_seed(seed + 3))
    return adapter


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {UNET_LAYER: pipe.unet.get_submodule(UNET_LAYER).weight.detach().clone(),
            CONV_LAYER: pipe.unet.get_submodule(CONV_LAYER).weight.detach().clone(),
            TEXT_LAYER: _text_layer(pipe).weight.detach().clone()}


def _update(adapter: Adapter, path: str) -> torch.Tensor:
    module = adapter.parts()[UNET].get(path) or adapter.parts()[TEXT_ENCODER][path]
    return module.scale * (module.up.flatten(1) @ module.down.flatten(1))


@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0, -0.5])
def test_strength_w_draws_with_the_base_weight_plus_w_times_the_update(pipe, strength):
    base, adapter = _weights(pipe), make_adapter(pipe, 1)
    with Drawer(pipe, FAST).hold([(adapter, 1.0)]) as drawer:
        drawer.draw([PROMPT], [1], strength, progress=False)
        drawn = _weights(pipe)
    for path in base:
        expected = base[path] + strength * _update(adapter, path).reshape(base[path].shape)
        torch.testing.assert_close(drawn[path], expected, rtol=1e-5, atol=1e-6)
    after = _weights(pipe)
    assert all(torch.equal(after[p], base[p]) for p in base), "release gives back the base weights exactly"


def test_several_adapters_draw_with_the_sum_of_their_weighted_updates(pipe):
    base, first, second = _weights(pipe), make_adapter(pipe, 1), make_adapter(pipe, 5, token="<other>")
    with Drawer(pipe, FAST).hold([(first, 0.7), (second, -0.5)]) as drawer:
        assert drawer.tokens == ["<dtok>", "<other>"]
        drawer.draw([PROMPT], [1], 0.8, progress=False)
        drawn = _weights(pipe)
    for path in base:
        update = 0.7 * _update(first, path) - 0.5 * _update(second, path)
        torch.testing.assert_close(drawn[path], base[path] + 0.8 * update.reshape(base[path].shape),
                                   rtol=1e-5, atol=1e-6)


def test_the_new_token_stays_in_at_strength_zero_and_leaves_on_release(pipe):
    adapter = make_adapter(pipe, 1)
    base = Drawer(pipe, FAST).draw([PROMPT], [1], progress=False)[0][0]
    drawer = Drawer(pipe, FAST).hold([(adapter, 1.0)])
    assert "<dtok>" in pipe.tokenizer.get_vocab()
    at_zero = drawer.draw([PROMPT], [1], 0.0, progress=False)[0][0]
    assert not np.array_equal(np.asarray(at_zero), np.asarray(base)), "the embedding changes the image at w=0"
    drawer.release()
    assert "<dtok>" not in pipe.tokenizer.get_vocab()
    assert np.array_equal(np.asarray(Drawer(pipe, FAST).draw([PROMPT], [1], progress=False)[0][0]), np.asarray(base))


def test_a_held_key_is_kept_and_another_swaps_the_adapters(pipe):
    reads = []

    def read(seed):
        reads.append(seed)
        return [(make_adapter(pipe, seed), 1.0)]

    with Drawer(pipe, FAST) as drawer:
        drawer.hold(lambda: read(1), key="one")
        drawer.hold(lambda: read(1), key="one")
        assert reads == [1]
        drawer.hold(lambda: read(2), key="two")
        assert reads == [1, 2] and drawer.tokens == ["<dtok>"]  # the first one's token left before the second's came


def test_a_prompt_with_the_token_past_the_window_is_refused(pipe):
    with Drawer(pipe, FAST).hold([(make_adapter(pipe, 1), 1.0)]) as drawer:
        drawer.check_prompts([PROMPT])
        with pytest.raises(UserError, match="drawn without it"):
            drawer.check_prompts(["word " * 80 + "<dtok>"])


def test_the_model_sampler_is_found_again_after_another(pipe):
    own = pipe.scheduler
    use_scheduler(pipe, "dpm++")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == own.config.prediction_type  # the model's noise schedule kept
    use_scheduler(pipe, "model")
    assert pipe.scheduler is own
    with pytest.raises(UserError, match="unknown sampler"):
        use_scheduler(pipe, "nope")


def test_sampling_defaults_are_one_set():
    from balora_diffusion.app.engine import Sampling as AppSampling
    from balora_diffusion.commands.generate import DrawConfig

    cfg = DrawConfig()
    assert (cfg.steps, cfg.guidance, cfg.scheduler) == (DEFAULT_STEPS, DEFAULT_GUIDANCE, "model")
    assert (AppSampling("p").steps, AppSampling("p").guidance) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert (Sampling().steps, Sampling().guidance) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)


# ---------------------------------------------------------------- every consumer draws the same image

@pytest.fixture(scope="module")
def run_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("draw-run") / "run"
    write_run_adapters(folder, make_adapter(pipe, 1))
    return folder


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_generate_and_the_app_draw_the_image_draw_py_draws(pipe, run_folder, random_sd_dir, tmp_path):
    from balora_diffusion.app.engine import Engine
    from balora_diffusion.app.engine import Sampling as AppSampling
    from balora_diffusion.formats.read import read_adapter

    strength, steps = 0.6, 2
    with Drawer(pipe, Sampling(steps=steps)).hold([(read_adapter(run_folder), 1.0)]) as drawer:
        ours = np.asarray(drawer.draw([PROMPT], [3], strength, progress=False)[0][0])

    _cli("generate", "--adapter", run_folder, "--base-model", random_sd_dir, "--prompt", PROMPT, "--seeds", 3,
         "--steps", steps, "--fusion", strength, "--out", tmp_path / "gen", "--device", "cpu")
    (record,) = json.loads((tmp_path / "gen" / "generate.json").read_text())["images"]
    generated = np.asarray(Image.open(tmp_path / "gen" / record["file"]))

    engine = Engine(run_folder.parent, str(random_sd_dir), device="cpu")
    app = np.asarray(engine.draw(run_folder, strength, AppSampling(PROMPT, seed=3, steps=steps)))

    assert np.abs(ours.astype(int) - np.asarray(Drawer(pipe, Sampling(steps=steps)).draw(
        [PROMPT], [3], progress=False)[0][0]).astype(int)).mean() > 1, "the adapter changes the image"
    assert np.array_equal(generated, ours)
    assert np.array_equal(app, ours)


def test_the_validation_grid_draws_what_generate_draws_from_the_runs_files(random_sd_dir, tmp_path, monkeypatch):
    from balora_diffusion import paths
    from balora_diffusion.train import evaluate, train
    from balora_diffusion.train_config import TrainConfig

    shown = []
    real = evaluate.write_grid
    monkeypatch.setattr(evaluate, "write_grid", lambda path, rows, *a, **k: (shown.append(rows), real(path, rows, *a, **k)))
    prompt, strength = "a <zorb> on a red background", 0.5
    cfg = TrainConfig(data_dir=str(paths.DEMO_CONCEPT), base_model=str(random_sd_dir), token=["<zorb>"],
                      init_word="heart", output_dir=str(tmp_path / "run"), steps=2, batch_size=2, lr_unet=1e-2,
                      eval_every=2, checkpoint_every=2, heldout_size=2, grid_prompts=[prompt], grid_seeds=[3],
                      fusion=[strength], sample_steps=2, seed=0, cpu_threads=1)
    out = train(cfg)
    (rows,) = shown
    _cli("generate", "--adapter", out, "--base-model", random_sd_dir, "--prompt", prompt, "--seeds", 3,
         "--steps", 2, "--fusion", strength, "--out", tmp_path / "gen", "--device", "cpu")
    (record,) = json.loads((tmp_path / "gen" / "generate.json").read_text())["images"]
    assert np.array_equal(np.asarray(rows[0][0]), np.asarray(Image.open(tmp_path / "gen" / record["file"])))
