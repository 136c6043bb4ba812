"""Pixel scores of a trained run folder on its concept: fidelity and prompt adherence per fusion
coefficient, over the concept's evaluation prompts and contexts it never appeared in.

The adapter is loaded into a fresh pipeline, as a user loading the files would; every image of a
cell is drawn from the same seeds, so two cells' images differ only by their adapters.
"""
from __future__ import annotations

from pathlib import Path

from balora_diffusion import scoring
from balora_diffusion.concept import Concept, fidelity, load_concept
from balora_diffusion.data import read_concept_folder
from balora_diffusion.run_layout import CELL_SAMPLE, CELL_SCORED_IMAGES


def concept_prompts(concept: Concept, unseen: int) -> tuple[list[tuple[str, str, scoring.Context]], scoring.Calibration]:
    """The prompts to score, as (prompt, "unseen" | "eval", context): `unseen` contexts that neither
    the training captions nor the evaluation prompts name, then the evaluation prompts; and the
    calibration of sizes and positions on the training images."""
    examples = read_concept_folder(concept.path, [concept.token], concept.caption_template)
    seen = [scoring.parse_context(text) for text in [e.caption for e in examples] + list(concept.eval_prompts)]
    rows = [(c.prompt(concept.token), "unseen", c) for c in scoring.unseen_contexts(seen, unseen)]
    rows += [(p, "eval", scoring.parse_context(p)) for p in concept.eval_prompts]
    return rows, scoring.calibrate((e.image, e.caption) for e in examples)


def summarise_checks(kinds: list[str], checks: list[dict[str, bool]]) -> dict:
    """Adherence overall, per prompt kind and per attribute (the share of images that show it)."""
    summary = {"all": scoring.adherence_score(checks)}
    for kind in ("unseen", "eval"):
        summary[kind] = scoring.adherence_score([c for k, c in zip(kinds, checks) if k == kind])
    for attribute in scoring.ATTRIBUTES:
        shown = [c[attribute] for c in checks if attribute in c]
        summary[attribute] = sum(shown) / len(shown) if shown else None
    return summary


def score_cell(out: Path, values: dict, settings: dict) -> dict:
    """The scores of the adapter in `out` (a run folder trained with TrainConfig `values`) that `settings`
    asks for (experiments.sweep.scoring_settings): with a concept, {"fidelity": {w: mean}, "adherence": {w:
    summarise_checks(...)}}; with metrics, {metric: {w: score}} by checkpoint_scoring, as balora eval
    scores the run."""
    scores = _pixel_scores(out, values, settings) if settings["concept"] else {}
    if settings.get("metrics"):
        scores.update(_metric_scores(out, values, settings, sample=not settings["concept"]))
    return scores


def _metric_scores(out: Path, values: dict, settings: dict, sample: bool) -> dict:
    """{metric: {w: score}} over the concept's evaluation prompts (its captions in new contexts); with
    `sample`, the grid's image of the cell from the first prompt, top fusion, first seed."""
    from balora_diffusion.checkpoint_scoring import AdapterScorer, load_models
    from balora_diffusion.commands.generate import DrawConfig
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.generate import save_image

    wanted = settings["metrics"]
    models = load_models(wanted["names"], wanted.get("clip", ""), wanted.get("dino", ""))
    draw = DrawConfig(seeds=settings["seeds"], fusion=sorted(settings["fusions"]), steps=settings["sample_steps"],
                      guidance=settings["guidance_scale"], cpu_threads=values.get("cpu_threads", 0))
    scorer = AdapterScorer.for_run(out, list(values.get("token") or []), wanted["names"], models, draw,
                                   values.get("base_model", ""), values.get("base_config", ""))
    by_fusion = scorer.score(read_adapter(out))
    if sample:
        save_image(out / CELL_SAMPLE, scorer.drawn[-1][0][0])
    return {metric: {w: scores[metric] for w, scores in by_fusion.items()} for metric in wanted["names"]}


def _pixel_scores(out: Path, values: dict, settings: dict) -> dict:
    """{"fidelity": {w: mean}, "adherence": {w: summarise_checks(...)}} of the adapter in `out`;
    settings: concept (folder), fusions, seeds, unseen, sample_steps, guidance_scale."""
    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.generate import generate, save_image, write_grid
    from balora_diffusion.models import load_pipeline

    concept = load_concept(settings["concept"])
    rows, calibration = concept_prompts(concept, settings["unseen"])
    pipe = load_pipeline(values.get("base_model") or None,
                         single_file_config=values.get("base_config") or None)
    fused = Fused(pipe, [(read_adapter(out), 1.0)])
    prompts, kinds = [p for p, _, _ in rows], [k for _, k, _ in rows]
    seeds = settings["seeds"]
    fid, adh, grid = {}, {}, [[] for _ in rows]
    for w in settings["fusions"]:
        fused.set_fusion(w)
        images = generate(pipe, prompts, seeds, steps=settings["sample_steps"],
                          guidance_scale=settings["guidance_scale"], progress=False)
        flat = [(kind, context, image) for (_, kind, context), row in zip(rows, images) for image in row]
        fid[f"{w:g}"] = sum(fidelity(image, concept) for _, _, image in flat) / len(flat)
        adh[f"{w:g}"] = summarise_checks([k for k, _, _ in flat],
                                         [scoring.adherence(image, c, calibration) for _, c, image in flat])
        for row, drawn in zip(grid, images):
            row.extend(drawn)
    save_image(out / CELL_SAMPLE, grid[0][-len(seeds)])
    write_grid(out / CELL_SCORED_IMAGES, grid, row_labels=[f"{'* ' if k == 'unseen' else ''}{p}" for p, k in zip(prompts, kinds)],
               col_labels=[f"w={w:g} seed {s}" for w in settings["fusions"] for s in seeds],
               title="images scored for fidelity and adherence; * = a context the concept never appeared in")
    return {"fidelity": fid, "adherence": adh}
