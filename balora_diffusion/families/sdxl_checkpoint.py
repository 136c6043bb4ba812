"""Stable Diffusion XL as ONE original-layout (SGM key names) .safetensors file, and what diffusers
needs to read one offline.

`StableDiffusionXLPipeline.from_single_file` takes the component configs from a local folder
(`config=`): the shipped assets/sdxl-config holds SDXL base 1.0's, without tokenizer files. Both
SDXL tokenizers are CLIP's BPE (the second pads with "!"), built here from the shipped CLIP
tokenizer and passed in, so the 1.6 MB vocabulary ships once:

    StableDiffusionXLPipeline.from_single_file(str(path), config=str(DEFAULT_CONFIG_DIR),
                                               local_files_only=True, **tokenizers())
"""
from __future__ import annotations

import torch

from balora_diffusion import paths
from balora_diffusion.errors import UserError
from balora_diffusion.families.sdxl_names import (TEXT1_PREFIX, TEXT2_PREFIX, UNET_PREFIX, text2_original_name,
                                                  unet_sgm_param)
from balora_diffusion.formats import ldm_checkpoint

DEFAULT_CONFIG_DIR = paths.SDXL_CONFIG


def tokenizers() -> dict[str, object]:
    """`tokenizer` and `tokenizer_2` of an SDXL pipeline, as keyword arguments for its loaders."""
    from transformers import CLIPTokenizer

    # OpenCLIP pads with "!" (id 0), CLIP ViT-L's tokenizer with <|endoftext|>
    return {"tokenizer": CLIPTokenizer.from_pretrained(paths.TOKENIZER),
            "tokenizer_2": CLIPTokenizer.from_pretrained(paths.TOKENIZER, pad_token="!")}


def _open_clip_tensors(text_encoder_2) -> dict[str, torch.Tensor]:
    tensors, thirds = {}, {}
    for name, tensor in text_encoder_2.state_dict().items():
        key, third = text2_original_name(name)
        if third is not None:
            thirds.setdefault(key, [None] * 3)[third] = tensor
        else:
            tensors[TEXT2_PREFIX + key] = tensor.T if key == "text_projection" else tensor
    tensors.update({TEXT2_PREFIX + key: torch.cat(parts) for key, parts in thirds.items()})
    return tensors


def to_original_layout(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's weights under their original SGM names (the second text encoder in
    OpenCLIP's layout, its q/k/v projections fused)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # the VAE and CLIP ViT-L are SD 1.x's, under the same names apart from the text encoder's
    # prefix: the SD 1.x writer names them (given no UNet, whose SDXL names are ours)
    sd1 = ldm_checkpoint.to_original_layout(torch.nn.Module(), vae, text_encoder)
    tensors = {(TEXT1_PREFIX + key.removeprefix(ldm_checkpoint.TEXT_PREFIX)
                if key.startswith(ldm_checkpoint.TEXT_PREFIX) else key): tensor for key, tensor in sd1.items()}
    for model in (unet, text_encoder_2):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise UserError(f"the {type(model).__name__} still holds LoRA layers: fuse them into the weights "
                            "(pipe.fuse_lora(); pipe.unload_lora_weights()) before saving a checkpoint")
    tensors.update({UNET_PREFIX + unet_sgm_param(name, unet.config): tensor
                    for name, tensor in unet.state_dict().items()})
    tensors.update(_open_clip_tensors(text_encoder_2))
    return tensors

