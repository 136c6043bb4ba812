"""`balora eval`: CLIP-T, CLIP-I, DINO (and the world's pixel fidelity and prompt adherence) of every
adapter a run, a sweep or a list of adapter files holds, drawn with the same prompts and seeds; a table,
eval.json, a labelled grid, and with --best-by the best checkpoint of a run exported in every format into
RUN/best/. Without --clip the scores come from the shipped world CLIP, which knows only the toy world."""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from balora_diffusion import paths
from balora_diffusion.commands.generate import DrawConfig
from balora_diffusion.config import add_config_arguments, config_from_args, field
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import check_record_folder, claim
from balora_diffusion.run_layout import BEST, EVAL_RECORD, GRID

METRICS = ["clip-t", "clip-i", "dino", "fidelity", "adherence"]
WORLD_METRICS = ["fidelity", "adherence"]  # read from pixels; they need the concept's concept.toml


@dataclass
class EvalConfig(DrawConfig):
    metrics: list[str] = field([], "clip-t (prompt-image agreement), clip-i and dino (likeness to the reference "
                                   "images), fidelity and adherence (the toy world's pixel scores of the concept's "
                                   "colours and of the background, size and position its prompt asks for; need "
                                   "concept.toml); empty = clip-t and clip-i, dino when --dino is given, fidelity "
                                   "and adherence when the concept has a concept.toml", choices=METRICS)
    clip: str = field("", "CLIP model: a folder or a hub id in the local cache; empty = the shipped world CLIP "
                          "(assets/world-clip), which knows only the toy world: give a real one, e.g. "
                          "openai/clip-vit-large-patch14, for a real concept")
    dino: str = field("", "DINO / DINOv2 model (a folder or a hub id in the local cache, e.g. "
                          "facebook/dinov2-small); needed by --metrics dino, which it adds to the default metrics")
    concept: str = field("", "concept folder (images, captions, optional concept.toml); empty = each run's "
                             "data_dir", path=True)
    prompts_file: str = field("", "text file with one prompt per line; empty = concept.toml's eval_prompts, else "
                                  "the captions in new contexts", path=True)
    class_word: str = field("", "word that replaces the learned token in CLIP-T's text; empty = concept.toml's "
                                "class_word, else the run's init_word")
    best_by: str = field("", "with one run: the metric (at the highest fusion coefficient) whose best checkpoint "
                             "is exported into RUN/best/", choices=["", *METRICS])
    out: str = field("runs/eval", "output folder: eval.json, grid.png, images/", nonempty=True, path=True)
    overwrite: bool = field(False, "replace an earlier eval in --out (and RUN/best with --best-by)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="+", help="run folder (final adapter and every checkpoint), sweep or runs "
                                                  "folder (every run), or adapter files / folders / checkpoints")
    parser.epilog = ("Example: balora eval runs/dog --clip openai/clip-vit-large-patch14 --dino facebook/dinov2-small "
                     "--fusion 0.7 1 --out runs/dog-eval --best-by clip-i. Without --clip, a run of the toy world "
                     "(balora demo) is scored offline by the shipped world CLIP.")
    add_config_arguments(parser, EvalConfig)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: list[dict], metrics: list[str]) -> str:
    width = max(len("adapter"), *(len(r["label"]) for r in results))
    lines = [f"{'adapter'.ljust(width)}  {'w':>4}  " + "  ".join(f"{m:>9}" for m in metrics)]
    for r in results:
        lines.append(f"{r['label'].ljust(width)}  {r['fusion']:>4g}  " + "  ".join(f"{_fmt(r[m]):>9}" for m in metrics))
    return "\n".join(lines)


def _check_subject(subject, metrics: list[str]) -> None:
    for name in WORLD_METRICS:
        if name in metrics and subject.concept is None:
            raise UserError(f"--metrics {name} needs a concept.toml in {subject.folder} (its colours and prompts' "
                            "contexts in the toy world's words)")
    if "clip-t" in metrics and not subject.class_word:
        raise UserError(f"no class word for {subject.folder}: give --class-word WORD (what the concept is, e.g. dog)")


def chosen_metrics(cfg: EvalConfig, subjects) -> list[str]:
    """--metrics, or where empty what can be scored here: CLIP-T and CLIP-I, DINO with a --dino model, the
    world's pixel scores when every concept has a concept.toml."""
    chosen = list(cfg.metrics) or ["clip-t", "clip-i", *(["dino"] if cfg.dino else []),
                                   *(WORLD_METRICS if all(s.concept for s in subjects) else [])]
    if "dino" in chosen and not cfg.dino:
        raise UserError("--metrics dino needs --dino MODEL: a DINO or DINOv2 folder or a hub id in the local cache "
                        "(e.g. facebook/dinov2-small)")
    return chosen


