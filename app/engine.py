"""The base model, loaded once and lazily, and the images the app draws with it, cached on disk.

One pipeline serves every request, one request at a time (a lock): a run's adapter is swapped in
only when the next image needs another run or checkpoint (or none, for the base model), and its strength (the fusion coefficient) set per
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
from balora_diffusion.draw import DEFAULT_GUIDANCE, DEFAULT_STEPS
from balora_diffusion.errors import UserError
from balora_diffusion.formats.diffusers_lora import LORA_FILE
from balora_diffusion.formats.run_files import DIFFUSERS_FOLDER
from balora_diffusion.run_layout import CHECKPOINTS, checkpoint_name
from balora_diffusion.runs import inside, own_file

CACHE = ".app-cache"   # under the runs folder; hidden, so no listing takes it for runs


@dataclass(frozen=True)
class Sampling:
    """What decides an image besides the run and its strength."""
    prompt: str
    negative_prompt: str = ""
    seed: int = 1
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE


def _file_digest(path: Path, memo: dict) -> str:
    """SHA-256 of a file's bytes, remembered while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in memo:
        memo[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return memo[key]


def checkpoint_folder(run: Path, step: int) -> Path:
    """Run `run`'s checkpoint of step `step`, if it is a folder inside the run; else a UserError."""
    folder = inside(run, run / CHECKPOINTS / checkpoint_name(step))
    if not folder.is_dir():
        raise UserError(f"run {run.name} has no checkpoint of step {step}")
    return folder


def read_source(run: Path, step: int | None):
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.formats.run_files import adapter_from_checkpoint

    if step is None:
        # the LoRA file itself (and the embedding beside it), never the run folder: a folder reader
        # would look into nested folders that Engine.image_key has not checked
        return read_adapter(run / DIFFUSERS_FOLDER / LORA_FILE)
    return adapter_from_checkpoint(checkpoint_folder(run, step))


class Engine:
    def __init__(self, runs: Path, base_model: str = "", device: str = "auto", cpu_threads: int = 0):
        self.runs = Path(runs)
        self.cache = inside(self.runs, self.runs / CACHE)  # the server hands out files from here
        self.base_model, self.device, self.cpu_threads = base_model, device, cpu_threads
        self.lock = threading.Lock()
        self._drawer = None  # a draw.Drawer on the base model, holding the adapter drawn last
        self._digests: dict = {}

    def pipeline(self):
        """The base model, loaded on first use (call with `self.lock` held)."""
        if self._drawer is None:
            from balora_diffusion.draw import Drawer
            from balora_diffusion.models import load_pipeline
            from balora_diffusion.draw import model_parts
            from balora_diffusion.threads import use_cpu_threads

            pipe = load_pipeline(self.base_model or None, device=self.device)
            use_cpu_threads(self.cpu_threads, model_parts(pipe))
            pipe.set_progress_bar_config(disable=True)
            self._drawer = Drawer(pipe)
        return self._drawer.pipe

    @cached_property
    def base_identity(self) -> str:
        """The base model's path and the size and time of each of its files: a new or rebuilt model
        draws new images."""
        from balora_diffusion import paths

        root = Path(self.base_model or paths.TINY_SD).resolve()
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        return json.dumps([str(root)] + [[str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns]
                                         for f in files if f.is_file()])

    def image_key(self, run: Path | None, weight: float | None, sampling: Sampling, step: int | None = None) -> str:
        """The digest naming the image (`run` None: the base model; `step`: that checkpoint of the
        run's); a UserError if any file it is drawn from links out of its run."""
        parts = {"base": self.base_identity, "device": self.device, "adapter": None, **asdict(sampling)}
        if run is not None:
            files = self._source_files(run, step)
            parts.update(adapter=[_file_digest(f, self._digests) for f in files], weight=float(weight))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @staticmethod
    def _source_files(run: Path, step: int | None) -> list[Path]:
        """The files the adapter of `run` (at checkpoint `step`, or final) is read from."""
        if step is not None:
            return [inside(run, p) for p in sorted(checkpoint_folder(run, step).iterdir())]
        if own_file(run, Path(DIFFUSERS_FOLDER, LORA_FILE)) is None:
            raise UserError(f"run {run.name} has no adapter yet (still training, or stopped before its end)")
        return [inside(run, p) for p in sorted((run / DIFFUSERS_FOLDER).glob("*.safetensors"))]

    def cached(self, key: str) -> Image.Image | None:
        path = own_file(self.cache, Path("images", f"{key}.png"))
        if path is None:
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    def draw(self, run: Path | None, weight: float | None, sampling: Sampling, step: int | None = None) -> Image.Image:
        """The image of `run` (None: the base model alone) at strength `weight`, from its final
        adapter or that of its checkpoint `step`: from the cache, else drawn and stored."""
        key = self.image_key(run, weight, sampling, step)
        image = self.cached(key)
        if image is not None:
            return image
        from balora_diffusion import draw

        with self.lock:
            self.pipeline()
            drawer = self._drawer
            if run is None:
                drawer.release()
            else:  # swapped only when another run or checkpoint is asked for; the new tokens stay in at any strength
                drawer.hold(lambda: [(read_source(run, step), 1.0)], key=(run, step))
            settings = draw.Sampling(steps=sampling.steps, guidance=sampling.guidance,
                                     negative_prompt=sampling.negative_prompt)
            image = drawer.draw([sampling.prompt], [sampling.seed], 0.0 if weight is None else weight, settings,
                                progress=False)[0][0]
        with atomic_path(self.cache / "images" / f"{key}.png") as tmp:
            image.save(tmp, format="PNG")
        return image
