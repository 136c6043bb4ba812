"""The only place that knows where the shipped files are.

The repository's `assets/` folder is the package `balora_diffusion.assets` and `training/configs/`
is `balora_diffusion.training_configs` (package-dir mappings in pyproject.toml), so a source
checkout, an editable install and a wheel install all find them through importlib.resources,
never through a module's location on disk.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from balora_diffusion.errors import UserError


def _folder(package: str) -> Path:
    root = files(package)
    # diffusers and transformers load folders by path: the package must be unpacked on disk
    # (pip always unpacks wheels; only a zipimport would not be).
    if not isinstance(root, Path):
        raise RuntimeError(f"{package} is not a folder on disk ({root}); install balora-diffusion with pip")
    return root


ASSETS = _folder("balora_diffusion.assets")
TINY_SD = ASSETS / "tiny-sd"                     # the shipped base model (a diffusers folder)
TOKENIZER = ASSETS / "tokenizer"                 # CLIP's BPE tokenizer
SD15_CONFIG = ASSETS / "sd15-config"             # SD 1.5 component configs for single-file models
SDXL_CONFIG = ASSETS / "sdxl-config"             # SDXL base 1.0 component configs (no tokenizer files)
CONCEPTS = ASSETS / "concepts"
DEMO_CONCEPT = CONCEPTS / "zorb"                 # the demo concept: images, captions, concept.toml
DEMO_MASKS = CONCEPTS / "zorb-masks"            # loss masks of the demo images (NN.mask.png), kept apart
RING_CONCEPT = CONCEPTS / "quax"                 # a second concept, to fuse with the first
WORLD_CLIP = ASSETS / "world-clip"               # a tiny CLIP of the toy world (training/build_world_clip.py)
CONFIGS = _folder("balora_diffusion.training_configs")


def shipped_configs() -> list[str]:
    """Names of the shipped training configs ("demo", "mixofshow-balora", ...)."""
    return sorted(p.stem for p in CONFIGS.glob("*.toml"))


def config_file(name: str | Path) -> Path:
    """A config file as given, or a shipped config by name ("mixofshow-balora" or
    "mixofshow-balora.toml"), so that `--config demo` works from any folder."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIGS / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    raise UserError(f"config file not found: {name} (shipped configs, usable by name: {', '.join(shipped_configs())})")