def _best_run(cfg: EvalConfig, metrics: list[str], entries) -> Path | None:
    if not cfg.best_by:
        return None
    if cfg.best_by not in metrics:
        raise UserError(f"--best-by {cfg.best_by} is not among --metrics {' '.join(metrics)}")
    runs = {e.run for e in entries}
    if len(runs) != 1 or None in runs:
        raise UserError("--best-by chooses among the checkpoints of one run: give one run folder")
    run = runs.pop()
    claim([run / BEST], cfg.overwrite, flag="--best-by")
    return run


def _base_model(entries) -> tuple[str, str]:
    from balora_diffusion.concept_eval import run_config

    models = {(c.get("base_model") or "", c.get("base_config") or "")
              for c in (run_config(e.run) for e in entries if e.run)}
    if len(models) > 1:
        raise UserError("the runs were trained on different base models; evaluate them separately or give "
                        "--base-model")
    return models.pop() if models else ("", "")


@dataclass
class Evaluation:
    """What `evaluate` drew and scored: one result per (adapter, fusion coefficient), in order."""
    metrics: list[str]
    entries: list
    adapters: list
    subjects: dict
    models: dict
    results: list[dict] = dataclass_field(default_factory=list)
    rows: list[list] = dataclass_field(default_factory=list)       # each result's images, prompt by prompt
    row_labels: list[str] = dataclass_field(default_factory=list)
    drawn_files: list[tuple[str, object]] = dataclass_field(default_factory=list)
    load_seconds: dict = dataclass_field(default_factory=dict)  # loading each metric model


def evaluate(cfg: EvalConfig, targets: list, prepared=None) -> Evaluation:
    """Draw every adapter of `targets` on its concept's prompts and score the images. `prepared(evaluation)`
    runs once the adapters and concepts are read and the metrics chosen, before any model loads (a caller's
    checks of its own, found out in seconds)."""
    from balora_diffusion.collector import libraries_loading

    with libraries_loading():
        from balora_diffusion import concept_eval, metrics
        from balora_diffusion.checkpoint_scoring import score_images
        from balora_diffusion.commands.generate import check_prompt_windows, load_drawing, read_prompts_file
        from balora_diffusion.formats.fuse import Fused
        from balora_diffusion.formats.read import read_adapter
        from balora_diffusion.generate import fusion_grid

    entries = concept_eval.list_entries(targets)
    adapters = [read_adapter(e.source) for e in entries]  # every file read before any model loads
    prompts = read_prompts_file(Path(cfg.prompts_file)) if cfg.prompts_file else None
    if prompts == []:
        raise UserError(f"the prompts file {cfg.prompts_file} holds no prompt")
    subjects, of_entry = {}, []
    for entry, adapter in zip(entries, adapters):
        key = (cfg.concept or str(entry.run), tuple(adapter.tokens))
        if key not in subjects:
            subjects[key] = concept_eval.load_subject(entry, adapter.tokens, concept_dir=cfg.concept, prompts=prompts,
                                                      class_word=cfg.class_word)
        of_entry.append(subjects[key])
    chosen = chosen_metrics(cfg, subjects.values())
    for subject in subjects.values():
        _check_subject(subject, chosen)
    done = Evaluation(chosen, entries, adapters, subjects, {})
    if prepared:
        prepared(done)
    base_model, base_config = _base_model(entries)

    loaders = {"clip": (lambda: metrics.load_clip(cfg.clip)) if {"clip-t", "clip-i"} & set(chosen) else None,
               "dino": (lambda: metrics.load_dino(cfg.dino)) if "dino" in chosen else None}
    for name, load in loaders.items():  # before the base model: a missing metric model is found out in seconds
        if load:
            tick = time.perf_counter()
            done.models[name] = load()
            done.load_seconds[name] = time.perf_counter() - tick
    pipe, call = load_drawing(cfg, base_model, base_config)
    for loaded in done.models.values():
        loaded.model.to(pipe.device)

    for entry, adapter, subject in zip(entries, adapters, of_entry):
        tick = time.perf_counter()
        with Fused(pipe, [(adapter, 1.0)]) as fused:
            check_prompt_windows(pipe.tokenizer, subject.prompts, fused.tokens)
            drawn = fusion_grid(pipe, fused, subject.prompts, cfg.seeds, cfg.fusion, **call)
        draw_seconds = (time.perf_counter() - tick) / len(cfg.fusion)
        for fusion, images in zip(cfg.fusion, drawn):
            flat = [image for row in images for image in row]
            flat_prompts = [p for p in subject.prompts for _ in cfg.seeds]
            seconds = {}
            scores = score_images(flat, flat_prompts, subject, chosen, done.models, seconds)
            files = [f"images/a{len(done.rows):03d}-w{fusion:g}-p{i:02d}-s{seed}.png"
                     for i in range(len(subject.prompts)) for seed in cfg.seeds]
            done.drawn_files.extend(zip(files, flat))
            done.results.append({"label": entry.label, "source": str(entry.source), "step": entry.step,
                                 "fusion": fusion, "concept": str(subject.folder), **scores, "images": files,
                                 "seconds": {"draw": draw_seconds, **seconds}})
            done.rows.append(flat)
            done.row_labels.append(f"{entry.label} w={fusion:g}")
    return done


