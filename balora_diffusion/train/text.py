"""The text side of a training: the base model's tokenizers and text encoders (one for SD 1.x, two
for SDXL), the new tokens' embedding in each encoder, and which encoders carry LoRA."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from balora_diffusion.embeddings import ExtendedEmbedding
from balora_diffusion.families import Conditioning, Family, SizeCondition
from balora_diffusion.text_encoding import tokenize


@dataclass
class TextEncoders:
    family: Family
    tokenizers: list
    models: list[torch.nn.Module]          # as accelerate prepared them (DDP-wrapped under several processes)
    embeddings: list[ExtendedEmbedding]    # the new tokens' rows, one table per encoder
    adapted: list[bool]                    # which encoders carry LoRA

    @property
    def names(self) -> tuple[str, ...]:
        """The pipeline's names of the encoders: the checkpoint keys' and adapter parts' prefixes."""
        return self.family.text_encoders

    def named(self) -> dict[str, torch.nn.Module]:
        return dict(zip(self.names, self.models))

    def ids(self, captions: list[str]) -> list[torch.Tensor]:
        """The token rows of `captions` for each encoder."""
        return [tokenize(tokenizer, captions) for tokenizer in self.tokenizers]

    def condition(self, ids: list[torch.Tensor], device: torch.device, sizes: list[SizeCondition],
                  distinct: bool = True) -> Conditioning:
        return self.family.encode(self.models, ids, device, sizes, distinct)

    def train(self) -> None:
        """Training mode for the adapted encoders (dropout, if any, as the UNet has it); the others
        only learn the new tokens' rows and stay in eval mode."""
        for model, adapted in zip(self.models, self.adapted):
            model.train(adapted)

    def unwrapped(self, accelerator) -> TextEncoders:
        return replace(self, models=[accelerator.unwrap_model(m) for m in self.models])
