"""The shipped tiny model, its loader, device choice, seeded sampling and labelled grids."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from balora_diffusion import world
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError
from balora_diffusion.generate import generate, image_grid, write_grid
from balora_diffusion.models import DEFAULT_MODEL_DIR, load_pipeline, resolve_dtype

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_shipped_folder_is_small_and_stored_in_fp16():
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 2**20
    for name in WEIGHT_FILES:
        with safe_open(str(DEFAULT_MODEL_DIR / name), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, (name, dtypes)


def test_loads_offline_through_the_sd15_classes_in_fp32_on_cpu(pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert {p.device.type for p in module.parameters()} == {"cpu"}
    # the full CLIP vocabulary, so token ids are SD 1.5's
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def _hub_text_names(config_dir) -> set[str]:
    """The text encoder's key names as the hub's SD 1.x checkpoints spell them, which every
    transformers release reads (transformers 5's own module names lack the `text_model.` prefix)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    own = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir)).state_dict()
    return {k if k.startswith("text_model.") else "text_model." + k for k in own}


def _text_weight_names(folder) -> set[str]:
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_shipped_text_encoder_uses_the_hub_key_names():
    assert _text_weight_names(DEFAULT_MODEL_DIR) == _hub_text_names(DEFAULT_MODEL_DIR / "text_encoder")


def test_saved_pipelines_use_the_hub_text_names_and_load_back_equal(pipe, tmp_path):
    from balora_diffusion.models import save_pipeline

    save_pipeline(pipe, tmp_path / "saved")
    assert _text_weight_names(tmp_path / "saved") == _hub_text_names(DEFAULT_MODEL_DIR / "text_encoder")
    again = load_pipeline(tmp_path / "saved")
    for (name, a), (_, b) in zip(pipe.text_encoder.state_dict().items(), again.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name


def test_scheduler_records_the_training_parameterisation(pipe):
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    # zero terminal SNR: sampling starts from pure noise at t = 999
    assert float(pipe.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-7)
    pipe.scheduler.set_timesteps(20)
    assert int(pipe.scheduler.timesteps[0]) == 999


def test_scaling_factor_gives_unit_variance_latents(pipe):
    scenes = world.train_scenes()[::97]
    pixels = torch.stack([world.image_to_tensor(world.render(s, 64, jitter_seed=i)) for i, s in enumerate(scenes)])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.6 < float(latents.std()) < 1.6


def test_generates_and_follows_the_background_colour(pipe):
    prompts = {"a large yellow circle on a black background": "black",
               "a small red square on the left on a blue background": "blue"}
    images = generate(pipe, list(prompts), seeds=[1, 2, 3], progress=False)
    for (prompt, background), row in zip(prompts.items(), images):
        assert all(im.size == (64, 64) and im.mode == "RGB" for im in row)
        votes = Counter(world.classify(im)["background"] for im in row)
        assert votes.most_common(1)[0][0] == background, (prompt, votes)


def test_a_seed_draws_the_same_image_alone_or_in_a_batch(pipe):
    prompt = "a large green square on a white background"
    both = generate(pipe, [prompt], seeds=[5, 6], steps=4, progress=False)[0]
    alone = generate(pipe, [prompt], seeds=[6], steps=4, progress=False)[0][0]
    assert np.abs(np.asarray(both[1], dtype=int) - np.asarray(alone, dtype=int)).max() <= 2
    assert np.abs(np.asarray(both[0], dtype=int) - np.asarray(alone, dtype=int)).max() > 0


def test_load_pipeline_rejects_missing_and_broken_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UserError, match="lacks"):
        load_pipeline(tmp_path)


def test_load_pipeline_reports_a_corrupt_weight_file(tmp_path):
    import shutil
    broken = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, broken)
    (broken / WEIGHT_FILES[0]).write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="cannot load"):
        load_pipeline(broken)


def test_half_precision_is_refused_on_cpu_and_default_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, cuda) == torch.float16
    assert resolve_dtype("bf16", cuda) == torch.bfloat16
    with pytest.raises(UserError):
        resolve_dtype(torch.float16, cpu)
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8", cpu)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            pick_device("cuda")


def _solid(rgb):
    return Image.new("RGB", (8, 8), rgb)


def _box(canvas: np.ndarray, rgb) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.all(canvas == np.asarray(rgb), axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_grid_places_each_image_in_its_row_and_column():
    colours = [[(200, 10, 10), (10, 200, 10), (10, 10, 200)], [(200, 200, 10), (10, 200, 200), (200, 10, 200)]]
    grid = image_grid([[_solid(c) for c in row] for row in colours], ["first row", "second"],
                      ["a", "b", "a rather long column label"], cell=20, title="title")
    canvas = np.asarray(grid)
    boxes = [[_box(canvas, c) for c in row] for row in colours]
    for i, row in enumerate(boxes):
        for j, (x0, y0, x1, y1) in enumerate(row):
            assert (x1 - x0, y1 - y0) == (20, 20)  # each image fills exactly one cell
            if j:
                assert x0 >= row[j - 1][2] and y0 == row[j - 1][1]  # left to right, same row
            if i:
                assert y0 >= boxes[i - 1][j][3] and x0 == boxes[i - 1][j][0]  # top to bottom, same column
    # the labels are drawn: dark pixels left of the first column and above the first row
    left = boxes[0][0][0]
    top = boxes[0][0][1]
    assert (canvas[top:, :left] < 100).any()
    assert (canvas[:top, left:] < 100).any()


def test_grid_rejects_label_count_mismatch():
    with pytest.raises(ValueError):
        image_grid([[_solid((0, 0, 0))]], row_labels=["a", "b"])
    with pytest.raises(ValueError):
        image_grid([])


def test_write_grid_is_atomic_and_readable(tmp_path):
    path = write_grid(tmp_path / "grid.png", [[_solid((1, 2, 3))]], ["r"], ["c"])
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with Image.open(path) as im:
        assert im.format == "PNG"
