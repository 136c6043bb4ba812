"""Adapters applied to a loaded pipeline by adding their updates to the weights.

W = W0 + f * sum_i w_i * U_i(W0) for every adapted layer of the UNet and the text encoders alike, where
w_i is each adapter's weight, f the fusion coefficient and U_i what adapter i's kind makes of W0 at
full strength (LoRA: (alpha_i / r_i) * B_i @ A_i; DoRA: its merged weight less W0). Adding to the weights
(rather than wrapping layers) is what a merged model is, so generating and merging share one path,
and changing f costs one pass over the adapted layers. The new tokens' embeddings are loaded through
diffusers' `load_textual_inversion` and stay in at every f.

Nothing is changed unless every module of every adapter fits a layer of the pipeline: no partial loads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from balora_diffusion import families
from balora_diffusion.adapters import LoRA, get_kind
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import TEXT_PARTS, UNET, Adapter, LoraModule
from balora_diffusion.formats.names import canonical_text_path


def _layers(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    """{part: {module path: layer}} of each of the adapter parts the pipeline has (an empty table for
    one it lacks, so an adapter for it is refused by name)."""
    layers = {UNET: dict(pipe.unet.named_modules())}
    for part in TEXT_PARTS:
        model = getattr(pipe, part, None)
        layers[part] = {} if model is None else {canonical_text_path(n): m for n, m in model.named_modules()}
    return layers


def fit(pipe, adapter: Adapter) -> list[tuple[torch.nn.Module, LoraModule]]:
    """(layer, module) for every module of `adapter`; UserError naming the first module that names no
    Linear / Conv2d layer of the pipeline or whose update has another shape than the layer's weight."""
    layers, fitted = _layers(pipe), []
    for part, path, module in adapter.modules():
        layer = layers[part].get(path)
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise UserError(f"{adapter.source}: {module.key or path!r} names no layer of the base model's {part} "
                            "(a LoRA for another architecture?)")
        have, want = tuple(layer.weight.shape), module.weight_shape
        # a 1x1 convolution and a linear layer are the same map: LoRAs for SD 1.x use both for proj_in / proj_out
        if have != want and have[:2] + tuple(d for d in have[2:] if d != 1) != want[:2] + tuple(d for d in want[2:] if d != 1):
            raise UserError(f"{adapter.source}: {module.key or path!r} updates a weight of shape {list(want)}, but the "
                            f"base model's {part} layer {path} has shape {list(have)}")
        fitted.append((layer, module))
    if adapter.embedding is not None:
        _token_rows(pipe, adapter)
    return fitted


def _token_rows(pipe, adapter: Adapter) -> list[tuple[object, torch.nn.Module, torch.Tensor]]:
    """(tokenizer, text encoder, rows) for each of the base model's text encoders; UserError where the
    adapter's embedding has no rows for one of them, or rows of another width."""
    family, rows = families.of_pipeline(pipe), adapter.embeddings()
    extra = sorted(set(rows) - set(family.text_encoders))
    if extra:
        raise UserError(f"{adapter.source}: its token embedding has rows for a {' and '.join(extra)}, which a "
                        f"{family.title} model does not have")
    found = []
    for name, tokenizer in zip(family.text_encoders, family.tokenizers_of(pipe)):
        encoder = getattr(pipe, name)
        if name not in rows:
            raise UserError(f"{adapter.source}: its token embedding has no rows for the base model's {name} "
                            f"(an embedding for another model family?)")
        hidden = encoder.get_input_embeddings().weight.shape[1]
        if rows[name].shape[1] != hidden:
            raise UserError(f"{adapter.source}: token embedding of width {rows[name].shape[1]}, but the base "
                            f"model's {name.replace('_', ' ')} has width {hidden}")
        found.append((tokenizer, encoder, rows[name]))
    return found


class Fused:
    """`adapters` (each with its weight) added to `pipe`'s weights at fusion coefficient 1; `set_fusion`
    changes the coefficient, `restore` gives back the base model exactly. With `tokens=False` the
    embeddings are left out (a single-file checkpoint has no place for new tokens)."""

    def __init__(self, pipe, adapters: Sequence[tuple[Adapter, float]], tokens: bool = True):
        self.pipe, self.tokens = pipe, []
        per_layer: dict[torch.nn.Module, list[tuple[float, LoRA, LoraModule]]] = {}
        for adapter, weight in adapters:
            kind = get_kind(adapter.kind)
            for layer, module in fit(pipe, adapter):
                device = layer.weight.device
                on_device = LoraModule(module.down.to(device), module.up.to(device), module.alpha, module.key,
                                       {slot: tensor.to(device) for slot, tensor in module.extras.items()})
                per_layer.setdefault(layer, []).append((weight, kind, on_device))
        new_tokens = [t for adapter, _ in adapters if tokens and adapter.embedding is not None for t in adapter.tokens]
        taken = sorted({t for t in new_tokens if new_tokens.count(t) > 1 or t in pipe.tokenizer.get_vocab()})
        if taken:
            raise UserError(f"token(s) {', '.join(taken)} would be added twice: the adapters or the base model "
                            "already define them")
        self.per_layer = per_layer
        self.base = {layer: layer.weight.detach().clone() for layer in per_layer}
        if tokens:
            self._load_tokens([a for a, _ in adapters if a.embedding is not None])
        self.set_fusion(1.0)

    def _load_tokens(self, adapters: list[Adapter]) -> None:
        from balora_diffusion.models import quiet_diffusers

        for adapter in adapters:
            for tokenizer, encoder, rows in _token_rows(self.pipe, adapter):
                with quiet_diffusers():
                    self.pipe.load_textual_inversion(rows.to(encoder.device, encoder.dtype), token=adapter.tokens,
                                                     tokenizer=tokenizer, text_encoder=encoder)
            self.tokens.extend(adapter.tokens)

    @torch.no_grad()
    def set_fusion(self, fusion: float) -> None:
        for layer, items in self.per_layer.items():
            base = self.base[layer].float().reshape(items[0][2].weight_shape)
            update = sum(weight * kind.update(base, module) for weight, kind, module in items)
            layer.weight.copy_((self.base[layer].float() + fusion * update.reshape(layer.weight.shape))
                               .to(layer.weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for layer, weight in self.base.items():
            layer.weight.copy_(weight)
        if self.tokens:
            family = families.of_pipeline(self.pipe)
            for tokenizer, encoder in zip(family.tokenizers_of(self.pipe), family.encoders(self.pipe)):
                self.pipe.unload_textual_inversion(self.tokens, tokenizer=tokenizer, text_encoder=encoder)
            self.tokens = []

    def __enter__(self) -> "Fused":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
