"""Layer names of Stable Diffusion 1.x in the spellings the formats use.

kohya files name a layer by its module path with dots turned into underscores, which cannot be
undone by rule (`to_q`, `down_blocks` hold underscores themselves); the UNet's names are therefore
looked up in a table built from SD 1.5's own architecture (shipped configs, meta device, no
weights), which also knows the original LDM spelling some older files use.
"""
from __future__ import annotations

import re
from functools import cache

import torch

from balora_diffusion import paths

TEXT_LAYER = re.compile(r"(?:text_model[._])?encoder[._]layers[._](\d+)[._](self_attn[._](?:q|k|v|out)_proj|mlp[._]fc[12])")


def text_encoder_path(name: str) -> str | None:
    """`encoder.layers.I.<layer>` for a text-encoder layer name in any spelling (dots or underscores,
    with or without `text_model`), or None."""
    found = TEXT_LAYER.fullmatch(name)
    if found is None:
        return None
    layer = found.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"encoder.layers.{found.group(1)}.{layer}"


def canonical_text_path(name: str) -> str:
    """A text-encoder module name in the canonical spelling: without transformers 4's `text_model.`."""
    return text_encoder_path(name) or name.removeprefix("text_model.")


@cache
def sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(paths.SD15_CONFIG / "unet"))


@cache
def unet_underscore_names() -> dict[str, str]:
    """`down_blocks_0_attentions_0_proj_in` (and its LDM spelling `input_blocks_1_1_proj_in`) ->
    `down_blocks.0.attentions.0.proj_in`, for every Linear and Conv2d layer of SD 1.5's UNet."""
    from balora_diffusion.formats.ldm_checkpoint import unet_ldm_name

    unet = sd15_unet()
    table = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            table[path.replace(".", "_")] = path
            table[unet_ldm_name(f"{path}.weight", unet.config).removesuffix(".weight").replace(".", "_")] = path
    return table
