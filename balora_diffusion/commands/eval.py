"""`balora eval`: CLIP-T, CLIP-I, DINO (and the world's pixel fidelity) of every adapter a run, a sweep
or a list of adapter files holds, drawn with the same prompts and seeds; a table, eval.json, a labelled
grid, and with --best-by the best checkpoint of a run exported in every format into RUN/best/."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from balora_diffusion.commands.generate import DrawConfig
from balora_diffusion.config import add_config_arguments, config_from_args, field
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import check_record_folder, claim
from balora_diffusion.runfolder import BEST

METRICS = ["clip-t", "clip-i", "dino", "fidelity"]


@dataclass
class EvalConfig(DrawConfig):
    metrics: list[str] = field(["clip-t", "clip-i", "dino"], "clip-t (prompt-image agreement), clip-i and dino "
                                                             "(likeness to the reference images), fidelity (the toy "
                                                             "world's pixel score; needs concept.toml)",
                               nonempty=True, choices=METRICS)
    clip: str = field("openai/clip-vit-large-patch14", "CLIP model: a folder or a hub id in the local cache")
    dino: str = field("facebook/dinov2-small", "DINO / DINOv2 model: a folder or a hub id in the local cache")
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
                     "--fusion 0.7 1 --out runs/dog-eval --best-by clip-i")
    add_config_arguments(parser, EvalConfig)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: list[dict], metrics: list[str]) -> str:
    width = max(len("adapter"), *(len(r["label"]) for r in results))
    lines = [f"{'adapter'.ljust(width)}  {'w':>4}  " + "  ".join(f"{m:>8}" for m in metrics)]
    for r in results:
        lines.append(f"{r['label'].ljust(width)}  {r['fusion']:>4g}  " + "  ".join(f"{_fmt(r[m]):>8}" for m in metrics))
    return "\n".join(lines)


def _score(images, prompts, subject, metrics, models) -> dict:
    from balora_diffusion import metrics as m
    from balora_diffusion.concept import fidelity_batch

    scores = {}
    if "clip-t" in metrics:
        scores["clip-t"] = m.clip_t(models["clip"], images, [subject.clip_text(p) for p in prompts])
    if "clip-i" in metrics:
        scores["clip-i"] = m.clip_i(models["clip"], images, subject.images)
    if "dino" in metrics:
        scores["dino"] = m.dino(models["dino"], images, subject.images)
    if "fidelity" in metrics:
        scores["fidelity"] = fidelity_batch(images, subject.concept)
    return scores


def _check_subject(subject, metrics: list[str]) -> None:
    if "fidelity" in metrics and subject.concept is None:
        raise UserError(f"--metrics fidelity needs a concept.toml in {subject.folder} (its colours)")
    if "clip-t" in metrics and not subject.class_word:
        raise UserError(f"no class word for {subject.folder}: give --class-word WORD (what the concept is, e.g. dog)")


def _best_run(cfg: EvalConfig, entries) -> Path | None:
    if not cfg.best_by:
        return None
    if cfg.best_by not in cfg.metrics:
        raise UserError(f"--best-by {cfg.best_by} is not among --metrics {' '.join(cfg.metrics)}")
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


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    out = Path(cfg.out)
    check_record_folder(out, "eval.json", cfg.overwrite)

    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.collector import libraries_loading

    with libraries_loading():
        from balora_diffusion import concept_eval, metrics
        from balora_diffusion.commands.generate import check_prompt_windows, load_drawing, read_prompts_file
        from balora_diffusion.formats.fuse import Fused
        from balora_diffusion.formats.read import read_adapter
        from balora_diffusion.formats.run_files import write_run_adapters
        from balora_diffusion.generate import fusion_grid, image_grid, save_image
        from balora_diffusion.train import library_versions

    entries = concept_eval.list_entries(args.target)
    best_run = _best_run(cfg, entries)
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
            _check_subject(subjects[key], cfg.metrics)
        of_entry.append(subjects[key])
    base_model, base_config = _base_model(entries)

    models = {}  # before the base model: a missing metric model is found out in seconds
    if {"clip-t", "clip-i"} & set(cfg.metrics):
        models["clip"] = metrics.load_clip(cfg.clip)
    if "dino" in cfg.metrics:
        models["dino"] = metrics.load_dino(cfg.dino)
    pipe, call = load_drawing(cfg, base_model, base_config)
    for loaded in models.values():
        loaded.model.to(pipe.device)

    results, rows, row_labels, drawn_files = [], [], [], []
    for entry, adapter, subject in zip(entries, adapters, of_entry):
        with Fused(pipe, [(adapter, 1.0)]) as fused:
            check_prompt_windows(pipe.tokenizer, subject.prompts, fused.tokens)
            drawn = fusion_grid(pipe, fused, subject.prompts, cfg.seeds, cfg.fusion, **call)
        for fusion, images in zip(cfg.fusion, drawn):
            flat = [image for row in images for image in row]
            flat_prompts = [p for p in subject.prompts for _ in cfg.seeds]
            scores = _score(flat, flat_prompts, subject, cfg.metrics, models)
            files = [f"images/a{len(rows):03d}-w{fusion:g}-p{i:02d}-s{seed}.png"
                     for i in range(len(subject.prompts)) for seed in cfg.seeds]
            drawn_files.extend(zip(files, flat))
            results.append({"label": entry.label, "source": str(entry.source), "step": entry.step, "fusion": fusion,
                            "concept": str(subject.folder), **{m: scores.get(m) for m in cfg.metrics},
                            "images": files})
            rows.append(flat)
            row_labels.append(f"{entry.label} w={fusion:g}")

    best = None
    if best_run:
        top = max(cfg.fusion)
        candidates = [(r, a) for r, a in zip(results, [a for a in adapters for _ in cfg.fusion]) if r["fusion"] == top]
        best_result, best_adapter = max(candidates, key=lambda ra: ra[0][cfg.best_by])
        with atomic_path(best_run / BEST) as tmp:
            tmp.mkdir(parents=True)
            write_run_adapters(tmp, best_adapter)
            write_json_atomic(tmp / "best.json", {"by": cfg.best_by, "fusion": top, **best_result})
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
        for name, image in drawn_files:
            save_image(tmp / name, image)
        save_image(tmp / "grid.png", image_grid(rows, row_labels, columns if len(subjects) == 1 else None,
                                                title=f"{', '.join(cfg.metrics)}; {cfg.scheduler} {cfg.steps} steps, "
                                                      f"guidance {cfg.guidance:g}"))
        write_json_atomic(tmp / "eval.json", {
            "settings": asdict(cfg), "targets": [str(t) for t in args.target],
            "subjects": [{"concept": str(s.folder), "references": [str(p) for p in s.references],
                          "reference_note": s.reference_note, "prompts": s.prompts,
                          "clip_texts": [s.clip_text(p) for p in s.prompts], "class_word": s.class_word}
                         for s in subjects.values()],
            "models": {name: loaded.source for name, loaded in models.items()},
            "results": results, "best": best, "versions": library_versions()})

    print(table(results, cfg.metrics))
    for subject in subjects.values():
        print(f"references of {subject.folder}: {subject.reference_note}")
    if best:
        print(f"best by {best['by']} at w={best['fusion']:g}: {best['label']}, exported to {best['folder']}")
    print(f"eval.json and grid.png in {out}")
    return 0
