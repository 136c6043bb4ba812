"""The model families the toolkit trains and draws with, and how a base model's family is found.

Adding a family is a module beside sd1.py / sdxl.py defining a Family, and its entry in FAMILIES.
"""
from __future__ import annotations

from collections.abc import Iterable

from balora_diffusion.errors import UserError
from balora_diffusion.families.family import Conditioning, Family, SizeCondition
from balora_diffusion.families.sd1 import SD1
from balora_diffusion.families.sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD1, SDXL)
DEFAULT = SD1

__all__ = ["DEFAULT", "FAMILIES", "SD1", "SDXL", "Conditioning", "Family", "SizeCondition", "by_name",
           "of_class_name", "of_file_keys", "of_pipeline"]


def _known() -> str:
    return ", ".join(f.title for f in FAMILIES)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"unknown model family {name!r}: one of {', '.join(f.name for f in FAMILIES)}")


def of_class_name(class_name: str | None, where: str) -> Family:
    """The family of a diffusers folder whose model_index.json names the pipeline `class_name`."""
    for family in FAMILIES:
        if class_name in family.class_names:
            return family
    raise UserError(f"{where} is a {class_name or 'unnamed'} model; this toolkit runs {_known()}")


def of_file_keys(keys: Iterable[str]) -> Family:
    """The family of a single-file checkpoint, from the names of its tensors; DEFAULT where no family's
    marker is among them (checking the file against DEFAULT's config then says what it lacks)."""
    keys = list(keys)
    for family in FAMILIES:
        if any(key.startswith(family.single_file_marker) for key in keys):
            return family
    return DEFAULT


def of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline (of its class or a subclass of it)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for family in FAMILIES:
        if family.pipeline_class in names:
            return family
    raise UserError(f"a {type(pipe).__name__} is not a pipeline of a known family ({_known()})")
