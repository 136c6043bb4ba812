"""The LoRA target shapes of Stable Diffusion 1.5, read off models built on the meta device.

No download and no memory: the UNet and the CLIP ViT-L/14 text encoder are
instantiated from their config values under `torch.device("meta")`, and the
attention projections' Linear shapes (out_features, in_features) are collected.
"""
from __future__ import annotations

import torch
from torch import nn

# SD 1.5's unet/config.json (the values that shape the attention layers; the rest are diffusers defaults).
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# CLIP ViT-L/14's text tower (SD 1.x). transformers' CLIPTextConfig() defaults are the
# smaller ViT-B text tower (hidden 512, 8 heads), so every size is given explicitly.
SD15_TEXT_ENCODER_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def linear_shapes(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every nn.Linear whose name ends in a target."""
    return [(name, mod.out_features, mod.in_features) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def unet_shapes() -> list[tuple[str, int, int]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return linear_shapes(unet, UNET_TARGETS)


def text_encoder_shapes() -> list[tuple[str, int, int]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    return linear_shapes(encoder, TEXT_ENCODER_TARGETS)
