"""Stable Diffusion 1.x (and the tiny shipped model of its architecture).

One CLIP text encoder, whose last hidden states are the UNet's cross-attention states; 512 px;
kohya spells its text-encoder layers `lora_te_...`; single files name the text encoder
`cond_stage_model.transformer.text_model.`.
"""
from __future__ import annotations

import torch

from balora_diffusion import paths
from balora_diffusion.families.family import Conditioning, Family, SizeCondition
from balora_diffusion.families.ldm_layout import prefixed, unet_ldm_name
from balora_diffusion.text_encoding import encode_captions


def encode(encoders: list[torch.nn.Module], ids: list[torch.Tensor], device: torch.device,
           sizes: list[SizeCondition] | None = None, distinct: bool = True) -> Conditioning:
    """The text encoder's last hidden states; the image's size and crop are not the UNet's concern."""
    return Conditioning(encode_captions(encoders[0], ids[0], device, distinct))


SD1 = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    pipeline_class="StableDiffusionPipeline",
    class_names=("StableDiffusionPipeline",),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    config_dir=paths.SD15_CONFIG,
    single_file_marker="cond_stage_model.transformer.",
    single_file_text={"text_encoder": prefixed("cond_stage_model.transformer.text_model.")},
    encode=encode,
    kohya_text_prefixes={"text_encoder": "lora_te_"},
    kohya_metadata={"ss_base_model_version": "sd_v1", "ss_v2": "False",
                    "modelspec.architecture": "stable-diffusion-v1/lora"},
    unet_ldm_name=unet_ldm_name,
    kohya_unet_original=False,  # sd-scripts writes diffusers paths for SD 1.x; the LDM spelling is read too
    # the pipeline's safety checker is not part of these models; without these it warns at every load
    load_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
)
