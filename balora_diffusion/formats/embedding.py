"""New-token embeddings as one-tensor .safetensors files: the layout A1111, ComfyUI and diffusers'
`load_textual_inversion` all read.

The tensor's key is the (first) token, so diffusers loads it under the right name without
`token=`; A1111 and ComfyUI name an embedding after its file, so the file is named after the token
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


def embedding_file_name(tokens: list[str]) -> str:
    return f"{token_stem(tokens[0])}.safetensors"


def write_embedding(folder: Path, tokens: list[str], vectors: torch.Tensor) -> Path:
    """`folder/<token>.safetensors` holding the (k, d) rows of the k new tokens."""
    path = Path(folder) / embedding_file_name(tokens)
    return write_file(path, {tokens[0]: vectors.detach().float()}, {TOKENS_KEY: json.dumps(tokens)})


def is_embedding(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a file's tensors look like a token embedding: one tensor of one or more vectors, not
    named like a piece of a LoRA (which would then be refused as a LoRA missing its other half)."""
    if len(shapes) != 1:
        return False
    key, shape = next(iter(shapes.items()))
    return len(shape) in (1, 2) and not re.search(r"lora|\.alpha$|hada_|lokr_|dora_scale|\.weight$", key)


def read_embedding(path: Path) -> tuple[list[str], torch.Tensor]:
    """(tokens, (k, d) vectors) of an embedding file; the tokens come from our metadata, else from the
    tensor's key (diffusers), else from the file name (A1111, ComfyUI)."""
    tensors, metadata = read_file(path)
    if len(tensors) != 1:
        raise UserError(f"{path} holds {len(tensors)} tensors; a token embedding file holds exactly one")
    key, vectors = next(iter(tensors.items()))
    if vectors.dim() not in (1, 2):
        raise UserError(f"{path}: tensor {key!r} of shape {list(vectors.shape)} is not a token embedding")
    vectors = vectors.reshape(1, -1) if vectors.dim() == 1 else vectors
    raw = metadata.get(TOKENS_KEY) or metadata.get(_LEGACY_TOKENS_KEY)
    if raw is not None:
        try:
            tokens = json.loads(raw)
        except ValueError:
            tokens = None
        if not (isinstance(tokens, list) and len(tokens) == len(vectors) and all(isinstance(t, str) for t in tokens)):
            raise UserError(f"{path}: its token list {raw!r} does not name the {len(vectors)} vector(s) it holds")
        return tokens, vectors
    name = Path(path).stem if key in _ANONYMOUS_KEYS else key
    return [name] + [f"{name}_{i}" for i in range(1, len(vectors))], vectors
