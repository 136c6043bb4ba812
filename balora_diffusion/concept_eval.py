"""What `balora eval` scores and against what: the adapters a target holds, and per concept the
reference images, the prompts and the class word that stands in for the learned token in CLIP's text.

A run's references are the images its training held out (`holdout` in its config, the same draw the
training made); without a held-out set they are the training images, which favours a model that
copies them, and the record says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from balora_diffusion import checkpoint as ckpt
from balora_diffusion.concept import Concept, load_concept
from balora_diffusion.errors import UserError
from balora_diffusion.formats.diffusers_lora import LORA_FILE, PEFT_FILE
from balora_diffusion.run_layout import CHECKPOINTS, CONFIG, DIFFUSERS_FOLDER, RUN
from balora_diffusion.runs import is_run as _is_run
from balora_diffusion.runs import list_runs

# New contexts for a concept whose folder has no evaluation prompts: DreamBooth's kind of prompt,
# the concept somewhere its training images never showed it.
CONTEXTS = ("in the snow", "on the beach", "on a wooden table", "in a city street")


@dataclass(frozen=True)
class Entry:
    """One adapter to score: `source` is what formats.read.read_adapter reads."""
    label: str
    source: Path
    run: Path | None = None
    step: int | None = None


@dataclass
class Subject:
    """A concept as eval compares images with it."""
    folder: Path
    references: list[Path]
    reference_note: str
    prompts: list[str]
    class_word: str
    tokens: list[str]
    concept: Concept | None = None  # its concept.toml, where there is one (the world's pixel scores)
    images: list[Image.Image] = field(default_factory=list)

    def clip_text(self, prompt: str) -> str:
        """`prompt` with every learned token replaced by the class word, which CLIP knows."""
        for token in self.tokens:
            prompt = prompt.replace(token, self.class_word)
        return prompt


def run_config(folder: Path) -> dict:
    """The training config a run folder records (run.json's, else config.json)."""
    for name, key in ((RUN, "config"), (CONFIG, None)):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read {path}: {exc}") from None
            data = data.get(key) if key and isinstance(data, dict) else data
            if isinstance(data, dict):
                return data
    return {}


def _held_out(run: Path, examples: list, count: int, seed: int) -> tuple[list, list]:
    """(training, held-out) images of a run: the held-out ones by the names its run.json records,
    else (a run that has not finished) by repeating the training's seeded draw."""
    from balora_diffusion.data import split_holdout

    record = json.loads((run / RUN).read_text(encoding="utf-8")) if (run / RUN).is_file() else {}
    names = record.get("holdout_images")
    if not isinstance(names, list):
        return split_holdout(examples, count, seed)
    held = [e for e in examples if e.path.name in names]
    if len(held) != len(names):
        missing = sorted(set(names) - {e.path.name for e in held})
        raise UserError(f"{run}: its held-out images {', '.join(missing)} are no longer in its concept folder")
    return [e for e in examples if e.path.name not in names], held


def _run_entries(folder: Path, name: str) -> list[Entry]:
    """The final adapter of a run and each intact checkpoint that is not that same final state."""
    found = []
    final_step = None
    if (folder / DIFFUSERS_FOLDER / LORA_FILE).is_file():
        final_step = run_config(folder).get("steps")
        found.append(Entry(f"{name} final", folder / DIFFUSERS_FOLDER, folder, final_step))
    for checkpoint in ckpt.list_checkpoints(folder / CHECKPOINTS):
        step = ckpt.checkpoint_step(checkpoint)
        if step != final_step and ckpt.damage(checkpoint) is None:
            found.append(Entry(f"{name} {checkpoint.name}", checkpoint, folder, step))
    if not found:
        raise UserError(f"run {folder} has neither a finished adapter nor an intact checkpoint")
    return sorted(found, key=lambda e: (e.step is None, e.step or 0))


def list_entries(targets: list[Path]) -> list[Entry]:
    """Entries of every target: a run folder (its final adapter and checkpoints), a sweep or runs folder
    (each run's final adapter, else its newest checkpoint), or an adapter file, folder or checkpoint."""
    entries: list[Entry] = []
    for target in (Path(t).expanduser() for t in targets):
        if not target.exists():
            raise UserError(f"target not found: {target}")
        if target.is_dir() and _is_run(target):
            entries += _run_entries(target, target.name)
        elif target.is_dir() and not any((target / n).is_file() for n in (LORA_FILE, PEFT_FILE, ckpt.MANIFEST)):
            runs = list_runs(target)
            if not runs:
                raise UserError(f"{target} is neither a run, a folder of runs nor an adapter folder")
            for run in runs:
                entries.append(Entry(run.name, run.path, run.path, run.steps or None))
        else:
            run = target.parent.parent if target.parent.name == CHECKPOINTS else None
            step = ckpt.checkpoint_step(target) if run else None
            entries.append(Entry(target.name if not run else f"{run.name} {target.name}", target, run, step))
    return entries


def _context_prompts(captions: list[str]) -> list[str]:
    """The training captions placed in new contexts, one context each, cycling through the captions."""
    distinct = list(dict.fromkeys(captions))
    return [f"{distinct[i % len(distinct)]} {context}" for i, context in enumerate(CONTEXTS)]


def load_subject(entry: Entry, tokens: list[str], *, concept_dir: str = "", prompts: list[str] | None = None,
                 class_word: str = "") -> Subject:
    """The references, prompts and class word of the concept `entry` was trained on (`concept_dir`
    instead where given; an adapter outside a run needs it)."""
    from balora_diffusion.data import read_concept_folder

    config = run_config(entry.run) if entry.run else {}
    folder = Path(concept_dir or config.get("data_dir") or "")
    if not (concept_dir or config.get("data_dir")):
        raise UserError(f"{entry.source} is no run folder, so its concept is unknown: give --concept FOLDER")
    if not folder.is_dir():
        raise UserError(f"concept folder not found: {folder}" + ("" if concept_dir else f" (the data_dir of {entry.run})"))
    concept = load_concept(folder) if (folder / "concept.toml").is_file() else None
    tokens = tokens or list(config.get("token") or ([concept.token] if concept else []))
    template = concept.caption_template if concept else config.get("caption_template") or "a {token}"
    examples = read_concept_folder(folder, tokens, template)
    holdout = int(config.get("holdout") or 0) if not concept_dir else 0
    if holdout:
        training, held = _held_out(entry.run, examples, holdout, int(config.get("heldout_seed", 1234)))
        references, note = held, f"{len(held)} held-out images"
    elif entry.run and not concept_dir:
        training = references = examples
        note = (f"the {len(examples)} training images (the run held none out; train with --holdout N for "
                "references the adapter never saw)")
    else:
        training = references = examples
        note = f"the {len(examples)} images of {folder} (which of them trained the adapter is unknown)"
    word = class_word or (concept.class_word if concept else config.get("init_word") or "")
    if prompts is None:
        prompts = list(concept.eval_prompts) if concept else _context_prompts([e.caption for e in training])
    return Subject(folder=folder, references=[e.path for e in references], reference_note=note, prompts=prompts,
                   class_word=word, tokens=tokens, concept=concept, images=[e.image for e in references])
