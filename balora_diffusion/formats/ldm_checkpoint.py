"""A whole base model as ONE original-layout (CompVis / LDM key names) .safetensors file.

Writing is our own diffusers -> LDM key mapping, the reverse of what diffusers' `from_single_file`
does, so a pipeline (e.g. with a LoRA merged in) can go to A1111 / ComfyUI. Reading checks that a
file fits a model config before `models.load_pipeline` hands it to `from_single_file`.
Pickled checkpoints (.ckpt, .pt, .bin) are never opened: unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from balora_diffusion import families
from balora_diffusion.errors import UserError
from balora_diffusion.families import Family
from balora_diffusion.formats.safetensors_io import checked_file, read_header, write_file

DEFAULT_CONFIG_DIR = families.DEFAULT.config_dir

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# --- diffusers -> LDM names ------------------------------------------------------------------

def _vae_name(name: str, config) -> str:
    """LDM numbers the decoder's levels from the lowest resolution up, diffusers in call order."""
    module, leaf = name.rsplit(".", 1)
    if module in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                  "decoder.conv_in", "decoder.conv_out"):
        return name
    side, rest = module.split(".", 1)
    if rest == "conv_norm_out":
        return f"{side}.norm_out.{leaf}"
    parts = rest.split(".")
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"{side}.mid.block_{int(parts[2]) + 1}.{_VAE_RESNET[parts[3]]}.{leaf}"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION['.'.join(parts[3:])]}.{leaf}"
    block, kind = int(parts[1]), parts[2]
    if parts[0] == "down_blocks":
        level, word = f"down.{block}", "downsample"
    elif parts[0] == "up_blocks":
        level, word = f"up.{len(config['up_block_types']) - 1 - block}", "upsample"
    else:
        raise KeyError(name)
    if kind in ("downsamplers", "upsamplers"):
        return f"{side}.{level}.{word}.conv.{leaf}"
    return f"{side}.{level}.block.{parts[3]}.{_VAE_RESNET[parts[4]]}.{leaf}"


def _mapped(module: torch.nn.Module, prefix: str, rename, family: Family) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in module.state_dict().items():
        try:
            out[prefix + rename(name)] = tensor
        except (KeyError, IndexError, ValueError):
            raise UserError(f"{type(module).__name__} weight {name!r} has no place in a {family.title} checkpoint "
                            f"(not a {family.title} architecture?)") from None
    return out


def to_original_layout(unet, vae, *text_encoders, family: Family = families.DEFAULT) -> dict[str, torch.Tensor]:
    """The weights of `unet`, `vae` and the family's text encoders (in its order) under their original
    names (tensors shared where the layouts agree, not copied).

    Works on meta-device models too, which is how `load_single_file` knows the names and shapes a
    config expects without building real weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (unet, vae, *text_encoders):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise UserError(f"the {type(model).__name__} still holds LoRA layers: fuse them into the weights "
                            "(pipe.fuse_lora(); pipe.unload_lora_weights()) before saving a checkpoint")
    tensors = _mapped(unet, UNET_PREFIX, lambda n: family.unet_ldm_name(n, unet.config), family)
    for key, tensor in _mapped(vae, VAE_PREFIX, lambda n: _vae_name(n, vae.config), family).items():
        # the VAE's attention projections are 1x1 convolutions in LDM, linear layers in diffusers
        is_projection = ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2
        tensors[key] = tensor[:, :, None, None] if is_projection else tensor
    for layout, text_encoder in zip(family.single_file_text.values(), text_encoders, strict=True):
        tensors.update(layout(text_encoder))
    return tensors


# --- writing ---------------------------------------------------------------------------------

def save_single_file(pipe, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the pipeline's UNet, VAE and text encoder(s) as one original-layout .safetensors file
    (floating-point tensors cast to `dtype`), atomically."""
    family = families.of_pipeline(pipe)
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a single-file checkpoint is written as .safetensors")
    text_encoders = family.encoders(pipe)
    tensors = {key: t.to("cpu", dtype) if t.is_floating_point() else t
               for key, t in to_original_layout(pipe.unet, pipe.vae, *text_encoders, family=family).items()}
    return write_file(path, tensors, {})


# --- reading ---------------------------------------------------------------------------------

def _expected_shapes(config_dir: Path, family: Family) -> dict[str, tuple[int, ...]]:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    listed = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoders = [getattr(transformers, listed[name][1])(transformers.CLIPTextConfig.from_pretrained(
            config_dir / name)) for name in family.text_encoders]
    layout = to_original_layout(unet, vae, *text_encoders, family=family)
    return {key: tuple(t.shape) for key, t in layout.items()}


def _as_linear(shape: tuple[int, ...]) -> tuple[int, ...]:
    # checkpoints store the VAE attention projections either as 1x1 convs or as linear weights
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def check_fits(path: Path, config_dir: Path, family: Family = families.DEFAULT) -> None:
    """UserError unless every tensor the config's models need is in the file with the right shape.

    diffusers would otherwise leave missing weights uninitialised on the meta device and only warn."""
    found, expected = read_header(checked_file(path, "checkpoint"))[0], _expected_shapes(config_dir, family)
    missing = [key for key in expected if key not in found]
    if len(missing) == len(expected):
        names = ", ".join(f"{prefix}..." for prefix in (UNET_PREFIX, VAE_PREFIX, family.single_file_marker))
        raise UserError(f"{path} holds no {family.title} model: none of the {len(found)} tensors has an "
                        f"original {family.title} name such as {names}")
    wrong = [key for key in expected if key in found and _as_linear(found[key]) != _as_linear(expected[key])]
    if missing or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if wrong:
            key = wrong[0]
            details.append(f"{len(wrong)} of another shape, e.g. {key} is {list(found[key])}, "
                           f"expected {list(expected[key])}")
        raise UserError(f"{path} does not fit the model config in {config_dir} ({'; '.join(details)}); "
                        f"is it a {family.title} checkpoint?")
