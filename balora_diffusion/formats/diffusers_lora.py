"""The diffusers / peft LoRA format: what `pipe.load_lora_weights` and peft read.

Keys are `unet.<module>.lora_A.weight` (down) / `.lora_B.weight` (up) and
`text_encoder.text_model.<module>...`: the `text_model.` spelling loads with transformers 4 (whose
CLIPTextModel has that child) and 5 alike, while the short one written by transformers >= 5.6 makes
older diffusers fail. No alpha is stored in the tensors: diffusers builds peft's LoraConfig from the
adapter metadata in the header, which is always written: per model the most common rank and alpha,
and `rank_pattern` / `alpha_pattern` naming every module that differs. Without it diffusers infers
the ranks itself, which fails inside peft once they differ (a KeyError 'model_type').

The reader also takes peft's own files (`base_model.model.<module>...`, alpha in adapter_config.json)
and older diffusers spellings (`lora.down` / `lora.up`, attention processors' `to_q_lora`).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import (PARTS, TEXT_ENCODER, TEXT_PARTS, UNET, Adapter, Factors, LoraModule,
                                              add_factor, alpha_number, assemble, info_from_metadata, info_metadata)
from balora_diffusion.formats.names import text_encoder_path
from balora_diffusion.formats.safetensors_io import read_file, write_file

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_FACTOR = {"lora_A": "down", "lora_B": "up", "lora.down": "down", "lora.up": "up",
           "lora_down": "down", "lora_up": "up"}
_PART = "|".join(sorted(PARTS, key=len, reverse=True))  # text_encoder_2 before text_encoder
_KEY = re.compile(rf"(?:({_PART})|base_model\.model)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|"
                  rf"lora_up)(?:\.default)?\.weight|({_PART})\.(.+)\.alpha")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")


def _file_path(part: str, path: str) -> str:
    return f"{part}.text_model.{path}" if part in TEXT_PARTS else f"{part}.{path}"


def write_diffusers(folder: Path, adapter: Adapter) -> Path:
    """`folder/pytorch_lora_weights.safetensors` for `adapter` (its token embedding is written
    separately, see embedding.py); `adapter.info` goes into the header as `balora.*` JSON entries."""
    tensors, config = {}, {}
    for part, modules in adapter.parts().items():
        if not modules:
            continue
        config.update({f"{part}.{key}": value for key, value in _lora_config(modules).items()})
        for path, module in modules.items():
            tensors[f"{_file_path(part, path)}.lora_A.weight"] = module.down
            tensors[f"{_file_path(part, path)}.lora_B.weight"] = module.up
    metadata = info_metadata(adapter.info)
    if config:
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return write_file(Path(folder) / LORA_FILE, tensors, metadata)


def _lora_config(modules: dict[str, LoraModule]) -> dict[str, object]:
    """peft's LoraConfig of one model's modules: the most common rank and alpha, and each module
    that differs by its full path (peft matches a pattern against the end of a module's name; a
    full path is the end of that module's name only). diffusers up to 0.35 reads both patterns
    unconditionally, so they are written even when empty."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": alpha,
            "rank_pattern": {path: m.rank for path, m in sorted(modules.items()) if m.rank != rank},
            "alpha_pattern": {path: m.alpha for path, m in sorted(modules.items()) if m.alpha != alpha},
            "target_modules": sorted(modules), "peft_type": "LORA"}


def _module_path(part: str | None, raw: str) -> tuple[str, str] | None:
    """(part, canonical module path) of a key's module name, or None when it names no layer of a text
    encoder it says it adapts. peft's own files name no part: a text-encoder layer there is the first's."""
    raw = _PROCESSOR.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), raw)
    te_path = text_encoder_path(raw)
    if part in TEXT_PARTS or (part is None and te_path is not None):
        return (part or TEXT_ENCODER, te_path) if te_path is not None else None
    return UNET, raw


def _alphas(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """Per part: {"alpha": default alpha or None, "pattern": {module suffix: alpha}} from diffusers'
    header metadata or peft's adapter_config.json beside the file."""
    found: dict[str, dict] = {part: {"alpha": None, "pattern": {}} for part in PARTS}
    if METADATA_KEY in metadata:
        where = f"{path}: its {METADATA_KEY} header entry"
        config = _json_object(metadata[METADATA_KEY], where)
        for part in PARTS:
            found[part] = _part_alphas(config, f"{part}.lora_alpha", f"{part}.alpha_pattern", where)
    elif path.name == PEFT_FILE and (path.parent / PEFT_CONFIG).is_file():
        where = str(path.parent / PEFT_CONFIG)
        try:
            text = (path.parent / PEFT_CONFIG).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where} is not JSON") from None
        config = _json_object(text, where)
        for part in PARTS:
            found[part] = _part_alphas(config, "lora_alpha", "alpha_pattern", where)
    return found


def _json_object(text: str, where: str) -> dict:
    try:
        config = json.loads(text)
    except ValueError:
        raise UserError(f"{where} is not JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{where} is not a JSON object")
    return config


def _part_alphas(config: dict, alpha_key: str, pattern_key: str, where: str) -> dict:
    alpha, pattern = config.get(alpha_key), config.get(pattern_key) or {}
    if not isinstance(pattern, dict):
        raise UserError(f"{where}: {pattern_key} is not a mapping of module names to alphas")
    return {"alpha": None if alpha is None else alpha_number(f"{where}: {alpha_key}", alpha),
            "pattern": {suffix: alpha_number(f"{where}: {pattern_key} {suffix!r}", value)
                        for suffix, value in pattern.items()}}


def _alpha_for(path: str, rank: int, alphas: dict) -> float:
    for suffix, alpha in alphas["pattern"].items():
        if path == suffix or path.endswith("." + suffix):
            return alpha
    return alphas["alpha"] if alphas["alpha"] is not None else float(rank)


def read_diffusers(path: Path) -> Adapter:
    """An Adapter from a diffusers- or peft-layout LoRA file; every key must be used."""
    tensors, metadata = read_file(path)
    factors: Factors = {}
    for key, tensor in tensors.items():
        # attention processors' spelling: `...attn1.processor.to_q_lora.down.weight`
        match = _KEY.fullmatch(re.sub(r"_lora\.(down|up)\.weight$", r".lora.\1.weight", key))
        named = match and _module_path(match.group(1) or match.group(4), match.group(2) or match.group(5))
        if not named:
            raise UserError(f"{path}: {key!r} is not a LoRA weight of a Stable Diffusion 1.x UNet or text encoder "
                            "in the diffusers or peft layout")
        add_factor(factors, named, "alpha" if match.group(4) else _FACTOR[match.group(3)], key, tensor, path)
    alphas = _alphas(metadata, path)
    adapter = Adapter(format="diffusers", source=str(path), info=info_from_metadata(metadata))
    return assemble(adapter, factors, lambda part, module_path, rank: _alpha_for(module_path, rank, alphas[part]))

