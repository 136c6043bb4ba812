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
from balora_diffusion.models import quiet_diffusers

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "embeddings.safetensors"


def _lora_config(model) -> dict:
    config = model.peft_config["default"].to_dict()
    # Where this machine keeps the base model: of no use to a reader of the file, and private.
    config["base_model_name_or_path"] = None
    # A set lists its items in string-hash order, which changes from one process to the next.
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file with its `__metadata__` keys sorted.

    safetensors 0.8 writes them in a random order on every save (safetensors issue 584), so two
    identical adapters would differ byte for byte. The tensors' offsets count from the end of the
    header, so only the header changes; it stays padded to 8 bytes like safetensors pads it.
    """
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


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
        _sort_header_metadata(tmp / LORA_FILE)
        if embedding is not None:
            save_file({"clip_l": embedding.extra.detach().float().cpu().contiguous()},
                      str(tmp / EMBEDDING_FILE), metadata={"tokens": json.dumps(tokens)})
    return folder


def load_adapter(pipe, folder: Path, adapter_name: str = "default") -> list[str]:
    """Load an adapter folder written by `save_adapter` into `pipe`; returns the placeholder tokens."""
    folder = Path(folder)
    with quiet_diffusers():
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=adapter_name)
    emb_path = folder / EMBEDDING_FILE
    if not emb_path.is_file():
        return []
    with safe_open(str(emb_path), framework="pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
        vectors = f.get_tensor("clip_l")
    with quiet_diffusers():
        pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=tokens,
                                    tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    return tokens
