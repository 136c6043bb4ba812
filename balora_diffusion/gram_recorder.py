"""The Grams X X^T of what chosen layers receive, summed in float64 by forward hooks while a model runs.

The inputs themselves are never kept: a Gram is d x d whatever the number of calls, positions and
images. A column is what one output position of the layer reads: a token's vector for a Linear, a
pixel's channels for a 1x1 convolution, the unfolded patch for a wider kernel (in the order of the
flattened weight, so that W.flatten(1) @ column is the layer's output there).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from balora_diffusion.errors import UserError
from balora_diffusion.gradient_fusion import DTYPE, gram


def columns(layer: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The (N, d) columns a Linear or Conv2d layer reads from `inputs`, one row each."""
    if isinstance(layer, torch.nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        return inputs.movedim(1, -1).reshape(-1, inputs.shape[1])
    patches = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def check_recordable(name: str, layer: torch.nn.Module) -> None:
    """UserError for a layer whose output is not one weight matrix times its input's columns."""
    if isinstance(layer, torch.nn.Linear):
        return
    if not isinstance(layer, torch.nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros" \
            or isinstance(layer.padding, str) and layer.padding != "valid":
        raise UserError(f"layer {name}: its inputs cannot be recorded as columns of one weight matrix "
                        "(a grouped or padded-by-name convolution); fuse with --method sum")


class GramRecorder:
    """`with GramRecorder(layers) as recorder:` run the model; `recorder.grams[name]` is then the
    float64 sum of X X^T over every call of layers[name] (on the layer's device)."""

    def __init__(self, layers: Mapping[str, torch.nn.Module]):
        for name, layer in layers.items():
            check_recordable(name, layer)
        self.layers = dict(layers)
        self.grams: dict[str, torch.Tensor] = {}
        self._hooks = []

    def _hook(self, name: str):
        def record(layer, args, _output):
            added = gram(columns(layer, args[0].detach()))
            self.grams[name] = self.grams[name] + added if name in self.grams else added
        return record

    def __enter__(self) -> "GramRecorder":
        self._hooks = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def gram_of(self, name: str) -> torch.Tensor:
        """The Gram of one layer; UserError when the model never called it."""
        if name not in self.grams:
            raise UserError(f"layer {name} was never called while its inputs were recorded")
        return self.grams[name].to("cpu", DTYPE)
