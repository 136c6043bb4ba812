"""Layer names of a family's models in the spellings the formats use.

kohya files name a layer by its module path with dots turned into underscores, which cannot be
undone by rule (`to_q`, `down_blocks` hold underscores themselves); the UNet's names are therefore
looked up in a table built from the family's full-size architecture (its shipped configs, meta
device, no weights), which also knows the original LDM / SGM spelling some files use. The text
encoders of every family are CLIP's, whose layer names follow one rule.
"""
from __future__ import annotations

from functools import cache

import torch

from balora_diffusion import families
from balora_diffusion.families import Family
from balora_diffusion.families.clip_names import canonical_text_path, text_encoder_path

__all__ = ["canonical_text_path", "meta_unet", "text_encoder_path", "unet_underscore_names"]

@cache
def meta_unet(family: Family = families.DEFAULT) -> torch.nn.Module:
    """The UNet of `family`'s shipped config, on the meta device (names and shapes, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(family.config_dir / "unet"))


@cache
def unet_underscore_names(family: Family = families.DEFAULT) -> dict[str, str]:
    """`down_blocks_0_attentions_0_proj_in` (and its LDM spelling `input_blocks_1_1_proj_in`) ->
    `down_blocks.0.attentions.0.proj_in`, for every Linear and Conv2d layer of the family's UNet."""
    unet = meta_unet(family)
    table = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            table[path.replace(".", "_")] = path
            table[family.unet_ldm_name(f"{path}.weight", unet.config).removesuffix(".weight").replace(".", "_")] = path
    return table
