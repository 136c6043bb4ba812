"""Loading a base model (a diffusers folder or one single file) of a known family, offline.

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

from balora_diffusion import families, paths
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError
from balora_diffusion.families import Family

DEFAULT_MODEL_DIR = paths.TINY_SD

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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


def model_family(path: Path, config_only: bool = False) -> Family:
    """The family of a diffusers folder (the pipeline its model_index.json names), checked to hold
    every component the family needs (`config_only`: that a single file's config folder needs), each
    a subfolder."""
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
    if not isinstance(listed, dict):
        raise UserError(f"{index} is not a JSON object")
    # folders written by hand may not name their pipeline: they are what this toolkit always read
    family = families.of_class_name(listed["_class_name"], str(path)) if "_class_name" in listed else families.DEFAULT
    needed = family.config_components if config_only else family.components
    missing = [c for c in needed if c not in listed or not (path / c).is_dir()]
    if missing:
        raise UserError(f"{path} lacks the {family.title} component(s) {', '.join(missing)}")
    return family


def check_model_dir(path: Path) -> Path:
    """A diffusers folder of a known family: model_index.json naming the components, each a subfolder."""
    model_family(path)
    return Path(path).expanduser()


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


def _pipeline_class(family: Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "auto",
                  dtype: torch.dtype | str | None = None, single_file_config: str | Path | None = None):
    """The pipeline of a local diffusers folder (default: the shipped tiny model) or of a single-file
    checkpoint (see load_single_file; `single_file_config` names the diffusers folder holding its
    component configs, default its family's shipped ones), never the hub."""
    if path is not None and not Path(path).is_dir() and Path(path).suffix:
        return load_single_file(path, config=single_file_config, device=device, dtype=dtype)
    folder = Path(path).expanduser() if path is not None else DEFAULT_MODEL_DIR
    family = model_family(folder)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        with quiet_diffusers():
            pipe = _pipeline_class(family).from_pretrained(folder, local_files_only=True, dtype=torch_dtype,
                                                           **family.load_kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from None
    return pipe.to(torch_device)


def load_single_file(path: str | Path, *, config: str | Path | None = None,
                     device: str | torch.device = "auto", dtype: torch.dtype | str | None = None):
    """The pipeline of one original-layout .safetensors file, never the hub.

    `config` is a local diffusers folder giving the component configs, tokenizers and scheduler
    (default: those of the family the file's tensor names show, shipped in assets/); the file's
    weights must fit it. Without a local config diffusers silently tries to download one (diffusers
    issue 8752)."""
    from balora_diffusion.formats.ldm_checkpoint import check_fits
    from balora_diffusion.formats.safetensors_io import checked_file, read_header

    path = checked_file(path, "checkpoint")
    if config is not None:
        config_dir = Path(config).expanduser()
        family = model_family(config_dir, config_only=True)
    else:
        family = families.of_file_keys(read_header(path)[0])
        config_dir = family.config_dir
    shipped = {name: part for name, part in family.single_file_parts().items() if not (config_dir / name).is_dir()}
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_fits(path, config_dir, family)
    try:
        with quiet_diffusers():
            # diffusers wants the config folder as a str: its model loaders refuse a Path
            pipe = _pipeline_class(family).from_single_file(
                str(path), config=str(config_dir), local_files_only=True, dtype=torch_dtype, **family.load_kwargs,
                **shipped)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    return pipe.to(torch_device)


# transformers 5 writes a CLIPTextModel's weights without the `text_model.` prefix and reads either
# spelling; transformers 4 (the stack of diffusers 0.35 and older) reads only the prefixed names and,
# given the others, starts the text encoder from random weights without an error.
HUB_TEXT_PREFIX = "text_model."
_OUTSIDE_TEXT_MODEL = "text_projection."  # CLIPTextModelWithProjection's projection sits beside text_model


def save_pipeline(pipe, folder: str | Path) -> None:
    """`pipe.save_pretrained` (safetensors), with the text encoders under the key names of the hub's
    checkpoints, so that the folder loads the same in older and newer transformers."""
    with quiet_diffusers():
        pipe.save_pretrained(folder, safe_serialization=True)
    for name in families.of_pipeline(pipe).text_encoders:
        use_hub_text_names(Path(folder) / name)


def use_hub_text_names(folder: Path) -> None:
    """Rewrite a saved CLIP text encoder's weight files (and shard index) with prefixed key names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from balora_diffusion.atomic import atomic_path, write_json_atomic

    def hub(key: str) -> str:
        return key if key.startswith((HUB_TEXT_PREFIX, _OUTSIDE_TEXT_MODEL)) else HUB_TEXT_PREFIX + key

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if all(hub(k) == k for k in f.keys()):
                continue
            tensors, metadata = {hub(k): f.get_tensor(k) for k in f.keys()}, f.metadata()
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    for index in folder.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {hub(k): v for k, v in data.get("weight_map", {}).items()}
        write_json_atomic(index, data)
