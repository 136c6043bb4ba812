"""training/make_random_sdxl.py: a tiny SDXL-architecture folder that diffusers loads and draws with."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def _draw(pipe, seed: int) -> np.ndarray:
    return pipe("a red cube", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_tiny_sdxl_draws_a_finite_image_deterministically_per_seed(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                          + 6 * unet.addition_time_embed_dim)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"

    first, again, other = _draw(pipe, 1), _draw(pipe, 1), _draw(pipe, 2)
    assert first.shape == (64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_cli_writes_the_same_weights_for_the_same_seed(tmp_path, tiny_sdxl):
    from safetensors.torch import load_file

    script = REPO / "training" / "make_random_sdxl.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "again"), "--seed", "0"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        first, again = load_file(tiny_sdxl / weights), load_file(tmp_path / "again" / weights)
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
