"""Stable Diffusion XL as ONE original-layout (SGM key names) .safetensors file, and what diffusers
needs to read one offline.

`StableDiffusionXLPipeline.from_single_file` takes the component configs from a local folder
(`config=`): the shipped assets/sdxl-config holds SDXL base 1.0's, without tokenizer files. Both
SDXL tokenizers are CLIP's BPE (the second pads with "!"), built from the shipped CLIP tokenizer
and passed in (families.sdxl.tokenizers), so the 1.6 MB vocabulary ships once:

    StableDiffusionXLPipeline.from_single_file(str(path), config=str(DEFAULT_CONFIG_DIR),
                                               local_files_only=True, **tokenizers())
"""
from __future__ import annotations

import torch

from balora_diffusion.families.sdxl import SDXL, tokenizers
from balora_diffusion.formats import ldm_checkpoint

DEFAULT_CONFIG_DIR = SDXL.config_dir

__all__ = ["DEFAULT_CONFIG_DIR", "to_original_layout", "tokenizers"]


def to_original_layout(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's weights under their original SGM names (the second text encoder in
    OpenCLIP's layout, its q/k/v projections fused)."""
    return ldm_checkpoint.to_original_layout(unet, vae, text_encoder, text_encoder_2, family=SDXL)
