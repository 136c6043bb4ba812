"""The LoRA file formats `balora export --format` writes and `read_adapter` recognises in a single file.

A format is a module with a reader and a writer (and, unless it is the fallback, a test on a file's
tensor names) plus one `Format` entry here. Entries name their functions as "module:function" so
that listing the formats (`balora export --help`, a bad --format) imports none of them, nor torch.
To add a format, write its module and add its entry to FORMATS.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from balora_diffusion.formats.adapter import Adapter


def _function(reference: str) -> Callable:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Format:
    name: str
    description: str          # one line for --help, after "NAME: "
    read_function: str        # "module:function", (path) -> Adapter; reports every key it does not take
    write_function: str       # "module:function", (target, adapter) -> Path; target as `folder_file` says
    claims_function: str | None = None  # "module:function", (tensor names) -> bool; None: only the fallback
    folder_file: str | None = None      # the file it writes inside a folder; None: it is one .safetensors file

    def claims(self, keys: Iterable[str]) -> bool:
        return self.claims_function is not None and _function(self.claims_function)(keys)

    def read(self, path: Path) -> Adapter:
        return _function(self.read_function)(path)

    def write(self, target: Path, adapter: Adapter) -> Path:
        return _function(self.write_function)(target, adapter)


_DIFFUSERS = "balora_diffusion.formats.diffusers_lora"
_KOHYA = "balora_diffusion.formats.kohya_lora"

# in --format's order; a format is found in a file by its claims, in this order
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("diffusers", "a folder for pipe.load_lora_weights", f"{_DIFFUSERS}:read_diffusers",
           f"{_DIFFUSERS}:write_diffusers", folder_file="pytorch_lora_weights.safetensors"),
    Format("kohya", "one .safetensors file for A1111, ComfyUI, Forge", f"{_KOHYA}:read_kohya",
           f"{_KOHYA}:write_kohya", claims_function=f"{_KOHYA}:is_kohya"),
)}
# reads a file no format claims: it takes the most spellings and names each key it cannot place
FALLBACK = "diffusers"


def format_of(keys: Iterable[str]) -> Format:
    """The format of a LoRA file with these tensor names."""
    keys = list(keys)
    return next((f for f in FORMATS.values() if f.claims(keys)), FORMATS[FALLBACK])
