"""Shared fixtures. Everything runs offline: no hub access in any test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from balora_diffusion import paths  # noqa: E402
from balora_diffusion.models import save_pipeline  # noqa: E402

# Tiny models: a second thread costs more in synchronisation than it saves, and on a shared
# 2-core machine it makes timings erratic.
torch.set_num_threads(1)

TOKENIZER_DIR = paths.TOKENIZER


def build_random_pipeline(seed: int = 0):
    """A random-weight Stable Diffusion pipeline of the SD 1.x architecture, small enough that a
    training step takes milliseconds; v-prediction with zero terminal SNR like the shipped model."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="session")
def random_sd_dir(tmp_path_factory) -> Path:
    """A saved random-weight SD-architecture diffusers folder (fp32, 16 px images, 8 px latents)."""
    path = tmp_path_factory.mktemp("random-sd") / "pipe"
    save_pipeline(build_random_pipeline(), path)
    return path


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-weight CLIP (CLIPModel + CLIPProcessor with the shipped CLIP tokenizer) of 32 px images,
    saved as a hub model folder is laid out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    processor.save_pretrained(folder)
    return folder


def build_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A random-weight DINOv2 with its image processor, 32 px images, saved as a hub model folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny-dino") / "dinov2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A saved random-weight SDXL-architecture diffusers folder (fp32, 64 px images, 8 px latents),
    written by training/make_random_sdxl.py."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "training" / "make_random_sdxl.py"
    spec = importlib.util.spec_from_file_location("make_random_sdxl", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")
