"""Stable Diffusion XL (base).

Two CLIP text encoders: the UNet's cross-attention states are both encoders' penultimate hidden
states side by side, and it also takes the second encoder's pooled (projected) embedding and six
"time ids": the image's original size, the top-left corner of its crop and the size trained at,
each (height, width) in pixels. 1024 px; kohya spells the encoders `lora_te1_` / `lora_te2_` and
the UNet by its SGM names (sdxl_names); a single file holds the second encoder in OpenCLIP's layout.
"""
from __future__ import annotations

import torch

from balora_diffusion import paths
from balora_diffusion.families.family import Conditioning, Family, SizeCondition
from balora_diffusion.families.ldm_layout import prefixed
from balora_diffusion.families.sdxl_names import TEXT1_PREFIX, TEXT2_PREFIX, open_clip_tensors, unet_sgm_param
from balora_diffusion.text_encoding import encoded_rows


def _penultimate(encoder: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (encoder(rows, output_hidden_states=True).hidden_states[-2],)


def _penultimate_and_pooled(encoder: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = encoder(rows, output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # out[0]: the projected pooled embedding (text_embeds)


def time_ids(sizes: list[SizeCondition], device: torch.device) -> torch.Tensor:
    """(batch, 6): original (h, w), crop (top, left), target (h, w) per image, as the pipeline builds them."""
    return torch.tensor([[*s.original, *s.crop, *s.target] for s in sizes], dtype=torch.float32, device=device)


def encode(encoders: list[torch.nn.Module], ids: list[torch.Tensor], device: torch.device,
           sizes: list[SizeCondition] | None = None, distinct: bool = True) -> Conditioning:
    if sizes is None or len(sizes) != len(ids[0]):
        raise ValueError("SDXL conditioning needs each image's size and crop")
    first = encoded_rows(encoders[0], ids[0], device, _penultimate, distinct)[0]
    second, pooled = encoded_rows(encoders[1], ids[1], device, _penultimate_and_pooled, distinct)
    return Conditioning(torch.cat([first, second], dim=-1), {"text_embeds": pooled, "time_ids": time_ids(sizes, device)})


def tokenizers() -> dict[str, object]:
    """`tokenizer` and `tokenizer_2` of an SDXL pipeline, as keyword arguments for its loaders: both
    CLIP's BPE, which OpenCLIP (the second) pads with "!" (id 0) and CLIP ViT-L with <|endoftext|>."""
    from transformers import CLIPTokenizer

    return {"tokenizer": CLIPTokenizer.from_pretrained(paths.TOKENIZER),
            "tokenizer_2": CLIPTokenizer.from_pretrained(paths.TOKENIZER, pad_token="!")}


SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    class_names=("StableDiffusionXLPipeline",),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    config_dir=paths.SDXL_CONFIG,
    single_file_marker=TEXT2_PREFIX,
    single_file_text={"text_encoder": prefixed(TEXT1_PREFIX), "text_encoder_2": open_clip_tensors},
    single_file_parts=tokenizers,  # the shipped config folder holds no tokenizer files
    encode=encode,
    kohya_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    kohya_metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
    unet_ldm_name=unet_sgm_param,
    kohya_unet_original=True,
)
