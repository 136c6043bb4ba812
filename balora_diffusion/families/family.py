"""What the toolkit asks of a base model's architecture, answered once per family.

A family names its pipeline's parts (the UNet, the text encoders and their tokenizers), turns
token rows into the UNet's conditioning, gives the configs for loading one of its single files and
the names its layers have in other tools' files. The code outside `families/` asks a Family and
names no architecture itself. A model's training resolution is not a family's: it is the model's
own (its UNet's sample size times the VAE's factor), right for fine-tunes of other sizes too.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch



@dataclass
class Conditioning:
    """The UNet's conditioning of a batch: the cross-attention states and, for a family whose UNet
    takes more (SDXL's pooled text embedding and size ids), its `added_cond_kwargs`."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def predict(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor):
        """The UNet's output (a diffusers UNet2DConditionOutput) on `noisy` at `timesteps`."""
        if self.added is None:
            return unet(noisy, timesteps, self.hidden)
        return unet(noisy, timesteps, self.hidden, added_cond_kwargs=self.added)


@dataclass(frozen=True)
class SizeCondition:
    """Where a training image came from, in SDXL's terms (all (height, width) / (top, left) pixels):
    its size before resizing, the top-left corner of the crop in the resized image, the size trained at."""

    original: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]


@dataclass(frozen=True, eq=False)  # one instance per family: compared and hashed by identity
class Family:
    name: str                                   # "sd1", "sdxl": what run files and messages call it
    title: str                                  # "Stable Diffusion 1.x"
    pipeline_class: str                         # the diffusers pipeline that loads a folder of it
    class_names: tuple[str, ...]                # model_index.json `_class_name`s of its folders
    text_encoders: tuple[str, ...]              # the pipeline's text-encoder attributes, in kohya's order
    tokenizers: tuple[str, ...]                 # their tokenizers, in the same order
    config_dir: Path                            # component configs for loading a single file
    single_file_marker: str                     # a key prefix only this family's single files have
    single_file_text: Mapping[str, Callable]    # text encoder -> its tensors under their single-file names
    encode: Callable                            # (encoders, ids per encoder, device, sizes, distinct=True)
                                                # -> Conditioning (text_encoding.encoded_rows: `distinct`)
    kohya_text_prefixes: Mapping[str, str]      # text-encoder part -> kohya key prefix
    kohya_metadata: Mapping[str, str]           # the header entries that tell kohya's readers the base model
    unet_ldm_name: Callable                     # (diffusers UNet weight name, UNet config) -> original name
    kohya_unet_original: bool                   # kohya files name its UNet layers by their original names
    load_kwargs: Mapping[str, object] = field(default_factory=dict)  # for the pipeline's from_pretrained
    single_file_parts: Callable[[], dict] = dict  # parts a single file's config folder does not ship

    @property
    def components(self) -> tuple[str, ...]:
        """The parts a diffusers folder of this family must hold."""
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    @property
    def config_components(self) -> tuple[str, ...]:
        """The parts a single file's config folder must hold (its tokenizers may come from
        `single_file_parts`)."""
        return ("unet", "vae", *self.text_encoders, "scheduler")

    def parts(self, pipe, names: Sequence[str]) -> list:
        return [getattr(pipe, name) for name in names]

    def encoders(self, pipe) -> list[torch.nn.Module]:
        return self.parts(pipe, self.text_encoders)

    def tokenizers_of(self, pipe) -> list:
        return self.parts(pipe, self.tokenizers)
