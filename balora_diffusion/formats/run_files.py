"""A training run's adapter: taken from the trained models or from any checkpoint of the run, and
written into the run folder in every consumer's format.

    RUN/adapter/pytorch_lora_weights.safetensors   diffusers / peft (pipe.load_lora_weights(RUN/adapter))
    RUN/adapter/<token>.safetensors                the new token's embedding (load_textual_inversion)
    RUN/kohya/<run name>.safetensors               A1111 / ComfyUI / Forge LoRA
    RUN/kohya/<token>.safetensors                  the same embedding, for their embeddings folder
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import paths
from balora_diffusion.adapters import kind_of_peft_layer, slot_of_suffix
from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import (PARTS, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_PARTS, UNET, Adapter, Factors,
                                              LoraModule, add_factor, alpha_number, assemble, token_stem)
from balora_diffusion.formats.diffusers_lora import write_diffusers
from balora_diffusion.formats.embedding import write_embedding
from balora_diffusion.formats.kohya_lora import write_kohya
from balora_diffusion.formats.names import canonical_text_path
from balora_diffusion.run_layout import CONFIG_TREE, DIFFUSERS_FOLDER, KOHYA_FOLDER, META_TREE, TRAINABLE_TREE
from balora_diffusion.versions import installed_version

_PART_KEY = re.compile(rf"({'|'.join(sorted(PARTS, key=len, reverse=True))})\.(.+)")
_EMBEDDING = re.compile(r"(text_encoder|text_encoder_2)\.(?:text_model\.)?embeddings\.token_embedding\.extra")
_CHECKPOINT_CONFIG = {"alpha", "text_alpha", "output_dir", "token"}


def _canonical(part: str, path: str) -> str:
    return canonical_text_path(path) if part in TEXT_PARTS else path


def _sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_model_hash(base_model: str) -> str | None:
    """SHA-256 of a single-file base model (what A1111 shows as its hash), or of the sorted
    (name, SHA-256) list of a diffusers folder's weight files; None when the model is not here."""
    path = Path(base_model) if base_model else paths.TINY_SD
    if path.is_file():
        return _sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{_sha256(file)}\n".encode())
    return digest.hexdigest()


def training_info(cfg: dict, step: int, name: str) -> dict[str, object]:
    """What the formats record of a run (TrainConfig as a dict) at `step`."""
    keys = ("method", "rank", "alpha", "text_rank", "text_alpha", "lr_unet", "lr_text", "lr_embedding", "steps",
            "seed", "optimizer", "lr_scheduler", "batch_size", "resolution", "token")
    info: dict[str, object] = {key: cfg[key] for key in keys if key in cfg}
    # the base model's file or folder name, not its path: a path says where on this machine it lies
    info.update({"step": step, "name": name, "base_model": Path(cfg.get("base_model") or "balora-diffusion-tiny-sd").name,
                 "toolkit_version": installed_version("balora-diffusion") or "unknown"})
    if (digest := base_model_hash(cfg.get("base_model", ""))) is not None:
        info["base_model_hash"] = digest
    return info


def adapter_from_models(unet, text_encoder, embedding, tokens: list[str], info: dict,
                        text_encoder_2=None, embedding_2=None) -> Adapter:
    """The peft LoRA layers ("default" adapter) of the trained models (None: a model not adapted) and the
    new tokens' rows."""
    from peft.tuners.lora import LoraLayer

    parts, kinds = {}, set()
    for part, model in ((UNET, unet), (TEXT_ENCODER, text_encoder), (TEXT_ENCODER_2, text_encoder_2)):
        if model is None:
            continue
        parts[part] = {}
        for path, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                kind = kind_of_peft_layer(layer, "default")
                kinds.add(kind.name)
                parts[part][_canonical(part, path)] = LoraModule(
                    layer.lora_A["default"].weight.detach().float().cpu(),
                    layer.lora_B["default"].weight.detach().float().cpu(),
                    float(layer.lora_alpha["default"]), key=f"{part}.{path}",
                    extras=kind.extras_of_peft_layer(layer, "default"))
    if len(kinds) > 1:
        raise ValueError(f"the models hold adapters of several kinds ({', '.join(sorted(kinds))})")
    return Adapter(parts, kind=kinds.pop() if kinds else "lora", tokens=list(tokens), info=info, format="balora run",
                   embedding=None if embedding is None else embedding.extra.detach().float().cpu(),
                   embedding_2=None if embedding_2 is None else embedding_2.extra.detach().float().cpu())


