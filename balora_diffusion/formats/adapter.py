"""The one in-memory form of a LoRA adapter that every file format reads into and writes from.

Module paths are the diffusers ones: UNet paths as in `UNet2DConditionModel.named_modules()`,
text-encoder paths without transformers 4's `text_model.` segment (`encoder.layers.0.self_attn.q_proj`),
so an adapter means the same whichever transformers wrote or reads it.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from balora_diffusion.adapters import get_kind, kind_of_extras
from balora_diffusion.errors import UserError

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
# The parts an adapter may hold, in the order files list them: the pipeline components they adapt.
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
TEXT_PARTS = (TEXT_ENCODER, TEXT_ENCODER_2)


@dataclass
class LoraModule:
    """One adapted layer: its low-rank update is (alpha / rank) * up @ down; what the layer's weight
    becomes is its adapter's kind's (see balora_diffusion.adapters), with the kind's `extras`.

    Linear: down (r, in), up (out, r). Conv: down (r, in, kh, kw), up (out, r, 1, 1).
    `key` is the name the layer had in the file it came from, for messages."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    key: str = ""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shapes(self.key or "a LoRA module", self.down, self.up)

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


def _check_shapes(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    linear = down.dim() == 2 and up.dim() == 2
    conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    shapes = f"factors of shapes down {list(down.shape)} and up {list(up.shape)}"
    if not (linear or conv) or up.shape[1] != down.shape[0]:
        raise UserError(f"{name}: {shapes} do not form a LoRA product")
    if down.numel() == 0 or up.numel() == 0:
        raise UserError(f"{name}: {shapes} are empty")
    rank, outputs, inputs = down.shape[0], up.shape[0], down[0].numel()
    if rank > min(outputs, inputs):
        raise UserError(f"{name}: {shapes} have rank {rank}, above what a layer of {outputs} outputs and "
                        f"{inputs} inputs can hold")


def read_module(source: str, down: tuple[str, torch.Tensor], up: tuple[str, torch.Tensor],
                alpha: tuple[str, object], extras: dict[str, tuple[str, torch.Tensor]] | None = None) -> LoraModule:
    """The LoraModule of the (key, value) down, up, alpha and extras read from `source`: every reader
    builds its modules here, and a UserError names the key of the first that cannot be part of an update."""
    extras = extras or {}
    for key, tensor in (down, up, *extras.values()):
        check_values(f"{source}: {key}", tensor)
    return LoraModule(down[1], up[1], alpha_number(f"{source}: {alpha[0]}", alpha[1]), key=down[0],
                      extras={slot: tensor for slot, (_, tensor) in extras.items()})


def check_values(name: str, tensor: torch.Tensor) -> None:
    """UserError unless `tensor` holds finite floating-point numbers: one NaN or Inf in a weight
    update turns every image black, whatever the fusion coefficient."""
    if not tensor.is_floating_point():
        raise UserError(f"{name}: a tensor of {str(tensor.dtype).removeprefix('torch.')} where weights are "
                        "floating-point numbers")
    if not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{name} holds non-finite values (NaN or Inf)")


def alpha_number(name: str, value: object) -> float:
    """A LoRA alpha as a float, from a number or a one-element tensor; UserError for anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise UserError(f"{name}: alpha is a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                            f"{list(value.shape)}, not one number")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name}: alpha {value!r} is not a finite number")
    return float(value)


@dataclass
class Adapter:
    """LoRA modules per named part (a pipeline component, one of PARTS), the new tokens' embeddings and
    what is known of the training, as read from (or to be written to) one of the formats."""

    part_modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    kind: str = "lora"  # one of balora_diffusion.adapters.KINDS, the same for every module
    tokens: list[str] = field(default_factory=list)
    embedding: torch.Tensor | None = None  # (len(tokens), hidden) rows of the new tokens
    embedding_2: torch.Tensor | None = None  # their rows in a second text encoder's table (SDXL's)
    info: dict[str, object] = field(default_factory=dict)  # training facts (method, rank, lrs, steps, ...)
    format: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.part_modules) - set(PARTS))
        if unknown:
            raise UserError(f"{self.source or 'an adapter'}: unknown part(s) {', '.join(unknown)}; "
                            f"expected {', '.join(PARTS)}")
        self.part_modules = {part: self.part_modules.get(part, {}) for part in PARTS}
        kind = get_kind(self.kind)
        for part, path, module in self.modules():
            where = f"{self.source or 'an adapter'}: {module.key or f'{part}.{path}'}"
            if set(module.extras) != set(kind.extras):
                raise UserError(f"{where} holds the extras {sorted(module.extras)}, where a {self.kind} module "
                                f"holds {sorted(kind.extras)}")
            kind.check_extras(module, where)
        if self.embedding is None and self.embedding_2 is not None:
            raise UserError(f"{self.source}: token rows for a second text encoder only")
        self.embedding, self.embedding_2 = (None if rows is None else self._checked(rows)
                                            for rows in (self.embedding, self.embedding_2))

    def _checked(self, rows: torch.Tensor) -> torch.Tensor:
        shape = list(rows.shape)
        if len(shape) != 2 or shape[0] != len(self.tokens) or shape[1] == 0:
            raise UserError(f"{self.source}: an embedding of shape {shape} for the {len(self.tokens)} token(s) "
                            f"{self.tokens}")
        check_values(f"{self.source}: the embedding of {' '.join(self.tokens)}", rows)
        return rows.float()

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The new tokens' rows per text-encoder part that has them."""
        rows = {TEXT_ENCODER: self.embedding, TEXT_ENCODER_2: self.embedding_2}
        return {part: r for part, r in rows.items() if r is not None}

    def parts(self) -> dict[str, dict[str, LoraModule]]:
        """Every part in PARTS order, each a (possibly empty) {module path: module}."""
        return self.part_modules

    def modules(self) -> list[tuple[str, str, LoraModule]]:
        return [(part, path, module) for part, found in self.parts().items() for path, module in found.items()]


def token_stem(token: str) -> str:
    """A file name for a token: what A1111 and ComfyUI call an embedding is its file's name, and
    `<`, `>` and other punctuation are not allowed in file names everywhere."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


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


def _rank(down: torch.Tensor) -> int:
    """A down factor's rank, for an alpha that defaults to it; 0 for a scalar (which the module refuses)."""
    return int(down.shape[0]) if down.dim() else 0


Factors = dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]]


