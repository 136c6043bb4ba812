"""Prior preservation against the frozen base model itself.

DreamBooth keeps a fine-tune from drifting away from its class ("a heart" must still draw a
heart) by also training on a few hundred images the base model drew for the class prompt. Here
the target is the base model's own prediction for the class prompt on the step's noisy latents,
computed with every adapter switched off: no generation pass before training, nothing stored,
and the target is exactly what the base model answers at that timestep rather than a denoising
target for an image it once drew. Its price per step: one UNet and text-encoder forward without
gradients (the base model's answer), and the adapted model's forward and backward on the class
prompt, which any prior preservation pays.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from balora_diffusion.errors import UserError
from balora_diffusion.families import Conditioning
from balora_diffusion.masks import per_sample_mse


def check_prior_prompt(prompt: str, tokens: list[str]) -> None:
    named = [t for t in tokens if t in prompt]
    if named:
        raise UserError(f"prior_prompt {prompt!r} names {', '.join(named)}: it must be the class without the "
                        "learned token (e.g. 'a heart'), whose answers the adapter must keep")


@contextmanager
def adapters_off(*models: torch.nn.Module):
    """Every peft adapter in `models` switched off for the block: the frozen base model. Each
    layer gets back the state it had, so blocks nest."""
    layers = [(m, m.disable_adapters) for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer, _ in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_off in layers:
            layer.enable_adapters(not was_off)


def prior_loss(unet, base_unet, condition: Callable[[], Conditioning], base_condition: Callable[[], Conditioning],
               base_text_encoders: list[torch.nn.Module], noisy: torch.Tensor, timesteps: torch.Tensor,
               weights: torch.Tensor | None) -> torch.Tensor:
    """The adapted model's error against the base model's prediction for the class prompt on the
    step's noisy latents. `condition` encodes the class prompt with the adapted text encoders,
    `base_condition` with `base_text_encoders`; `base_*` are the models unwrapped from DDP, for the
    forward without gradients (with the adapters off and the token absent from the prompt they are
    the base)."""
    with torch.no_grad(), adapters_off(base_unet, *base_text_encoders):
        target = base_condition().predict(base_unet, noisy, timesteps).sample.float()
    pred = condition().predict(unet, noisy, timesteps).sample.float()
    per_sample = per_sample_mse(pred, target, None, 0.0)
    return (per_sample if weights is None else per_sample * weights).mean()
