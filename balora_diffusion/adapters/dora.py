"""DoRA (weight-decomposed low-rank adaptation, peft's `use_dora`): a LoRA pair gives the direction
and a trained magnitude vector m the length of every output row,

    W' = m * (W + s B A) / ||W + s B A||    (norm per output row: over all inputs, and kernel
                                            positions of a convolution)

Modules hold m as a float32 vector of one entry per output. Its stored shapes: peft (checkpoints and
diffusers files) keeps (out,) for a Linear and (1, out, 1, 1) for a Conv2d; a kohya file keeps
`dora_scale` as (out, 1) / (out, 1, 1, 1), the output-axis layout that LyCORIS (wd_on_out) and
ComfyUI tell apart from the input-axis one by its first dimension. The input-axis layout (LyCORIS'
default, (1, in)) normalises columns instead, another decomposition, and is refused.
"""
from __future__ import annotations

import torch

from balora_diffusion.adapters.lora import LoRA
from balora_diffusion.errors import UserError

MAGNITUDE = "magnitude"


class DoRA(LoRA):
    name = "dora"
    extras = (MAGNITUDE,)
    keys = {
        "checkpoint": {**LoRA.keys["checkpoint"], MAGNITUDE: "lora_magnitude_vector.default.weight"},
        "diffusers": {**LoRA.keys["diffusers"], MAGNITUDE: "lora_magnitude_vector.weight"},
        "kohya": {**LoRA.keys["kohya"], MAGNITUDE: "dora_scale"},
    }
    peft_options = {"use_dora": True}

    def holds_peft_layer(self, layer, adapter: str) -> bool:
        return bool(layer.use_dora.get(adapter, False))

    def extras_of_peft_layer(self, layer, adapter: str) -> dict[str, torch.Tensor]:
        return {MAGNITUDE: layer.lora_magnitude_vector[adapter].weight.detach().float().cpu().flatten()}

    def extra_to_place(self, place: str, slot: str, tensor: torch.Tensor, conv: bool) -> torch.Tensor:
        if place == "kohya":
            return tensor.reshape(-1, 1, 1, 1) if conv else tensor.reshape(-1, 1)
        return tensor.reshape(1, -1, 1, 1) if conv else tensor.reshape(-1)

    def extra_from_place(self, place: str, slot: str, tensor: torch.Tensor, outputs: int, where: str) -> torch.Tensor:
        shape = tuple(tensor.shape)
        if place == "kohya":
            fits = shape in ((outputs, 1), (outputs, 1, 1, 1))
            if not fits and tensor.dim() in (2, 4) and shape[0] == 1:
                raise UserError(f"{where}: a DoRA scale of shape {list(shape)} normalises the weight's input "
                                "columns (LyCORIS' default layout); only the output-row decomposition (peft's, "
                                "LyCORIS wd_on_output) is supported")
        else:
            fits = shape in ((outputs,), (1, outputs, 1, 1))
        if not fits:
            raise UserError(f"{where}: a DoRA magnitude of shape {list(shape)} for a layer of {outputs} outputs")
        return tensor.float().reshape(outputs)

    def check_extras(self, module, where: str) -> None:
        magnitude = module.extras[MAGNITUDE]
        if tuple(magnitude.shape) != (module.up.shape[0],):
            raise UserError(f"{where}: a DoRA magnitude of shape {list(magnitude.shape)} for a layer of "
                            f"{module.up.shape[0]} outputs")

    def update(self, weight: torch.Tensor, module) -> torch.Tensor:
        return merged_weight(weight, module.delta(weight.dtype).reshape(weight.shape),
                             module.extras[MAGNITUDE].to(weight)) - weight


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W + delta) / ||W + delta||, the norm taken per output row."""
    adapted = weight + delta
    norm = adapted.flatten(1).norm(dim=1)
    return adapted * (magnitude / norm).reshape(-1, *[1] * (weight.dim() - 1))


DORA = DoRA()
