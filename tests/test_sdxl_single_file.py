"""SDXL as one original-layout file: our SGM writer, read back by diffusers offline with a local
config folder (no weights, no tokenizer files), and the shipped SDXL base 1.0 configs."""
import shutil

import numpy as np
import pytest
import torch

from balora_diffusion import paths
from balora_diffusion.families.sdxl_checkpoint import DEFAULT_CONFIG_DIR, to_original_layout, tokenizers
from balora_diffusion.formats.safetensors_io import write_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _draw(pipe) -> np.ndarray:
    return pipe("a red cube", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(3)).images[0]


def _configs_only(folder, out):
    """The folder's config files without its weights and tokenizers, as a shipped config folder is."""
    for file in folder.rglob("*.json"):
        if not file.parent.name.startswith("tokenizer"):
            (out / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, out / file.relative_to(folder))
    return out


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    # norms start as ones and zeros: distinct values everywhere, so that no tensor can land in the
    # wrong place unnoticed
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in COMPONENTS:
            for parameter in getattr(pipe, name).parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return pipe


def test_single_file_loads_offline_into_the_same_weights_and_image(pipe, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = write_file(tmp_path / "model.safetensors",
                      to_original_layout(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2), {})
    config = _configs_only(tiny_sdxl, tmp_path / "config")
    assert not list(config.rglob("*.safetensors")) and not (config / "tokenizer").exists()
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        **tokenizers())
    for name in COMPONENTS:
        ours, read = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
        assert ours.keys() == read.keys(), name
        assert all(torch.equal(ours[k], read[k]) for k in ours), name
    assert single.tokenizer_2.pad_token == "!" and single.tokenizer.pad_token == "<|endoftext|>"
    np.testing.assert_array_equal(_draw(single), _draw(pipe))


def test_the_file_has_the_original_sdxl_names(pipe):
    layout = to_original_layout(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    te2 = pipe.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = layout["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([te2.q_proj.weight, te2.k_proj.weight, te2.v_proj.weight]))
    assert torch.equal(layout["conditioner.embedders.1.model.text_projection"],
                       pipe.text_encoder_2.text_projection.weight.T)
    assert torch.equal(layout["model.diffusion_model.label_emb.0.2.weight"], pipe.unet.add_embedding.linear_2.weight)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in layout
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in layout
    assert not [key for key in layout if key.startswith("cond_stage_model.")]


def test_shipped_config_is_sdxl_base_and_names_what_diffusers_detects_as_sdxl_base():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    assert DEFAULT_CONFIG_DIR == paths.SDXL_CONFIG
    index = StableDiffusionXLPipeline.load_config(DEFAULT_CONFIG_DIR)
    assert {name for name, value in index.items() if isinstance(value, list) and value[0]} == {
        *COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"}
    scheduler = EulerDiscreteScheduler.from_pretrained(DEFAULT_CONFIG_DIR / "scheduler")
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.prediction_type == "epsilon"
    with torch.device("meta"):
        models = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(DEFAULT_CONFIG_DIR / "unet")),
                  AutoencoderKL.from_config(AutoencoderKL.load_config(DEFAULT_CONFIG_DIR / "vae")),
                  CLIPTextModel(CLIPTextConfig.from_pretrained(DEFAULT_CONFIG_DIR / "text_encoder")),
                  CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(DEFAULT_CONFIG_DIR / "text_encoder_2")))
    # SDXL base 1.0's published sizes
    assert [sum(p.numel() for p in m.parameters()) for m in models] == [2_567_463_684, 83_653_863,
                                                                        123_060_480, 694_659_840]
    layout = to_original_layout(*models)
    assert infer_diffusers_model_type(layout) == "xl_base"
    assert layout["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert layout["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
