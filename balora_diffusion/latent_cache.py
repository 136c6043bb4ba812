"""The VAE's latent distribution of every training image, encoded once.

Without random crops a run only ever shows a finite set of pixel tensors: each image, and its
mirror image when flips are on. Encoding each of them once before the loop and sampling the
stored distribution at every step gives the latents the loop would get by encoding the batch
itself (the same distribution, sampled with the same generator draws), without the per-step
resize, crop and VAE encoder pass.
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from balora_diffusion.data import ConceptData


class LatentCache:
    def __init__(self, data: ConceptData, vae, device: torch.device, batch_size: int):
        self.data = data
        variants = data.variants()
        self.row = {variant: i for i, variant in enumerate(variants)}
        chunks = []
        with torch.no_grad():
            for i in range(0, len(variants), batch_size):
                pixels = torch.stack([data.variant_pixels(v) for v in variants[i:i + batch_size]])
                chunks.append(vae.encode(pixels.to(device, vae.dtype)).latent_dist.parameters)
        self.parameters = torch.cat(chunks)

    def batch(self, step: int, batch_size: int, rank: int = 0,
              world_size: int = 1) -> tuple[DiagonalGaussianDistribution, list[str]]:
        """The latent distribution of ConceptData.batch(step, ...)'s images, and their captions."""
        variants, captions = self.data.batch_variants(step, batch_size, rank, world_size)
        rows = torch.tensor([self.row[v] for v in variants], device=self.parameters.device)
        return DiagonalGaussianDistribution(self.parameters.index_select(0, rows)), captions
