"""Loading a Stable Diffusion 1.x base model (a diffusers folder) offline.

The shipped tiny model in assets/tiny-sd is stored in fp16 to stay small; on the CPU it must
run in fp32 (fp16 matmuls are not implemented there), on CUDA fp16 / bf16 are fine.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from balora_diffusion import paths
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError

DEFAULT_MODEL_DIR = paths.TINY_SD

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None means fp32 on the CPU and fp16 on CUDA; half precision on the CPU is refused."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype.lower()]
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError(f"{dtype} needs a CUDA device; on the CPU the model runs in float32")
    return dtype


def check_model_dir(path: Path) -> Path:
    """A diffusers Stable Diffusion folder: model_index.json naming the components, each a subfolder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"base model folder not found: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path} is not a diffusers model folder (no model_index.json)")
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index} is not valid JSON: {exc}") from None
    missing = [c for c in _COMPONENTS if c not in listed or not (path / c).is_dir()]
    if missing:
        raise UserError(f"{path} lacks the Stable Diffusion component(s) {', '.join(missing)}")
    return path


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info/warning chatter (e.g. "safety checker disabled", fp16-cast notes)
    that is noise for a model that never had a safety checker, and the loading progress bars of
    diffusers and transformers: a load takes seconds, and a bar left on stderr would bury the one
    line that says why a load failed."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    previous = diffusers_logging.get_verbosity()
    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    diffusers_logging.set_verbosity(logging.ERROR)
    for lib, _ in bars:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "auto",
                  dtype: torch.dtype | str | None = None, single_file_config: str | Path | None = None):
    """StableDiffusionPipeline from a local diffusers folder (default: the shipped tiny model) or a
    single-file SD 1.x checkpoint (see load_single_file; `single_file_config` names the
    diffusers folder holding its component configs, default SD 1.5's), never the hub."""
    from diffusers import StableDiffusionPipeline

    if path is not None and not Path(path).is_dir() and Path(path).suffix:
        return load_single_file(path, config=single_file_config, device=device, dtype=dtype)
    folder = check_model_dir(Path(path) if path is not None else DEFAULT_MODEL_DIR)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        with quiet_diffusers():
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, local_files_only=True, dtype=torch_dtype, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from None
    return pipe.to(torch_device)


def load_single_file(path: str | Path, *, config: str | Path | None = None,
                     device: str | torch.device = "auto", dtype: torch.dtype | str | None = None):
    """StableDiffusionPipeline from one original-layout SD 1.x .safetensors file, never the hub.

    `config` is a local diffusers folder giving the component configs, tokenizer and scheduler
    (default: SD 1.5's, shipped in assets/sd15-config); the file's weights must fit it. Without a
    local config diffusers silently tries to download one (diffusers issue 8752)."""
    from diffusers import StableDiffusionPipeline

    from balora_diffusion.formats.ldm_checkpoint import DEFAULT_CONFIG_DIR, check_fits
    from balora_diffusion.formats.safetensors_io import checked_file

    path = checked_file(path, "checkpoint")
    config_dir = check_model_dir(Path(config) if config is not None else DEFAULT_CONFIG_DIR)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_fits(path, config_dir)
    try:
        with quiet_diffusers():
            # diffusers wants the config folder as a str: its model loaders refuse a Path
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, dtype=torch_dtype,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    return pipe.to(torch_device)


# transformers 5 writes a CLIPTextModel's weights without the `text_model.` prefix and reads either
# spelling; transformers 4 (the stack of diffusers 0.35 and older) reads only the prefixed names and,
# given the others, starts the text encoder from random weights without an error.
HUB_TEXT_PREFIX = "text_model."


def save_pipeline(pipe, folder: str | Path) -> None:
    """`pipe.save_pretrained` (safetensors), with the text encoder under the key names of the hub's
    SD 1.x checkpoints, so that the folder loads the same in older and newer transformers."""
    with quiet_diffusers():
        pipe.save_pretrained(folder, safe_serialization=True)
    use_hub_text_names(Path(folder) / "text_encoder")


def use_hub_text_names(folder: Path) -> None:
    """Rewrite a saved CLIP text encoder's weight files (and shard index) with prefixed key names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from balora_diffusion.atomic import atomic_path, write_json_atomic

    def hub(key: str) -> str:
        return key if key.startswith(HUB_TEXT_PREFIX) else HUB_TEXT_PREFIX + key

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if all(k.startswith(HUB_TEXT_PREFIX) for k in f.keys()):
                continue
            tensors, metadata = {hub(k): f.get_tensor(k) for k in f.keys()}, f.metadata()
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    for index in folder.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {hub(k): v for k, v in data.get("weight_map", {}).items()}
        write_json_atomic(index, data)
