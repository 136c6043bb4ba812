"""Write a tiny randomly initialised model of the Stable Diffusion XL architecture as a diffusers
folder (StableDiffusionXLPipeline): two text encoders (a CLIPTextModel and a
CLIPTextModelWithProjection whose pooled output conditions the UNet), a UNet with SDXL's "text_time"
added conditioning, and a VAE of SDXL's 8x downsampling, so that it draws 64 px images from 8 px
latents. It builds and draws in seconds on a CPU; it draws nothing sensible.

    python training/make_random_sdxl.py --out runs/sdxl-tiny [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from balora_diffusion.models import save_pipeline
from balora_diffusion.paths import TOKENIZER

# hidden sizes of text_encoder and text_encoder_2; unequal as in SDXL (768, 1280), which diffusers'
# single-file loader relies on to tell the two encoders apart
TEXT_HIDDEN = (32, 48)
POOLED_DIM = 16              # text_encoder_2's projection: the pooled prompt embedding
TIME_EMBED_DIM = 8           # per added time id; SDXL has six (original size, crop corner, target size)
ADDED_TIME_IDS = 6


def _text_config(hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


def build_pipeline(seed: int = 0):
    """The random-weight StableDiffusionXLPipeline (fp32), the same weights for the same seed."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    # SDXL's layout in small: a plain first level, cross-attention below it with more than one
    # transformer block, two resnets per level, linear attention projections
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=sum(TEXT_HIDDEN), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + ADDED_TIME_IDS * TIME_EMBED_DIM)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(_text_config(TEXT_HIDDEN[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_HIDDEN[1], projection_dim=POOLED_DIM))
    # SDXL base's scheduler (diffusers' defaults fill the rest)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        # SDXL's second tokenizer is CLIP's BPE padded with "!" (OpenCLIP's padding), not with <|endoftext|>
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def build(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny random SDXL pipeline of `seed` to `folder` as a diffusers folder."""
    folder = Path(folder)
    save_pipeline(build_pipeline(seed), folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