def add_factor(factors: Factors, module: tuple[str, str], slot: str, key: str, tensor: torch.Tensor, source) -> None:
    """Record a file's tensor as the "down", "up", "alpha" or an extra of (part, module path)."""
    if slot in factors.setdefault(module, {}):
        raise UserError(f"{source}: {key!r} repeats the {slot} of {factors[module][slot][0]!r}")
    factors[module][slot] = (key, tensor)


_PAIR = ("down", "up", "alpha")


def assemble(adapter: Adapter, factors: Factors, default_alpha: Callable[[str, str, int], float],
             place: str) -> Adapter:
    """`adapter` with a LoraModule per recorded module, of the kind its extras (as `place` stores
    them) say; every module needs both factors and every extra of that kind. A module without an
    alpha tensor gets default_alpha(part, module path, rank)."""
    extras = {slot for found in factors.values() for slot in found if slot not in _PAIR}
    kind = kind_of_extras(extras, adapter.source)
    for (part, module_path), found in factors.items():
        missing = [slot for slot in ("down", "up", *kind.extras) if slot not in found]
        if missing:
            key = next(iter(found.values()))[0]
            what = f"{missing[0]} factor" if missing[0] in _PAIR else f"{kind.name} {missing[0]}"
            raise UserError(f"{adapter.source}: {key!r} has no {what} beside it")
        (key, down), up = found["down"], found["up"][1]
        if down.dim() == 4 and up.dim() == 2:  # some writers keep a conv LoRA's 1x1 up factor as a matrix
            up = up[:, :, None, None]
        alpha = found["alpha"] if "alpha" in found else (key, default_alpha(part, module_path, _rank(down)))
        outputs = int(up.shape[0]) if up.dim() else 0
        module_extras = {slot: (found[slot][0], kind.extra_from_place(place, slot, found[slot][1], outputs,
                                                                      f"{adapter.source}: {found[slot][0]!r}"))
                         for slot in kind.extras}
        adapter.parts()[part][module_path] = read_module(adapter.source, (key, down), (found["up"][0], up), alpha,
                                                         module_extras)
    if not adapter.modules():
        raise UserError(f"{adapter.source} holds no LoRA weights")
    adapter.kind = kind.name
    adapter.__post_init__()
    return adapter


def module_tensors(adapter: Adapter, place: str, module: LoraModule) -> dict[str, torch.Tensor]:
    """{key suffix: tensor} of a module's pair and extras as `place` stores them."""
    kind = get_kind(adapter.kind)
    suffixes = kind.keys[place]
    tensors = {suffixes["down"]: module.down, suffixes["up"]: module.up}
    conv = module.down.dim() == 4
    tensors.update({suffixes[slot]: kind.extra_to_place(place, slot, tensor, conv)
                    for slot, tensor in module.extras.items()})
    return tensors
