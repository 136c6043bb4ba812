"""New-token embeddings as one-tensor .safetensors files: the layout A1111, ComfyUI and diffusers'
`load_textual_inversion` all read.

The tensor's key is the (first) token, so diffusers loads it under the right name without
`token=`. With two text encoders (SDXL) the file holds one tensor per encoder, `clip_l` (the first)
and `clip_g` (the second), as A1111 and ComfyUI read them; diffusers loads each into its encoder
(`load_textual_inversion(file["clip_g"], token=..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`); A1111 and ComfyUI name an embedding after its file, so the file is named after the token
(`<zorb>` -> `zorb.safetensors`, typed as `zorb` in their prompts). A k-token embedding is one
(k, d) tensor: diffusers expands its name to `tok tok_1 ... tok_{k-1}`, A1111 and ComfyUI put all k
vectors where the name is typed. The exact token list travels in the metadata for our own reader.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import token_stem
from balora_diffusion.formats.safetensors_io import read_file, write_file

TOKENS_KEY = "balora.tokens"
_LEGACY_TOKENS_KEY = "tokens"
_ANONYMOUS_KEYS = ("clip_l", "emb_params", "*")
PAIR_KEYS = ("clip_l", "clip_g")  # an SDXL embedding: the rows in each text encoder


def embedding_file_name(tokens: list[str]) -> str:
    return f"{token_stem(tokens[0])}.safetensors"


def write_embedding(folder: Path, tokens: list[str], vectors: torch.Tensor,
                    vectors_2: torch.Tensor | None = None) -> Path:
    """`folder/<token>.safetensors` holding the (k, d) rows of the k new tokens (and with `vectors_2`,
    their rows in a second text encoder)."""
    path = Path(folder) / embedding_file_name(tokens)
    rows = {tokens[0]: vectors} if vectors_2 is None else dict(zip(PAIR_KEYS, (vectors, vectors_2)))
    return write_file(path, {key: v.detach().float() for key, v in rows.items()}, {TOKENS_KEY: json.dumps(tokens)})


def is_embedding(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a file's tensors look like a token embedding: one tensor of one or more vectors, not
    named like a piece of a LoRA (which would then be refused as a LoRA missing its other half)."""
    if set(shapes) == set(PAIR_KEYS):
        return all(len(shape) in (1, 2) for shape in shapes.values())
    if len(shapes) != 1:
        return False
    key, shape = next(iter(shapes.items()))
    return len(shape) in (1, 2) and not re.search(r"lora|\.alpha$|hada_|lokr_|dora_scale|\.weight$", key)


def read_embedding(path: Path) -> tuple[list[str], torch.Tensor]:
    """(tokens, (k, d) vectors) of an embedding file (of the first text encoder's table)."""
    tokens, vectors, _ = read_embeddings(path)
    return tokens, vectors


def read_embeddings(path: Path) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """(tokens, (k, d) vectors, the (k, d') vectors of a second text encoder or None) of an embedding
    file; the tokens come from our metadata, else from the tensor's key (diffusers), else from the
    file name (A1111, ComfyUI)."""
    tensors, metadata = read_file(path)
    if set(tensors) == set(PAIR_KEYS):
        key, (vectors, vectors_2) = PAIR_KEYS[0], (_rows(path, k, tensors[k]) for k in PAIR_KEYS)
        if len(vectors) != len(vectors_2):
            raise UserError(f"{path}: {len(vectors)} clip_l vector(s) but {len(vectors_2)} clip_g")
    elif len(tensors) != 1:
        raise UserError(f"{path} holds {len(tensors)} tensors; a token embedding file holds exactly one "
                        f"(or {' and '.join(PAIR_KEYS)})")
    else:
        key, vectors = next(iter(tensors.items()))
        vectors, vectors_2 = _rows(path, key, vectors), None
    return _tokens(path, key, len(vectors), metadata), vectors, vectors_2


def _rows(path: Path, key: str, vectors: torch.Tensor) -> torch.Tensor:
    if vectors.dim() not in (1, 2):
        raise UserError(f"{path}: tensor {key!r} of shape {list(vectors.shape)} is not a token embedding")
    return vectors.reshape(1, -1) if vectors.dim() == 1 else vectors


def _tokens(path: Path, key: str, count: int, metadata: dict[str, str]) -> list[str]:
    raw = metadata.get(TOKENS_KEY) or metadata.get(_LEGACY_TOKENS_KEY)
    if raw is not None:
        try:
            tokens = json.loads(raw)
        except ValueError:
            tokens = None
        if not (isinstance(tokens, list) and len(tokens) == count and all(isinstance(t, str) for t in tokens)):
            raise UserError(f"{path}: its token list {raw!r} does not name the {count} vector(s) it holds")
        return tokens
    name = Path(path).stem if key in _ANONYMOUS_KEYS else key
    return [name] + [f"{name}_{i}" for i in range(1, count)]
