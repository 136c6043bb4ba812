"""The base model, loaded once and lazily, and the images the app draws with it, cached on disk.

One pipeline serves every request, one request at a time (a lock): a run's adapter is swapped in
only when the next image needs another run, and its strength (the fusion coefficient) set per
image. Every image is stored under the runs folder's cache, named by a digest of everything that
decides it (base model, the run's adapter files, prompt, seed, sampling settings, strength,
device), so a redraw is a file read and survives a restart of the app.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image

from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError

CACHE = ".app-cache"   # under the runs folder; hidden, so no listing takes it for runs
ADAPTER_NAME = "run"


@dataclass(frozen=True)
class Sampling:
    """What decides an image besides the run and its strength."""
    prompt: str
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    guidance: float = 5.0


def _file_digest(path: Path, memo: dict) -> str:
    """SHA-256 of a file's bytes, remembered while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in memo:
        memo[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return memo[key]


def use_adapter(pipe, adapter_dir: Path, weight: float, loaded: Path | None) -> Path:
    """Make `pipe` draw with the adapter in `adapter_dir` at strength `weight` (UNet and text
    encoder LoRA alike; the new token's embedding stays in at any strength). `loaded` is the
    adapter the pipeline holds now; the one it holds afterwards is returned."""
    from balora_diffusion.adapters import load_adapter

    if loaded != adapter_dir:
        if loaded is not None:
            pipe.unload_lora_weights()
            pipe.unload_textual_inversion()
        load_adapter(pipe, adapter_dir, adapter_name=ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[weight])
    return adapter_dir


class Engine:
    def __init__(self, runs: Path, base_model: str = "", device: str = "auto", cpu_threads: int = 0):
        self.runs = Path(runs)
        self.cache = self.runs / CACHE
        self.base_model, self.device, self.cpu_threads = base_model, device, cpu_threads
        self.lock = threading.Lock()
        self._pipe = None
        self._loaded: Path | None = None
        self._digests: dict = {}

    def pipeline(self):
        """The base model, loaded on first use (call with `self.lock` held)."""
        if self._pipe is None:
            import torch

            from balora_diffusion.models import load_pipeline

            if self.cpu_threads > 0:
                torch.set_num_threads(self.cpu_threads)
            self._pipe = load_pipeline(self.base_model or None, device=self.device)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @cached_property
    def base_identity(self) -> str:
        """The base model's path and the size and time of each of its files: a new or rebuilt model
        draws new images."""
        from balora_diffusion import paths

        root = Path(self.base_model or paths.TINY_SD).resolve()
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        return json.dumps([str(root)] + [[str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns]
                                         for f in files if f.is_file()])

    def image_key(self, run: Path, weight: float, sampling: Sampling) -> str:
        adapter = run / "adapter"
        files = sorted(p for p in adapter.glob("*.safetensors"))
        if not files:
            raise UserError(f"run {run.name} has no adapter yet (still training, or stopped before its end)")
        parts = {"base": self.base_identity, "device": self.device,
                 "adapter": [_file_digest(f, self._digests) for f in files],
                 "weight": float(weight), **asdict(sampling)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def cached(self, key: str) -> Image.Image | None:
        path = self.cache / "images" / f"{key}.png"
        if not path.is_file():
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    def draw(self, run: Path, weight: float, sampling: Sampling) -> Image.Image:
        """The image of `run` at strength `weight`: from the cache, else drawn and stored."""
        key = self.image_key(run, weight, sampling)
        image = self.cached(key)
        if image is not None:
            return image
        from balora_diffusion.generate import generate

        with self.lock:
            pipe = self.pipeline()
            self._loaded = use_adapter(pipe, run / "adapter", weight, self._loaded)
            image = generate(pipe, [sampling.prompt], [sampling.seed], steps=sampling.steps,
                             guidance_scale=sampling.guidance, negative_prompt=sampling.negative_prompt or None,
                             progress=False)[0][0]
        with atomic_path(self.cache / "images" / f"{key}.png") as tmp:
            image.save(tmp, format="PNG")
        return image