def adapter_from_checkpoint(folder: Path) -> Adapter:
    """The adapter as it was at a checkpoint of a run (`RUN/checkpoints/step-N`)."""
    folder = Path(folder)
    if (problem := ckpt.damage(folder)) is not None:
        raise UserError(f"checkpoint {folder} is damaged ({problem})")
    trainable, cfg, step = _checkpoint_trees(folder)
    where = f"checkpoint {folder}"
    alphas = {UNET: alpha_number(f"{where}: config alpha", cfg["alpha"]),
              **{part: alpha_number(f"{where}: config text_alpha", cfg["text_alpha"]) for part in TEXT_PARTS}}
    slots = slot_of_suffix("checkpoint")
    factors: Factors = {}
    rows: dict[str, torch.Tensor] = {}
    for key, tensor in trainable.items():
        if found := _EMBEDDING.fullmatch(key):
            rows[found.group(1)] = tensor
            continue
        match = _PART_KEY.fullmatch(key)
        suffix = match and next((s for s in slots if match.group(2).endswith("." + s)), None)
        if not suffix:
            raise UserError(f"{where}: {key!r} is no tensor of any adapter kind, nor the token embedding")
        module = (match.group(1), _canonical(match.group(1), match.group(2)[:-len(suffix) - 1]))
        add_factor(factors, module, slots[suffix], key, tensor, where)
    adapter = Adapter(tokens=list(cfg["token"]) if rows else [], embedding=rows.get(TEXT_ENCODER),
                      embedding_2=rows.get(TEXT_ENCODER_2),
                      info=training_info(cfg, step, Path(cfg["output_dir"]).name),
                      format=f"balora checkpoint (step {step})", source=str(folder))
    return assemble(adapter, factors, lambda part, path, rank: alphas[part], "checkpoint")


def _checkpoint_trees(folder: Path) -> tuple[dict, dict, int]:
    """The trainable tensors, the training config and the step of a checkpoint; UserError where its
    files, intact as its manifest says, still do not hold what a training writes."""
    from safetensors import SafetensorError

    try:
        trainable, cfg = ckpt.load_tree(folder, TRAINABLE_TREE), ckpt.load_tree(folder, CONFIG_TREE)
        step = int(ckpt.load_tree(folder, META_TREE)["step"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {folder} is not readable ({type(exc).__name__}: {exc})") from None
    tensors = isinstance(trainable, dict) and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                  for key, value in trainable.items())
    config = (isinstance(cfg, dict) and _CHECKPOINT_CONFIG <= cfg.keys() and isinstance(cfg["output_dir"], str)
              and isinstance(cfg["token"], list) and all(isinstance(token, str) for token in cfg["token"]))
    if not (tensors and config):
        raise UserError(f"checkpoint {folder} does not hold a training's config "
                        f"({', '.join(sorted(_CHECKPOINT_CONFIG))}) and trainable tensors")
    return trainable, cfg, step


def kohya_file_name(name: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('._') or 'lora'}.safetensors"


def write_run_adapters(out: Path, adapter: Adapter) -> None:
    """The diffusers folder and the kohya folder of a run (see the module's docstring), each
    written whole or not at all."""
    name = str(adapter.info.get("name") or out.name)
    with atomic_path(out / DIFFUSERS_FOLDER) as tmp:
        tmp.mkdir(parents=True)
        write_diffusers(tmp, adapter)
        if adapter.embedding is not None:
            write_embedding(tmp, adapter.tokens, adapter.embedding, adapter.embedding_2)
    with atomic_path(out / KOHYA_FOLDER) as tmp:
        tmp.mkdir(parents=True)
        lora_name = kohya_file_name(name)
        if adapter.embedding is not None and lora_name == f"{token_stem(adapter.tokens[0])}.safetensors":
            lora_name = kohya_file_name(f"{name}-lora")  # the two files must not share the prompt word
        write_kohya(tmp / lora_name, adapter)
        if adapter.embedding is not None:
            write_embedding(tmp, adapter.tokens, adapter.embedding, adapter.embedding_2)
