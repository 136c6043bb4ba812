"""The one in-memory form of a LoRA adapter that every file format reads into and writes from.

Module paths are the diffusers ones: UNet paths as in `UNet2DConditionModel.named_modules()`,
text-encoder paths without transformers 4's `text_model.` segment (`encoder.layers.0.self_attn.q_proj`),
so an adapter means the same whichever transformers wrote or reads it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from balora_diffusion.errors import UserError

UNET, TEXT_ENCODER = "unet", "text_encoder"
PARTS = (UNET, TEXT_ENCODER)


@dataclass
class LoraModule:
    """One adapted layer: its update is (alpha / rank) * up @ down.

    Linear: down (r, in), up (out, r). Conv: down (r, in, kh, kw), up (out, r, 1, 1).
    `key` is the name the layer had in the file it came from, for messages."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    key: str = ""

    def __post_init__(self) -> None:
        down, up = self.down, self.up
        linear = down.dim() == 2 and up.dim() == 2
        conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
        if not (linear or conv) or up.shape[1] != down.shape[0]:
            raise UserError(f"{self.key or 'a LoRA module'}: factors of shapes down {list(down.shape)} and "
                            f"up {list(up.shape)} do not form a LoRA product")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module adapts."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight update scale * up @ down, shaped like the adapted weight, computed in `dtype`."""
        up, down = self.up.to(dtype).flatten(1), self.down.to(dtype).flatten(1)
        return (self.scale * (up @ down)).reshape(self.weight_shape)


@dataclass
class Adapter:
    """LoRA modules of the UNet and the text encoder, the new tokens' embeddings and what is known
    of the training, as read from (or to be written to) one of the formats."""

    unet: dict[str, LoraModule] = field(default_factory=dict)
    text_encoder: dict[str, LoraModule] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    embedding: torch.Tensor | None = None  # (len(tokens), hidden) rows of the new tokens
    info: dict[str, object] = field(default_factory=dict)  # training facts (method, rank, lrs, steps, ...)
    format: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.embedding is not None and (self.embedding.dim() != 2 or self.embedding.shape[0] != len(self.tokens)):
            raise UserError(f"{self.source}: an embedding of shape {list(self.embedding.shape)} for the "
                            f"{len(self.tokens)} token(s) {self.tokens}")

    def parts(self) -> dict[str, dict[str, LoraModule]]:
        return {UNET: self.unet, TEXT_ENCODER: self.text_encoder}

    def modules(self) -> list[tuple[str, str, LoraModule]]:
        return [(part, path, module) for part, found in self.parts().items() for path, module in found.items()]


def token_stem(token: str) -> str:
    """A file name for a token: what A1111 and ComfyUI call an embedding is its file's name, and
    `<`, `>` and other punctuation are not allowed in file names everywhere."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def uniform(values: list) -> object | None:
    """The value when all are equal, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


INFO_PREFIX = "balora."


def info_metadata(info: dict[str, object]) -> dict[str, str]:
    """Training facts as `balora.*` header entries, each a JSON value."""
    return {INFO_PREFIX + key: json.dumps(value) for key, value in info.items()}


def info_from_metadata(metadata: dict[str, str]) -> dict[str, object]:
    """The `balora.*` header entries back as values (a non-JSON entry stays a string)."""
    info: dict[str, object] = {}
    for key, value in metadata.items():
        if key.startswith(INFO_PREFIX):
            try:
                info[key[len(INFO_PREFIX):]] = json.loads(value)
            except ValueError:
                info[key[len(INFO_PREFIX):]] = value
    return info


Factors = dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]]


def add_factor(factors: Factors, module: tuple[str, str], slot: str, key: str, tensor: torch.Tensor, source) -> None:
    """Record a file's tensor as the "down", "up" or "alpha" of (part, module path)."""
    if slot in factors.setdefault(module, {}):
        raise UserError(f"{source}: {key!r} repeats the {slot} of {factors[module][slot][0]!r}")
    factors[module][slot] = (key, tensor)


def assemble(adapter: Adapter, factors: Factors, default_alpha: Callable[[str, str, int], float]) -> Adapter:
    """`adapter` with a LoraModule per recorded module; every module needs both factors. A module
    without an alpha tensor gets default_alpha(part, module path, rank)."""
    for (part, module_path), found in factors.items():
        if "down" not in found or "up" not in found:
            key = next(iter(found.values()))[0]
            raise UserError(f"{adapter.source}: {key!r} has no {'up' if 'down' in found else 'down'} factor beside it")
        (key, down), up = found["down"], found["up"][1]
        if down.dim() == 4 and up.dim() == 2:  # some writers keep a conv LoRA's 1x1 up factor as a matrix
            up = up[:, :, None, None]
        alpha = float(found["alpha"][1]) if "alpha" in found else default_alpha(part, module_path, down.shape[0])
        adapter.parts()[part][module_path] = LoraModule(down, up, alpha, key=key)
    if not adapter.modules():
        raise UserError(f"{adapter.source} holds no LoRA weights")
    return adapter