def clip_note(source: str) -> str:
    """Which CLIP scored, said on the output: the world CLIP's scores mean something only in the toy world."""
    if Path(source) == paths.WORLD_CLIP:
        return (f"CLIP: the shipped world CLIP ({source}), which knows only the toy world; for a real concept give "
                "--clip openai/clip-vit-large-patch14")
    return f"CLIP: {source}"


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    out = Path(cfg.out)
    check_record_folder(out, EVAL_RECORD, cfg.overwrite)

    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.collector import libraries_loading

    with libraries_loading():
        from balora_diffusion.checkpoint_scoring import write_best
        from balora_diffusion.generate import image_grid, save_image
        from balora_diffusion.train import library_versions

    best_run = None

    def claim_best(evaluation: Evaluation) -> None:
        nonlocal best_run
        best_run = _best_run(cfg, evaluation.metrics, evaluation.entries)

    done = evaluate(cfg, args.target, prepared=claim_best)
    results, rows, row_labels, subjects = done.results, done.rows, done.row_labels, done.subjects

    best = None
    if best_run:
        top = max(cfg.fusion)
        candidates = [(r, a) for r, a in zip(results, [a for a in done.adapters for _ in cfg.fusion])
                      if r["fusion"] == top]
        best_result, best_adapter = max(candidates, key=lambda ra: (ra[0][cfg.best_by] is not None,
                                                                    ra[0][cfg.best_by] or 0.0))
        write_best(best_run, best_adapter, {"by": cfg.best_by, "fusion": top, **best_result})
        best = {"by": cfg.best_by, "fusion": top, "label": best_result["label"], "step": best_result["step"],
                "folder": str(best_run / BEST)}

    first = next(iter(subjects.values()))
    columns = [f"{p} / seed {s}" for p in first.prompts for s in cfg.seeds]
    for subject in subjects.values():
        rows.insert(0, subject.images)
        row_labels.insert(0, f"reference: {subject.folder.name}")
    # reference rows may be longer than the prompts x seeds: their extra columns go unlabelled
    columns += [""] * (max(len(r) for r in rows) - len(columns))
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        for name, image in done.drawn_files:
            save_image(tmp / name, image)
        save_image(tmp / GRID, image_grid(rows, row_labels, columns if len(subjects) == 1 else None,
                                                title=f"{', '.join(done.metrics)}; {cfg.scheduler} {cfg.steps} steps, "
                                                      f"guidance {cfg.guidance:g}"))
        write_json_atomic(tmp / EVAL_RECORD, {
            "settings": {**asdict(cfg), "metrics": done.metrics}, "targets": [str(t) for t in args.target],
            "subjects": [{"concept": str(s.folder), "references": [str(p) for p in s.references],
                          "reference_note": s.reference_note, "prompts": s.prompts,
                          "clip_texts": [s.clip_text(p) for p in s.prompts], "class_word": s.class_word}
                         for s in subjects.values()],
            "models": {name: loaded.source for name, loaded in done.models.items()},
            "results": results, "best": best, "versions": library_versions()})

    print(table(results, done.metrics))
    for subject in subjects.values():
        print(f"references of {subject.folder}: {subject.reference_note}")
    if "clip" in done.models:
        print(clip_note(done.models["clip"].source))
    if best:
        print(f"best by {best['by']} at w={best['fusion']:g}: {best['label']}, exported to {best['folder']}")
    print(f"{EVAL_RECORD} and {GRID} in {out}")
    return 0
