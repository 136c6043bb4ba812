"""Adapter files: the diffusers / peft LoRA format with alpha metadata, and the token embedding.

The diffusers format stores no alpha in its tensors; without the adapter metadata diffusers loads
with lora_alpha = r, i.e. the wrong strength whenever alpha != r. So the metadata is always written.
New-token embeddings go to a separate single-tensor file (`{"clip_l": (k, d)}`), the layout
A1111, ComfyUI and diffusers' `load_textual_inversion` read.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from balora_diffusion.atomic import atomic_path

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "embeddings.safetensors"


def _lora_config(model) -> dict:
    return model.peft_config["default"].to_dict()


def save_adapter(folder: Path, unet, text_encoder, embedding, tokens: list[str]) -> Path:
    """Write LoRA weights (+ alpha metadata) and the new-token embedding(s) into `folder` atomically."""
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        kwargs = {"unet_lora_layers": get_peft_model_state_dict(unet),
                  "unet_lora_adapter_metadata": _lora_config(unet)}
        if text_encoder is not None:
            kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder)
            kwargs["text_encoder_lora_adapter_metadata"] = _lora_config(text_encoder)
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name=LORA_FILE, **kwargs)
        if embedding is not None:
            save_file({"clip_l": embedding.extra.detach().float().cpu().contiguous()},
                      str(tmp / EMBEDDING_FILE), metadata={"tokens": json.dumps(tokens)})
    return folder


def load_adapter(pipe, folder: Path, adapter_name: str = "default") -> list[str]:
    """Load an adapter folder written by `save_adapter` into `pipe`; returns the placeholder tokens."""
    folder = Path(folder)
    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=adapter_name)
    emb_path = folder / EMBEDDING_FILE
    if not emb_path.is_file():
        return []
    with safe_open(str(emb_path), framework="pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
        vectors = f.get_tensor("clip_l")
    pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=tokens,
                                tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    return tokens
