"""LoRA: a low-rank pair adds scale * B @ A to a frozen weight, scale = alpha / rank.

A kind owns what differs between adapter kinds: the tensors a module holds beside its pair and
its alpha (`extras`), the keys those tensors have in a training checkpoint and in each file format,
the shapes they take there, peft's options for training one, and the weight it makes of a base
weight. Modules are duck-typed (down, up, alpha, scale, extras, delta()), so this package needs
nothing of the formats.
"""
from __future__ import annotations

import torch

# Where a module's tensors are stored, each with its own key suffixes:
#   checkpoint  a training checkpoint's peft parameter names ("default" adapter)
#   diffusers   diffusers / peft files (pipe.load_lora_weights)
#   kohya       kohya files (A1111, ComfyUI, Forge)
PLACES = ("checkpoint", "diffusers", "kohya")


class LoRA:
    name = "lora"
    extras: tuple[str, ...] = ()
    keys: dict[str, dict[str, str]] = {
        "checkpoint": {"down": "lora_A.default.weight", "up": "lora_B.default.weight"},
        "diffusers": {"down": "lora_A.weight", "up": "lora_B.weight"},
        "kohya": {"down": "lora_down.weight", "up": "lora_up.weight"},
    }
    peft_options: dict[str, object] = {}  # LoraConfig arguments (and diffusers' adapter metadata)

    def holds_peft_layer(self, layer, adapter: str) -> bool:
        """Whether peft's `layer` holds its `adapter` as this kind."""
        return not layer.use_dora.get(adapter, False)

    def extras_of_peft_layer(self, layer, adapter: str) -> dict[str, torch.Tensor]:
        """The extras of a trained peft layer, as modules hold them (float32, on the CPU)."""
        return {}

    def extra_to_place(self, place: str, slot: str, tensor: torch.Tensor, conv: bool) -> torch.Tensor:
        """An extra as `place` stores it."""
        raise KeyError(slot)

    def extra_from_place(self, place: str, slot: str, tensor: torch.Tensor, outputs: int, where: str) -> torch.Tensor:
        """An extra read from `place` as a module holds it; UserError (naming `where`) when its shape is
        none that `place` writes for a layer of `outputs` outputs."""
        raise KeyError(slot)

    def check_extras(self, module, where: str) -> None:
        """UserError (naming `where`) unless the module's extras fit its pair."""

    def update(self, weight: torch.Tensor, module) -> torch.Tensor:
        """What the module adds to `weight` (float32, shaped like it) at full strength."""
        return module.delta(weight.dtype).reshape(weight.shape)


LORA = LoRA()
