"""The UNet's original (LDM) weight names, which SD 1.x and SDXL (SGM) files share.

kohya's `lora_unet_` names of the LDM spelling and the single-file checkpoints both use them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_ldm_name(name: str, config) -> str:
    """LDM's UNet is flat lists of modules: `input_blocks` has, per level, one slot per resnet (with
    its attention at index 1) plus a slot for the downsampler; `output_blocks` has one slot per resnet
    (attention at 1, the upsampler after them in the level's last slot)."""
    module, leaf = name.rsplit(".", 1)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    parts = module.split(".")
    slots = int(config["layers_per_block"]) + 1

    def inner(kind: str, sub: list[str]) -> str:
        return ".".join([_UNET_RESNET[sub[0]], *sub[1:]] if kind == "resnets" else sub)

    if parts[0] == "mid_block":
        kind, index, sub = parts[1], int(parts[2]), parts[3:]
        return f"middle_block.{2 * index if kind == 'resnets' else 1}.{inner(kind, sub)}.{leaf}"
    side, block, kind, index, sub = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if side == "down_blocks":
        first = 1 + block * slots
        if kind == "downsamplers":
            return f"input_blocks.{first + slots - 1}.0.op.{leaf}"
        return f"input_blocks.{first + index}.{0 if kind == 'resnets' else 1}.{inner(kind, sub)}.{leaf}"
    if side != "up_blocks":
        raise KeyError(name)
    first = block * slots
    if kind == "upsamplers":
        after_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{first + slots - 1}.{2 if after_attention else 1}.conv.{leaf}"
    return f"output_blocks.{first + index}.{0 if kind == 'resnets' else 1}.{inner(kind, sub)}.{leaf}"


def prefixed(prefix: str) -> Callable[[torch.nn.Module], dict[str, torch.Tensor]]:
    """The original-layout tensors of a CLIP text encoder stored under transformers' own names after
    `prefix` (tensors shared, not copied)."""
    def layout(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
        # transformers >= 5.6 dropped CLIPTextModel's `.text_model` child; older versions still have it
        inner = getattr(text_encoder, "text_model", text_encoder)
        return {prefix + name: tensor for name, tensor in inner.state_dict().items()}
    return layout
