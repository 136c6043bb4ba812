"""The training objective: one step's latents, noise, timesteps and captions, its denoising loss,
and the update it drives."""
from __future__ import annotations

import torch

from balora_diffusion.errors import UserError
from balora_diffusion.families import Conditioning
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.masks import per_sample_mse
from balora_diffusion.prior import prior_loss
from balora_diffusion.train.text import TextEncoders
from balora_diffusion.train_config import TrainConfig


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    # One generator per (step, process): resuming at step k redraws exactly the noise of step k.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 64 + rank)


def diffusion_target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"unsupported prediction_type {kind!r} in the base model's scheduler config")


def loss_weights(scheduler, timesteps, gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al.), in the form that matches the prediction type."""
    if gamma <= 0:
        return None
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def denoising_loss(unet, cond: Conditioning, scheduler, latents, noise, timesteps, masks=None, unmasked_weight=0.0):
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return unet_loss(unet, scheduler, latents, noise, noisy, timesteps, cond, None, masks, unmasked_weight)


def unet_loss(unet, scheduler, latents, noise, noisy, timesteps, cond: Conditioning, weights=None, masks=None,
              unmasked_weight=0.0):
    """The denoising loss of `noisy` (= scheduler.add_noise(latents, noise, timesteps)): with `masks`
    (B, 1, h, w) at latent resolution, weighted as masks.per_sample_mse says; `weights` per sample."""
    pred = cond.predict(unet, noisy, timesteps).sample.float()
    target = diffusion_target(scheduler, latents, noise, timesteps).float()
    per_sample = per_sample_mse(pred, target, None if masks is None else masks.to(pred.device), unmasked_weight)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def make_noise(latents: torch.Tensor, gen: torch.Generator, offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen,
                                             device=latents.device, dtype=latents.dtype)
    return noise


def encode_latents(vae, pixels: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """VAE latents scaled like SD's (gen=None: the posterior mean, for deterministic evaluation)."""
    return sample_latents(vae, vae.encode(pixels).latent_dist, gen)


def sample_latents(vae, dist, gen: torch.Generator | None) -> torch.Tensor:
    latents = dist.mean if gen is None else dist.sample(generator=gen)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


def _no_mark(phase: str) -> None:
    pass


def step_loss(cfg: TrainConfig, step: int, accelerator, batches, vae, text: TextEncoders, unet, scheduler,
              mark=_no_mark) -> torch.Tensor:
    """The loss of training step `step`. `batches` is the LatentCache or the ConceptData; `mark(phase)`
    is called as each phase ends (the loop benchmark times them)."""
    device = accelerator.device
    gen = _step_generator(cfg.seed, step, accelerator.process_index, device)
    share = (step, cfg.batch_size, accelerator.process_index, accelerator.num_processes)
    if isinstance(batches, LatentCache):
        dist, captions, masks = batches.batch(*share)
        mark("data")
    else:
        pixels, captions, masks = batches.batch(*share)
        mark("data")
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    latents = sample_latents(vae, dist, gen)
    mark("vae_encode")
    noise = make_noise(latents, gen, cfg.noise_offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=gen, device=device)
    ids = text.ids(captions)
    sizes = batches.size_conditions(*share)
    weights = loss_weights(scheduler, timesteps, cfg.min_snr_gamma)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast():
        cond = text.condition(ids, device, sizes)
        mark("text_encoder")
        loss = unet_loss(unet, scheduler, latents, noise, noisy, timesteps, cond, weights, masks, cfg.unmasked_weight)
        if cfg.prior_prompt and cfg.prior_weight > 0:
            prior_ids = text.ids([cfg.prior_prompt] * len(captions))
            base_text = text.unwrapped(accelerator)
            loss = loss + cfg.prior_weight * prior_loss(
                unet, accelerator.unwrap_model(unet), lambda: text.condition(prior_ids, device, sizes),
                lambda: base_text.condition(prior_ids, device, sizes), base_text.models, noisy, timesteps, weights)
    mark("unet_forward")
    return loss


def update(cfg: TrainConfig, accelerator, optimizer, loss: torch.Tensor, mark=_no_mark) -> None:
    """Backward, clipping and the optimizer step (the rules included)."""
    accelerator.backward(loss)
    mark("backward")
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    mark("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
