"""Scores of an adapter by `balora eval`'s metrics, for a training's checkpoints and a sweep's cells.

The images are drawn as `balora eval` draws them (commands.generate.load_drawing, the adapter added to
the base weights through formats.fuse.Fused, generate.fusion_grid), from the concept's evaluation
prompts and the same seeds at every checkpoint, so a checkpoint's score here is the score `balora eval
CHECKPOINT --seeds S --steps N --fusion 1` gives it, and two checkpoints' images differ by their weights
only. Every metric is higher-is-better:

    clip-t, clip-i, dino   balora_diffusion.metrics (CLIP and DINO models from a folder or the hub cache)
    fidelity               the world concept's colour score (needs concept.toml)
    adherence              the share of what each prompt names (background, size, position) that the
                           pixels show (scoring.adherence; needs concept.toml and prompts in its words)

The best checkpoint by one metric is exported in every format into RUN/best/, the layout of `balora eval
--best-by`: the run's adapter files and best.json saying which step it is and what it scored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import BEST, BEST_RECORD

CLIP_METRICS = ("clip-t", "clip-i")
MODEL_METRICS = (*CLIP_METRICS, "dino")  # any concept's
PIXEL_METRICS = ("fidelity", "adherence")  # the toy world's: they read concept.toml
METRICS = [*MODEL_METRICS, *PIXEL_METRICS]


def twice_problem(metrics: list[str]) -> str | None:
    """A config check: a metric named twice would be drawn for and scored twice."""
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    return f"{', '.join(twice)} named twice" if twice else None


def eval_default(name: str) -> str:
    """`balora eval`'s default for its option `name` (its --clip / --dino), the models a run is scored
    with when none is named."""
    from balora_diffusion.commands.eval import EvalConfig

    return next(f.default for f in dataclasses.fields(EvalConfig) if f.name == name)


def load_models(metrics: list[str], clip: str, dino: str, flags: tuple[str, str] = ("--clip", "--dino")) -> dict:
    """The CLIP and DINO models `metrics` need ({"clip": Loaded, "dino": Loaded}); a model that is not
    here is one UserError naming the option `flags` says the user gave it with."""
    from balora_diffusion import metrics as m

    models = {}
    for name, wanted, spec, load, flag in (("clip", set(CLIP_METRICS), clip, m.load_clip, flags[0]),
                                          ("dino", {"dino"}, dino, m.load_dino, flags[1])):
        if not wanted & set(metrics):
            continue
        try:
            models[name] = load(spec or eval_default(name))
        except UserError as exc:
            raise UserError(str(exc).replace(f"--{name}", flag)) from None
    return models


def check_concept(metrics: list[str], concept_dir: str | Path, flag: str) -> None:
    """The pixel metrics read the world concept's concept.toml: refuse them without one."""
    asked = [m for m in metrics if m in PIXEL_METRICS]
    if asked and not (Path(concept_dir) / "concept.toml").is_file():
        raise UserError(f"{flag} {' '.join(asked)} needs a concept.toml in {concept_dir} (the world concept's "
                        "colours and prompts); score a concept of your own with clip-t, clip-i and dino")


def world_adherence(images, prompts, concept) -> float | None:
    """The share of the background, size and position each prompt names that its image shows (sizes and
    positions calibrated on the concept's captioned images); None when no prompt names any."""
    from balora_diffusion import scoring
    from balora_diffusion.experiments.cell_scores import concept_prompts

    _, calibration = concept_prompts(concept, 0)
    return scoring.adherence_score([scoring.adherence(image, scoring.parse_context(prompt), calibration)
                                    for image, prompt in zip(images, prompts)])


