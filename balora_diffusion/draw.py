"""The one way the toolkit draws with adapters: the sampling defaults, the sampler, and adapters
applied to a pipeline at a strength.

A `Drawer` holds a diffusers pipeline (of any family: it touches the pipeline's components only
through formats.fuse and diffusers' own calls) and the adapters it draws with now. Every adapter
is added to the base weights,

    W = W0 + w * sum_i c_i * (alpha_i / r_i) * B_i @ A_i,

c_i each adapter's weight and w the strength (the fusion coefficient), for the UNet and the text
encoder alike; the new tokens' embeddings are loaded with them and stay in at every strength,
w = 0 included. Adding to the weights is what a merged model is, so an image drawn here is the
image of the merged model, a change of strength costs one pass over the adapted layers, and a
training's adapter draws exactly what its saved files draw.

Sampling defaults, used wherever a caller gives none: DEFAULT_STEPS steps, classifier-free guidance
DEFAULT_GUIDANCE, and the base model's own sampler (each family ships one that suits it). Every
(prompt, seed) image starts from its own CPU generator (`generate`), so it is the same
image in any batch and on any device, and two prompts drawn with one seed start from the same noise
(what makes a grid's columns comparable).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from balora_diffusion.errors import UserError

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
BATCH_SIZE = 16  # images per pipeline call, where a caller names no other
MODEL_SCHEDULER = "model"  # the sampler the base model ships with
DEFAULT_SCHEDULER = MODEL_SCHEDULER

SAMPLING_HELP = (f"Sampling defaults: {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE:g}, the base model's own "
                 "sampler.")

# name -> (diffusers scheduler class, config overrides); DPM-Solver++ (2M) is how the iLoRA paper samples
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
SCHEDULER_NAMES = [MODEL_SCHEDULER, *SCHEDULERS]


def set_scheduler(pipe, name: str) -> None:
    """Replace `pipe`'s sampler by the named one, built from the model's own noise schedule."""
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | None = None,
             batch_size: int = BATCH_SIZE, progress: bool = True, **call_kwargs: Any) -> list:
    """images[i][j] is prompts[i] drawn with seeds[j] by `pipe` as it is (its sampler, the adapters
    applied to it): the seeded sampling under Drawer.draw. Extra keyword arguments go to the pipeline
    call (height, width)."""
    import torch
    from tqdm.auto import tqdm

    jobs = [(p, s) for p in prompts for s in seeds]
    flat: list = []
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[start:start + batch_size]
        with torch.no_grad():
            out = pipe(prompt=[p for p, _ in chunk],
                       negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
                       generator=[torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk],
                       num_inference_steps=steps, guidance_scale=guidance_scale, **call_kwargs)
        flat.extend(out.images)
        bar.update(len(chunk))
    bar.close()
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


@dataclass(frozen=True)
class Sampling:
    """How images are drawn, besides the prompt, the seed, the adapters and their strength."""
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    negative_prompt: str = ""
    size: int = 0  # width and height in pixels; 0 = the base model's native size
    batch_size: int = BATCH_SIZE


def native_size(pipe) -> int:
    """The image side the base model draws by default."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def model_parts(pipe) -> list:
    """The pipeline's torch modules (UNet, text encoder or encoders, VAE, ...), whatever its family."""
    import torch

    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


# per pipeline: the sampler it came with (what MODEL_SCHEDULER finds again after another was used),
# and the name of the one it samples with now
_schedulers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_scheduler(pipe, name: str) -> None:
    """Make `pipe` sample with the named sampler (SCHEDULER_NAMES), built from the model's own noise schedule."""
    if name not in SCHEDULER_NAMES:
        raise UserError(f"unknown sampler {name!r}: one of {', '.join(SCHEDULER_NAMES)}")
    own, current = _schedulers.get(pipe, (pipe.scheduler, MODEL_SCHEDULER))
    if name != current:
        pipe.scheduler = own
        if name != MODEL_SCHEDULER:
            set_scheduler(pipe, name)
    _schedulers[pipe] = (own, name)


class Drawer:
    """Draws on `pipe` with the adapters it holds (none at first: the base model) at any strength.

    `hold` applies adapters in place of the ones held; `release` (also on leaving a `with` block)
    gives back the base model exactly."""

    def __init__(self, pipe, sampling: Sampling = Sampling()):
        self.pipe, self.sampling = pipe, sampling
        self._held: tuple[Hashable, object] | None = None  # (key, formats.fuse.Fused)

    @property
    def tokens(self) -> list[str]:
        """The new tokens of the adapters held."""
        return list(self._held[1].tokens) if self._held else []

    def hold(self, adapters: Sequence[tuple[object, float]] | Callable[[], Sequence[tuple[object, float]]],
             key: Hashable | None = None) -> "Drawer":
        """Draw from now on with `adapters`: (formats Adapter, weight) pairs, or a function returning
        them, called only when needed. With a `key`, adapters held under the same key are kept (no
        re-read, no re-application). Nothing changes unless every adapter fits the pipeline."""
        from balora_diffusion.formats.fuse import Fused

        if key is not None and self._held is not None and self._held[0] == key:
            return self
        chosen = adapters() if callable(adapters) else adapters  # read whole before the pipeline is touched
        self.release()
        self._held = (key, Fused(self.pipe, list(chosen)))
        return self

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt in which a held adapter's token falls past the text encoder's window: it
        would be drawn as if the token were not there."""
        from balora_diffusion.data import window_problem

        for prompt in prompts:
            named = [t for t in self.tokens if t in prompt]
            if named and (problem := window_problem(self.pipe.tokenizer, prompt, named)):
                shown = prompt if len(prompt) <= 40 else f"{prompt[:40]}..."
                raise UserError(f"the prompt {shown!r} {problem}, so it would be drawn without it: "
                                "shorten the prompt or name the token earlier")

    def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held[1], None
            held.restore()

    def __enter__(self) -> "Drawer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def draw(self, prompts: Sequence[str], seeds: Sequence[int], strength: float = 1.0,
             sampling: Sampling | None = None, *, progress: bool = True) -> list:
        """images[i][j]: prompts[i] drawn with seeds[j], the adapters held at `strength`."""
        sampling = sampling or self.sampling
        if self._held is not None:
            self._held[1].set_fusion(strength)
        use_scheduler(self.pipe, sampling.scheduler)
        size = {"height": sampling.size, "width": sampling.size} if sampling.size else {}
        return generate(self.pipe, prompts, seeds, steps=sampling.steps, guidance_scale=sampling.guidance,
                        negative_prompt=sampling.negative_prompt or None, batch_size=sampling.batch_size,
                        progress=progress, **size)

    def draw_strengths(self, prompts: Sequence[str], seeds: Sequence[int], strengths: Sequence[float],
                       sampling: Sampling | None = None, *, progress: bool = True) -> list:
        """images[k][i][j]: prompts[i] with seeds[j] at strengths[k]; the same seeds at every strength,
        so only the adapters' strength differs."""
        return [self.draw(prompts, seeds, w, sampling, progress=progress) for w in strengths]
