"""Adapter kinds, one module each: what a trained adapter holds besides its low-rank pairs, how it
is stored and what it does to a weight. Adding a kind is a module here and a line in KINDS.

lora  scale * B @ A added to the weight
dora  the same direction, with a trained magnitude per output row (peft's use_dora)
"""
from __future__ import annotations

from balora_diffusion.adapters.dora import DORA
from balora_diffusion.adapters.lora import LORA, PLACES, LoRA
from balora_diffusion.errors import UserError

KINDS: dict[str, LoRA] = {kind.name: kind for kind in (LORA, DORA)}


def get_kind(name: str) -> LoRA:
    if name not in KINDS:
        raise UserError(f"unknown adapter kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_extras(extras: set[str], where: str) -> LoRA:
    """The kind whose modules hold exactly `extras` beside their pair."""
    for kind in KINDS.values():
        if set(kind.extras) == extras:
            return kind
    raise UserError(f"{where}: its modules hold {', '.join(sorted(extras))}, which no adapter kind "
                    f"({', '.join(KINDS)}) holds together")


def kind_of_peft_layer(layer, adapter: str) -> LoRA:
    return next(kind for kind in KINDS.values() if kind.holds_peft_layer(layer, adapter))


def slot_of_suffix(place: str) -> dict[str, str]:
    """{key suffix: tensor slot ("down", "up" or an extra)} of every kind at `place` (one of PLACES)."""
    if place not in PLACES:
        raise KeyError(place)
    return {suffix: slot for kind in KINDS.values() for slot, suffix in kind.keys[place].items()}
