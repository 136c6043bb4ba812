"""Layer names of Stable Diffusion XL in the spellings its formats use.

UNet: diffusers nests layers as `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`; an
original (SGM) checkpoint and kohya's SDXL LoRA files use SGM's flat block lists,
`input_blocks.4.1.transformer_blocks.0.attn1.to_q` (kohya: `lora_unet_input_blocks_4_1_...`).
The renumbering is SD 1.x's (families.ldm_layout.unet_ldm_name, computed from the config);
SDXL adds its size-and-crop conditioning, `add_embedding` -> `label_emb.0`.

Text encoders: kohya names both after the transformers modules, `lora_te1_text_model_encoder_
layers_0_self_attn_q_proj` (CLIP ViT-L) and `lora_te2_...` (OpenCLIP ViT-bigG, whose fused
attention input projection transformers splits into q/k/v), whatever transformers version wrote
them; ComfyUI reads the same names. The original checkpoint stores the second encoder in
OpenCLIP's own layout instead (`text2_original_name`).
"""
from __future__ import annotations

import json
import re
from functools import cache

import torch

from balora_diffusion.families.ldm_layout import unet_ldm_name
from balora_diffusion.families.clip_names import text_encoder_path

UNET_PREFIX = "model.diffusion_model."
TEXT1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TEXT2_PREFIX = "conditioner.embedders.1.model."

KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = {1: "lora_te1_", 2: "lora_te2_"}

_ADDED_CONDITIONING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# transformers CLIP -> OpenCLIP, for the parts of a name that differ
_OPEN_CLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


# --- UNet --------------------------------------------------------------------------------------

def unet_sgm_param(name: str, config) -> str:
    """SGM name (without `model.diffusion_model.`) of a diffusers SDXL UNet parameter, e.g.
    `down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight`."""
    module, leaf = name.rsplit(".", 1)
    if module in _ADDED_CONDITIONING:
        return f"{_ADDED_CONDITIONING[module]}.{leaf}"
    return unet_ldm_name(name, config)


def unet_sgm_module(path: str, config) -> str:
    """SGM path of a diffusers SDXL UNet module that holds parameters (a Linear, Conv2d or norm)."""
    return unet_sgm_param(f"{path}.weight", config).removesuffix(".weight")


def _config_key(config) -> str:
    return json.dumps(dict(config), sort_keys=True, default=str)


@cache
def _unet_table(config_key: str) -> dict[str, str]:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_key)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {path: unet_sgm_module(path, unet.config) for path, module in unet.named_modules()
            if next(module.parameters(recurse=False), None) is not None}


def unet_table(config) -> dict[str, str]:
    """diffusers module path -> SGM module path, for every module of the UNet that holds parameters
    (built once per config on the meta device: no weights)."""
    return dict(_unet_table(_config_key(config)))


@cache
def _kohya_unet_names(config_key: str) -> dict[str, str]:
    table = {}
    for path, sgm in _unet_table(config_key).items():
        table[sgm.replace(".", "_")] = path
        # some SDXL LoRA trainers write diffusers module paths instead; ComfyUI reads both
        table[path.replace(".", "_")] = path
    return table


def kohya_unet_key(path: str, config) -> str:
    """`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` for a diffusers module path."""
    return KOHYA_UNET + unet_sgm_module(path, config).replace(".", "_")


def unet_module_from_kohya(key: str, config) -> str | None:
    """The diffusers module path of a kohya UNet layer name (`lora_unet_...`, SGM or diffusers
    spelling, without `.lora_down.weight`), or None if the UNet has no such layer."""
    return _kohya_unet_names(_config_key(config)).get(key.removeprefix(KOHYA_UNET))


# --- text encoders -----------------------------------------------------------------------------

def kohya_text_key(encoder: int, path: str) -> str:
    """`lora_te{1,2}_text_model_encoder_layers_I_<layer>` for a text-encoder layer path in any
    spelling (with or without transformers' `text_model.`); encoder 1 is CLIP ViT-L, 2 OpenCLIP
    ViT-bigG."""
    canonical = text_encoder_path(path)
    if encoder not in KOHYA_TEXT or canonical is None:
        raise KeyError(f"no kohya name for text encoder {encoder} layer {path!r}")
    return f"{KOHYA_TEXT[encoder]}text_model_{canonical.replace('.', '_')}"


def text_module_from_kohya(key: str) -> tuple[int, str] | None:
    """(encoder 1 or 2, `encoder.layers.I.<layer>`) of a kohya SDXL text-encoder layer name, or None.

    The path is relative to the text transformer: CLIPTextModelWithProjection (and CLIPTextModel
    before transformers 5.6) hold it under `text_model.`."""
    for encoder, prefix in KOHYA_TEXT.items():
        if key.startswith(prefix):
            canonical = text_encoder_path(key.removeprefix(prefix))
            return None if canonical is None else (encoder, canonical)
    return None


def text2_original_name(name: str) -> tuple[str, int | None]:
    """OpenCLIP name (without `conditioner.embedders.1.model.`) of a CLIPTextModelWithProjection
    parameter, and for the attention's q/k/v projections their third (0, 1, 2) of OpenCLIP's fused
    `in_proj_weight` / `in_proj_bias`. `text_projection.weight` is stored transposed as
    `text_projection`."""
    if name == "text_projection.weight":
        return "text_projection", None
    inner = name.removeprefix("text_model.")
    if inner in _OPEN_CLIP_FIXED:
        return _OPEN_CLIP_FIXED[inner], None
    found = _ENCODER_LAYER.fullmatch(inner)
    if found is None:
        raise KeyError(name)
    index, layer, leaf = found.groups()
    block = f"transformer.resblocks.{index}"
    if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{block}.attn.in_proj_{leaf}", "qkv".index(layer[-6])
    return f"{block}.{_OPEN_CLIP_LAYER[layer]}.{leaf}", None


def open_clip_tensors(text_encoder_2) -> dict[str, torch.Tensor]:
    """The second text encoder's tensors under their original names (OpenCLIP's layout, the q/k/v
    projections fused)."""
    tensors, thirds = {}, {}
    for name, tensor in text_encoder_2.state_dict().items():
        key, third = text2_original_name(name)
        if third is not None:
            thirds.setdefault(key, [None] * 3)[third] = tensor
        else:
            tensors[TEXT2_PREFIX + key] = tensor.T if key == "text_projection" else tensor
    tensors.update({TEXT2_PREFIX + key: torch.cat(parts) for key, parts in thirds.items()})
    return tensors
