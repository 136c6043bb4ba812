"""The kohya LoRA format: what A1111, ComfyUI, Forge, InvokeAI and kohya's sd-scripts read.

Keys are `lora_unet_<module path, dots as underscores>` (SDXL: its SGM path, names.kohya_unet_name)
and `lora_te_text_model_encoder_layers_<i>_<layer>` (SDXL: `lora_te1_`, `lora_te2_`; with
`text_model_` whatever transformers names the module: that is the name those tools match), each with
`.lora_down.weight`, `.lora_up.weight`, a kind's extras (DoRA: `.dora_scale`) and a 0-d `.alpha`:
the strength every kohya consumer applies is alpha / rank, so each module's real alpha is written. The `ss_*` and `modelspec.*` header entries are what those tools show a person
about a file; `balora.*` entries keep the rest of what we know.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from balora_diffusion import families
from balora_diffusion.adapters import slot_of_suffix
from balora_diffusion.errors import UserError
from balora_diffusion.families import Family
from balora_diffusion.formats.adapter import (TEXT_ENCODER, TEXT_ENCODER_2, UNET, Adapter, Factors, add_factor,
                                              assemble, info_from_metadata, info_metadata, module_tensors)
from balora_diffusion.formats.names import (FAMILY_INFO, adapter_family, kohya_file_family, kohya_unet_name,
                                            text_encoder_path, unet_underscore_names)
from balora_diffusion.formats.safetensors_io import read_file, write_file

UNET_PREFIX = "lora_unet_"
_PREFIX_PART = {"lora_unet": UNET, "lora_te": TEXT_ENCODER, "lora_te1": TEXT_ENCODER, "lora_te2": TEXT_ENCODER_2}
_KEY = re.compile(r"(lora_unet|lora_te1?|lora_te2)_(\w+?)\.(.+)")
_OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a mid factor", "oft_": "OFT",
                "diff": "full-weight difference"}

# training facts -> the ss_* entries kohya's tools write and A1111 / ComfyUI show
_SS = {"rank": "ss_network_dim", "alpha": "ss_network_alpha", "lr_unet": "ss_unet_lr", "lr_text": "ss_text_encoder_lr",
       "steps": "ss_max_train_steps", "step": "ss_steps", "seed": "ss_seed", "base_model": "ss_sd_model_name",
       "base_model_hash": "ss_new_sd_model_hash", "optimizer": "ss_optimizer", "lr_scheduler": "ss_lr_scheduler",
       "batch_size": "ss_batch_size_per_device", "num_images": "ss_num_train_images", "name": "ss_output_name"}


def kohya_key(part: str, path: str, family: Family = families.DEFAULT) -> str:
    """The kohya name of a module of an adapter for `family` (with two text encoders kohya numbers them:
    lora_te1_, lora_te2_)."""
    if part == UNET:
        return f"{UNET_PREFIX}{kohya_unet_name(path, family)}"
    return f"{family.kohya_text_prefixes[part]}text_model_{path.replace('.', '_')}"


def _metadata(adapter: Adapter, family: Family) -> dict[str, str]:
    info = adapter.info
    resolution = info.get("resolution")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": family.kohya_metadata["ss_base_model_version"],
        "ss_v2": family.kohya_metadata["ss_v2"],
        "ss_learning_rate": str(info.get("lr_unet", "")),
        "ss_training_comment": f"trained with balora-diffusion, method {info.get('method', '?')}",
        "ss_network_args": json.dumps({"method": info.get("method"), "text_rank": info.get("text_rank"),
                                       "text_alpha": info.get("text_alpha"), "lr_embedding": info.get("lr_embedding")}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.kohya_metadata["modelspec.architecture"],
        "modelspec.implementation": "diffusers",
        "modelspec.title": str(info.get("name", "LoRA")),
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
    }
    if resolution:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    if adapter.tokens:
        metadata["modelspec.trigger_phrase"] = " ".join(adapter.tokens)
    metadata.update({ss: str(info[key]) for key, ss in _SS.items() if info.get(key) is not None})
    metadata.update(info_metadata(info))
    return metadata


def write_kohya(path: Path, adapter: Adapter) -> Path:
    """`adapter` as one kohya .safetensors file (the token embedding goes to its own file)."""
    tensors, family = {}, adapter_family(adapter)
    for part, module_path, module in adapter.modules():
        key = kohya_key(part, module_path, family)
        tensors.update({f"{key}.{suffix}": tensor for suffix, tensor in module_tensors(adapter, "kohya", module).items()})
        tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha))
    return write_file(path, tensors, _metadata(adapter, family))


def is_kohya(keys) -> bool:
    return all(key.startswith(tuple(f"{prefix}_" for prefix in _PREFIX_PART)) for key in keys)


def _module_path(prefix: str, name: str, key: str, path: Path, family: Family) -> tuple[str, str]:
    part = _PREFIX_PART[prefix]
    if part == UNET:
        found = unet_underscore_names(family).get(name)
        if found is None:
            raise UserError(f"{path}: {key!r} names no layer of a {family.title} UNet "
                            "(a LoRA for another architecture?)")
        return UNET, found
    found = text_encoder_path(name)
    if found is None:
        raise UserError(f"{path}: {key!r} names no layer of a CLIP text encoder")
    return part, found


def read_kohya(path: Path) -> Adapter:
    """An Adapter from a kohya-layout LoRA of a known family; every key must be used (no partial loads)."""
    tensors, metadata = read_file(path)
    slots = {**slot_of_suffix("kohya"), "alpha": "alpha"}
    factors: Factors = {}
    family = kohya_file_family(tensors, metadata)
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match.group(3) not in slots:
            kind = next((name for marker, name in _OTHER_KINDS.items() if marker in key), None)
            raise UserError(f"{path}: {key!r} is " + (f"a {kind} weight; only LoRA and DoRA are supported" if kind
                                                       else f"not a kohya weight ({' / '.join(slots)})"))
        add_factor(factors, _module_path(match.group(1), match.group(2), key, path, family), slots[match.group(3)], key,
                   tensor, path)
    info = _info(metadata)
    if family is not families.DEFAULT:
        info.setdefault(FAMILY_INFO, family.name)
    adapter = Adapter(format="kohya", source=str(path), info=info)
    # kohya: no alpha means alpha = rank
    return assemble(adapter, factors, lambda part, module_path, rank: float(rank), "kohya")



def _info(metadata: dict[str, str]) -> dict[str, object]:
    """Training facts from our `balora.*` entries, else from kohya's `ss_*` ones."""
    info: dict[str, object] = {key: metadata[ss] for key, ss in _SS.items() if metadata.get(ss) not in (None, "", "None")}
    return {**info, **info_from_metadata(metadata)}
