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

__all__ = ["FAMILY_INFO", "adapter_family", "canonical_text_path", "kohya_file_family", "kohya_unet_name", "meta_unet",
           "text_encoder_path", "unet_underscore_names"]

# an adapter's `info` entry naming its model family; absent: the default family, as before families
FAMILY_INFO = "model_family"

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


def kohya_unet_name(path: str, family: Family = families.DEFAULT) -> str:
    """The name (dots as underscores, no prefix) a kohya file gives the UNet layer at diffusers `path`."""
    if not family.kohya_unet_original:
        return path.replace(".", "_")
    unet = meta_unet(family)
    return family.unet_ldm_name(f"{path}.weight", unet.config).removesuffix(".weight").replace(".", "_")


def adapter_family(adapter) -> Family:
    """The family an adapter (formats.Adapter) was trained for: what its info says, else the first
    (the default first) with every text encoder the adapter adapts or holds token rows for."""
    named = adapter.info.get(FAMILY_INFO)
    if isinstance(named, str):
        return families.by_name(named)
    used = {part for part, modules in adapter.parts().items() if modules and part != "unet"} | set(adapter.embeddings())
    return next(f for f in (families.DEFAULT, *families.FAMILIES) if used <= set(f.text_encoders))


def kohya_file_family(keys, metadata: dict[str, str]) -> Family:
    """The family of a kohya file: kohya's base-model entry, else the family whose text-encoder prefixes
    the file uses (numbered ones first: a file may spell SDXL's first encoder lora_te_ beside a lora_te2_),
    else the first whose UNet has every layer it names; a family is only chosen where its UNet has
    them all."""
    for family in families.FAMILIES:
        if metadata.get("ss_base_model_version") == family.kohya_metadata["ss_base_model_version"]:
            return family
    keys = list(keys)
    unet = {key.split(".")[0].removeprefix("lora_unet_") for key in keys if key.startswith("lora_unet_")}
    fitting = [f for f in (families.DEFAULT, *families.FAMILIES) if unet <= unet_underscore_names(f).keys()]
    for family in sorted(fitting, key=lambda f: -len(f.kohya_text_prefixes)):
        if any(key.startswith(tuple(family.kohya_text_prefixes.values())) for key in keys):
            return family
    return fitting[0] if fitting else families.DEFAULT
