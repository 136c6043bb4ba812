"""The VAE's latent distribution of every training image, encoded once.

Without random crops a run only ever shows a finite set of pixel tensors: each image, and its
mirror image when flips are on. Encoding each of them once before the loop and sampling the
stored distribution at every step gives the latents the loop would get by encoding the batch
itself (the same distribution, sampled with the same generator draws), without the per-step
resize, crop and VAE encoder pass. Masks are stored beside, at latent resolution. With buckets
the variants are kept per bucket size: a batch comes from one bucket, so it gathers from one.
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from balora_diffusion.data import ConceptData


class LatentCache:
    def __init__(self, data: ConceptData, vae, device: torch.device, batch_size: int):
        self.data = data
        by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for variant in data.variants():
            by_size.setdefault(data.sizes[variant[0]], []).append(variant)
        self.row = {v: (size, i) for size, members in by_size.items() for i, v in enumerate(members)}
        self.parameters, self.masks = {}, {}
        with torch.no_grad():
            for size, members in by_size.items():
                chunks, masks = [], []
                for i in range(0, len(members), batch_size):
                    views = [data.variant(v) for v in members[i:i + batch_size]]
                    pixels = torch.stack([px for px, _ in views])
                    chunks.append(vae.encode(pixels.to(device, vae.dtype)).latent_dist.parameters)
                    masks += [m for _, m in views]
                self.parameters[size] = torch.cat(chunks)
                if data.masked:
                    self.masks[size] = torch.stack(masks).to(device)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1
              ) -> tuple[DiagonalGaussianDistribution, list[str], torch.Tensor | None]:
        """The latent distribution of ConceptData.batch(step, ...)'s images, their captions and masks."""
        variants, captions = self.data.batch_variants(step, batch_size, rank, world_size)
        size = self.row[variants[0]][0]
        rows = torch.tensor([self.row[v][1] for v in variants], device=self.parameters[size].device)
        masks = self.masks[size].index_select(0, rows) if self.data.masked else None
        return DiagonalGaussianDistribution(self.parameters[size].index_select(0, rows)), captions, masks

    def size_conditions(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """ConceptData.size_conditions of the same batch."""
        return self.data.size_conditions(step, batch_size, rank, world_size)