def score_images(images, prompts: list[str], subject, metrics: list[str], models: dict,
                 seconds: dict | None = None) -> dict:
    """{metric: score} of `images` drawn from `prompts` (images[i] from prompts[i]) against `subject`
    (a concept_eval.Subject); `seconds`, when given, gets each metric's time."""
    import time

    from balora_diffusion import metrics as m
    from balora_diffusion.concept import fidelity_batch

    compute = {
        "clip-t": lambda: m.clip_t(models["clip"], images, [subject.clip_text(p) for p in prompts]),
        "clip-i": lambda: m.clip_i(models["clip"], images, subject.images),
        "dino": lambda: m.dino(models["dino"], images, subject.images),
        "fidelity": lambda: fidelity_batch(images, subject.concept),
        "adherence": lambda: world_adherence(images, prompts, subject.concept),
    }
    scores = {}
    for name in metrics:
        tick = time.perf_counter()
        scores[name] = compute[name]()
        if seconds is not None:
            seconds[name] = time.perf_counter() - tick
    return scores


@dataclass
class AdapterScorer:
    """Scores adapters of one concept: the drawing pipeline, the metric models and the subject, loaded
    once. `draw`: a commands.generate.DrawConfig (seeds, fusion coefficients, sampling)."""
    metrics: list[str]
    models: dict
    subject: Any
    draw: Any
    base_model: str = ""
    base_config: str = ""
    drawn: list = field(default_factory=list, repr=False)  # the last adapter's images[fusion][prompt][seed]
    _pipe: Any = field(default=None, repr=False)
    _call: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, run: Path, tokens: list[str], metrics: list[str], models: dict, draw,
                base_model: str = "", base_config: str = "") -> "AdapterScorer":
        """The scorer of run folder `run` (its config.json written): its concept, its held-out images as
        references where it has them, its concept's evaluation prompts, as `balora eval RUN` takes them."""
        from balora_diffusion import concept_eval

        subject = concept_eval.load_subject(concept_eval.Entry(run.name, run, run), tokens)
        if "clip-t" in metrics and not subject.class_word:
            raise UserError(f"no class word for {subject.folder}: clip-t needs one (concept.toml's class_word "
                            "or the run's init_word)")
        return cls(metrics, models, subject, draw, base_model, base_config)

    def _drawing(self):
        if self._pipe is None:
            from balora_diffusion.commands.generate import load_drawing

            self._pipe, self._call = load_drawing(self.draw, self.base_model, self.base_config)
            for loaded in self.models.values():
                loaded.model.to(self._pipe.device)
        return self._pipe, self._call

    def score(self, adapter) -> dict[str, dict[str, float | None]]:
        """{fusion label ("1", "0.7"): {metric: score}} of `adapter` (a formats Adapter)."""
        from balora_diffusion.commands.generate import check_prompt_windows
        from balora_diffusion.formats.fuse import Fused
        from balora_diffusion.generate import fusion_grid

        pipe, call = self._drawing()
        prompts, seeds = self.subject.prompts, list(self.draw.seeds)
        with Fused(pipe, [(adapter, 1.0)]) as fused:
            check_prompt_windows(pipe.tokenizer, prompts, fused.tokens)
            self.drawn = fusion_grid(pipe, fused, prompts, seeds, self.draw.fusion, progress=False, **call)
        flat_prompts = [p for p in prompts for _ in seeds]
        return {f"{w:g}": score_images([im for row in images for im in row], flat_prompts, self.subject, self.metrics,
                                       self.models)
                for w, images in zip(self.draw.fusion, self.drawn)}


def better(value: float | None, than: float | None) -> bool:
    """Whether a score beats the best so far (every metric is higher-is-better; a tie keeps the earlier)."""
    return value is not None and value == value and (than is None or value > than)


def write_best(run: Path, adapter, record: dict) -> Path:
    """RUN/best/: `adapter` in every format and best.json (`record`), swapped in whole."""
    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.formats.run_files import write_run_adapters

    best = run / BEST
    if best.is_symlink() or best.is_file():  # replaced itself, never written through nor its target deleted
        best.unlink()
    with atomic_path(best) as tmp:
        tmp.mkdir(parents=True)
        write_run_adapters(tmp, adapter)
        write_json_atomic(tmp / BEST_RECORD, record)
    return best


def read_best(run: Path) -> dict | None:
    """RUN/best/best.json, or None where there is none (or it cannot be read)."""
    import json

    try:
        return json.loads((run / BEST / BEST_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
