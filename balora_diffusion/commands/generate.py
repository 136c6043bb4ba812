"""`balora generate`: images from a base model with any number of adapters, across prompts, seeds
and fusion coefficients, as a labelled grid, the single images and a record of every setting."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from balora_diffusion.config import check_config, config_from_args, field, add_config_arguments
from balora_diffusion import threads
from balora_diffusion.draw import (DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SAMPLING_HELP, SCHEDULER_NAMES,
                                   Drawer, Sampling, model_parts, native_size)
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import check_record_folder
from balora_diffusion.train_config import IMAGE_SIDE


def adapter_spec(text: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` -> (path, weight)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0  # a colon that belongs to the path
        if not math.isfinite(value):
            raise UserError(f"adapter {text!r}: the weight after ':' must be a finite number")
        return path, value
    return text, 1.0


def _adapter_problem(specs: list[str]) -> str | None:
    for text in specs:
        path = Path(adapter_spec(text)[0]).expanduser()
        if not path.exists():
            return f"adapter not found: {path}"
    return None


def _size_problem(size: int) -> str | None:
    return None if size % 8 == 0 else f"the image size must be a multiple of 8, got {size}"


@dataclass
class DrawConfig:
    """How images are drawn: what `generate` and `eval` share."""
    def __post_init__(self) -> None:
        check_config(self)

    negative_prompt: str = field("", "negative prompt of every image")
    seeds: list[int] = field([1, 2], "sampling seeds: every prompt is drawn once per seed, at every fusion "
                                     "coefficient", nonempty=True, ge=0, lt=2**63)
    fusion: list[float] = field([1.0], "fusion coefficients (LoRA strength, UNet and text encoder alike)",
                                nonempty=True)
    steps: int = field(DEFAULT_STEPS, "sampling steps", ge=1)
    guidance: float = field(DEFAULT_GUIDANCE, "classifier-free guidance scale", ge=0)
    size: int = field(0, "image width and height in pixels, a multiple of 8; 0 = the base model's native size",
                      check=_size_problem, **IMAGE_SIDE)
    scheduler: str = field(DEFAULT_SCHEDULER, "sampler; model = the one the base model ships with (dpm++ is "
                                              "DPM-Solver++ 2M)", choices=SCHEDULER_NAMES)
    base_model: str = field("", "diffusers folder or single-file .safetensors; empty = the shipped tiny model",
                            path=True)
    base_config: str = field("", "for a single-file base model: diffusers folder with its component configs; "
                                 "empty = the shipped ones of the file's model family", path=True)
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = field("auto", "dtype of the model: auto = fp16 on CUDA, fp32 on the CPU",
                       choices=["auto", "fp32", "fp16", "bf16"])
    batch_size: int = field(8, "images drawn at once", ge=1)
    cpu_threads: int = field(0, threads.HELP, ge=0)


@dataclass
class GenerateConfig(DrawConfig):
    adapter: list[str] = field([], "run folder, checkpoint, adapter folder or LoRA file (diffusers, peft, kohya), "
                                   "as PATH or PATH:WEIGHT; several are added together", path=True,
                               check=_adapter_problem)
    prompt: list[str] = field([], "prompt; give several (or repeat the flag) for several rows")
    prompts_file: str = field("", "text file with one prompt per line (added after --prompt)", path=True)
    out: str = field("runs/generate", "output folder: grid.png, images/, generate.json", nonempty=True, path=True)
    overwrite: bool = field(False, "replace an output folder that holds an earlier generate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Example: balora generate --adapter runs/demo --prompt 'a <zorb> on a red background' "
                     "--fusion 0 0.7 1 --seeds 1 2 3 --out runs/demo-generate. The same seed gives the same "
                     f"image on every run and device. {SAMPLING_HELP}")
    add_config_arguments(parser, GenerateConfig)


def read_prompts_file(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the prompts file {path}: {exc}") from None


def _prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += read_prompts_file(Path(cfg.prompts_file))
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def load_drawing(cfg: DrawConfig, base_model: str = "", base_config: str = ""):
    """A draw.Drawer on the pipeline `cfg` draws with (its base model unless `base_model` is given),
    with cfg's sampling settings."""
    from balora_diffusion.models import load_pipeline
    from balora_diffusion.threads import use_cpu_threads

    pipe = load_pipeline(cfg.base_model or base_model or None, device=cfg.device,
                         dtype=None if cfg.dtype == "auto" else cfg.dtype,
                         single_file_config=cfg.base_config or base_config or None)
    use_cpu_threads(cfg.cpu_threads, model_parts(pipe))
    return Drawer(pipe, Sampling(steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                                 negative_prompt=cfg.negative_prompt, size=cfg.size, batch_size=cfg.batch_size))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(GenerateConfig, args)
    prompts, out = _prompts(cfg), Path(cfg.out)
    check_record_folder(out, "generate.json", cfg.overwrite)

    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.collector import libraries_loading

    with libraries_loading():
        from balora_diffusion.formats.read import read_adapter
        from balora_diffusion.generate import image_grid, save_image
        from balora_diffusion.train import library_versions

    specs = [adapter_spec(text) for text in cfg.adapter]
    adapters = [(read_adapter(path), weight) for path, weight in specs]  # every file read before the model loads
    drawer = load_drawing(cfg)
    size = cfg.size or native_size(drawer.pipe)
    drawer.hold(adapters)
    drawer.check_prompts(prompts)
    fusions = list(cfg.fusion) if adapters else [0.0]  # nothing to fuse: the base model alone
    images = drawer.draw_strengths(prompts, cfg.seeds, fusions)

    records, rows = [], [[] for _ in prompts]
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        for k, fusion in enumerate(fusions):
            for i, prompt in enumerate(prompts):
                for j, seed in enumerate(cfg.seeds):
                    name = f"images/p{i:02d}-w{fusion:g}-s{seed}.png"
                    save_image(tmp / name, images[k][i][j])
                    rows[i].append(images[k][i][j])
                    records.append({"file": name, "prompt": prompt, "seed": seed, "fusion": fusion})
        labels = [f"w={w:g} seed {s}" if adapters else f"seed {s}" for w in fusions for s in cfg.seeds]
        title = (" + ".join(f"{Path(p).name}:{w:g}" for p, w in specs) or "base model") + \
                f", {cfg.scheduler} {cfg.steps} steps, guidance {cfg.guidance:g}"
        save_image(tmp / "grid.png", image_grid(rows, row_labels=prompts, col_labels=labels, title=title))
        write_json_atomic(tmp / "generate.json", {
            "settings": asdict(cfg), "prompts": prompts, "size": size,
            "adapters": [{"path": str(Path(p).resolve()), "weight": w, "format": a.format, "tokens": a.tokens,
                          "info": a.info} for (p, w), (a, _) in zip(specs, adapters)],
            "images": records, "versions": library_versions()})
    print(f"{len(records)} images in {out / 'images'}; grid: {out / 'grid.png'}")
    return 0
