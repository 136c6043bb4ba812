"""`balora bench photos`: do the options for your own photos do what they are for, on the shipped world?

Three questions, each a pair of arms trained with the demo config (training/configs/demo.toml) on
the same seeds, the arms differing in that option alone:

1. masked loss: <zorb> with its masks (assets/concepts/zorb-masks, copied beside the images) against
   the whole image. Background bleed is how far the border colour of an image drawn for an eval
   prompt ("a large <zorb> on a blue background") lies from the colour the prompt asks (RGB
   distance, 0-441); fidelity is concept.fidelity; both at fusion 0.7 and 1.
2. prior preservation ("a heart"): how far the adapter, fused at 1, moves the base model's images of
   prompts without the token (world captions and the class prompt itself, the same sampling seeds):
   mean absolute pixel difference (0-255) and the share of images whose world.classify reading
   (background, object colour, shape) changes; and its fidelity cost.
3. aspect-ratio buckets against the centred square crop, on zorb-edge (the heart near an edge of
   wide and tall photos): the share of the subject inside each image's training view (computed
   from the views the trainer draws) and fidelity on eval prompts that place the heart.

Each verdict counts paired comparisons (same seed, same fusion coefficient): the option "holds"
where it is better in every pair, "does not hold" in none, "mixed" otherwise.

4. per-step cost: plain training, the masked loss and prior preservation (the arms of 1 and 2) each
   trained again for a few steps by `balora train`'s own loop, in rounds that rotate the order so a
   drift of the machine hits all three alike; the trainer's training_steps_per_second (steps alone,
   without loading, evals or checkpoints) of every run, and the load average around it.

Outputs in --out: cells/ (one `balora train` run folder per arm and seed; a rerun keeps finished
cells), cost/ (the timing runs, redone by every run of the command), zorb-masked/ (the masked arm's
data), photos.json, photos.md, photos.png; --page FILE writes the page (its figure beside it) there too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from balora_diffusion import paths, scoring, world
from balora_diffusion.atomic import atomic_path, write_json_atomic
from balora_diffusion.concept import Concept, fidelity, load_concept
from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import CELLS, RUN

EDGE_CONCEPT = paths.CONCEPTS / "zorb-edge"
PRIOR_PROMPT = "a heart"
FUSIONS = (0.7, 1.0)
EDGE_BUCKETS = {"crop": ["off"], "buckets": ["auto"]}
# arm -> (question, the arm it is compared with or None for a reference arm, --set options)
ARMS = {
    "whole": ("masked", None, []),
    "masked": ("masked", "whole", ["masked_loss=true"]),
    "prior": ("prior", "whole", [f"prior_prompt={PRIOR_PROMPT}"]),
    "crop": ("buckets", None, [f"data_dir={EDGE_CONCEPT}", f"buckets={' '.join(EDGE_BUCKETS['crop'])}"]),
    "buckets": ("buckets", "crop", [f"data_dir={EDGE_CONCEPT}", f"buckets={' '.join(EDGE_BUCKETS['buckets'])}"]),
}
QUESTIONS = {
    "masked": "Does the masked loss keep the training images' backgrounds out of the concept (less background bleed)?",
    "prior": "Does prior preservation keep the base model's images of prompts without the token (less drift on the "
             "class prompt and on world prompts)?",
    "buckets": "Do aspect-ratio buckets learn the concept better than the centred square crop on wide and tall photos "
               "with the subject near an edge (higher fidelity)?",
}
# the metric each verdict is decided on, and whether lower is better
DECIDING = {"masked": ("bleed", True), "prior": ("drift", True), "buckets": ("fidelity", False)}


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]          # training seeds, one cell per arm and seed
    steps: int
    sample_steps: int               # of every scored image
    score_seeds: tuple[int, ...]    # sampling seeds of every scored image
    drift_prompts: int              # world captions without the token (the class prompt comes on top)
    workers: int
    cost_steps: int                 # steps of each timing run
    cost_rounds: int                # rounds of one timing run per cost arm


FULL = Plan(seeds=(0, 1, 2), steps=300, sample_steps=10, score_seeds=(1, 2), drift_prompts=8, workers=2,
            cost_steps=40, cost_rounds=3)
QUICK = Plan(seeds=(0,), steps=2, sample_steps=2, score_seeds=(1,), drift_prompts=2, workers=1, cost_steps=2,
             cost_rounds=1)
# plain training and the two options whose loss costs more per step; buckets change no step's work
COST_ARMS = ("whole", "masked", "prior")


def masked_folder(out: Path) -> Path:
    """The demo concept with its masks beside the images (the folder trains unchanged without them)."""
    folder = out / "zorb-masked"
    if not folder.is_dir():
        with atomic_path(folder) as tmp:
            shutil.copytree(paths.DEMO_CONCEPT, tmp)
            for mask in sorted(paths.DEMO_MASKS.glob("*.mask.png")):
                shutil.copy(mask, tmp / mask.name)
    return folder


def sweep_configs(plan: Plan, out: Path, base_model: str | None) -> dict[str, object]:
    """arm -> the `balora sweep` of the demo config that trains its cells."""
    from balora_diffusion.experiments.sweep import SweepConfig

    common = [f"data_dir={paths.DEMO_CONCEPT}", f"steps={plan.steps}", f"eval_every={max(1, plan.steps // 3)}",
              f"checkpoint_every={plan.steps}", "grid_seeds=1", "fusion=1", f"sample_steps={plan.sample_steps}"]
    if base_model:
        common.append(f"base_model={base_model}")
    configs = {}
    for arm, (_, _, sets) in ARMS.items():
        data = [f"data_dir={masked_folder(out)}"] if arm == "masked" else []
        configs[arm] = SweepConfig(config="demo", methods=["balora"], lrs=["1"], seeds=list(plan.seeds),
                                   set=[*common, *data, *sets], out=str(out / CELLS / arm), workers=plan.workers,
                                   score=False)
    return configs


def time_steps(configs: dict, plan: Plan, out: Path) -> dict:
    """Each cost arm's first cell trained again for plan.cost_steps steps into cost/, plan.cost_rounds
    times in a rotating order: per arm the trainer's own training_steps_per_second of every run, with
    the load average before and after it (a busy machine slows a step; the rotation spreads that)."""
    import json
    from dataclasses import replace

    from balora_diffusion.experiments.sweep import expand
    from balora_diffusion.train import train
    from balora_diffusion.train_config import TrainConfig

    base = {arm: expand(configs[arm])[0].values for arm in COST_ARMS}
    runs: dict[str, list[dict]] = {arm: [] for arm in COST_ARMS}
    for r in range(plan.cost_rounds):
        for arm in COST_ARMS[r % len(COST_ARMS):] + COST_ARMS[:r % len(COST_ARMS)]:
            cfg = replace(TrainConfig(**base[arm]), steps=plan.cost_steps, eval_every=plan.cost_steps,
                          checkpoint_every=plan.cost_steps, output_dir=str(out / "cost" / f"{arm}-r{r}"),
                          overwrite=True)
            before = os.getloadavg()[0]
            folder = train(cfg)
            run = json.loads((folder / RUN).read_text(encoding="utf-8"))
            runs[arm].append({"round": r, "steps_per_second": run["training_steps_per_second"],
                              "threads": run["cpu_threads"], "load_average": [round(before, 2),
                                                                              round(os.getloadavg()[0], 2)]})
    plain = _mean(x["steps_per_second"] for x in runs["whole"])
    return {"steps": plan.cost_steps, "rounds": plan.cost_rounds, "runs": runs,
            "arms": {arm: {"steps_per_second": _mean(x["steps_per_second"] for x in rows),
                           "seconds_per_step_ratio": plain / _mean(x["steps_per_second"] for x in rows)}
                     for arm, rows in runs.items()}}


def drift_prompts(n: int) -> list[str]:
    """The class prompt and `n` world captions, a fixed pick spread over the world's scenes."""
    from balora_diffusion.bench.base_model import pick

    return [PRIOR_PROMPT, *(scene.caption() for scene in pick(world.all_scenes(), n))]


def bleed(image, prompt: str) -> float:
    """RGB distance of the image's border (its background) from the background `prompt` asks for."""
    asked = world.BACKGROUNDS[scoring.parse_context(prompt).background]
    return float(np.linalg.norm(world.border_colour(world.as_pixels(image)) - np.asarray(asked, np.float64)))


def reading_changed(image, base) -> bool:
    """Does world.classify read another background, object colour or shape than in the base image?"""
    a, b = world.classify(image), world.classify(base)
    return any(a[key] != b[key] for key in ("background", "object", "shape"))


def subject_kept(folder: Path, buckets: list[str], resolution: int, step: int) -> list[float]:
    """Per image of `folder`, the share of its subject (pixels far from its border colour) inside the
    view the trainer draws with `buckets` (the demo config's centred, unflipped view)."""
    import torch

    from balora_diffusion.buckets import choose_buckets
    from balora_diffusion.data import ConceptData, draw_view, read_concept_folder

    concept = load_concept(folder)
    examples = read_concept_folder(folder, [concept.token], concept.caption_template)
    data = ConceptData(examples, resolution=resolution, buckets=choose_buckets(buckets, resolution, step))
    shares = []
    for example, size in zip(examples, data.sizes):
        view = draw_view(example.image.size, size, torch.Generator(), False, False)
        pixels = world.as_pixels(example.image.resize(view.resized))
        subject = np.linalg.norm(pixels - world.border_colour(pixels), axis=-1) > world.OBJECT_DISTANCE
        left, top, right, bottom = view.box
        shares.append(float(subject[top:bottom, left:right].sum() / subject.sum()))
    return shares


class Scorer:
    """Draws on one pipeline, every adapter with the same prompts and sampling seeds."""

    def __init__(self, pipe, plan: Plan):
        self.pipe, self.plan = pipe, plan
        self.drift = drift_prompts(plan.drift_prompts)
        self.base = self.draw(self.drift)

    def draw(self, prompts: list[str]) -> list:
        from balora_diffusion.generate import generate

        rows = generate(self.pipe, prompts, list(self.plan.score_seeds), steps=self.plan.sample_steps, progress=False)
        return [image for row in rows for image in row]

    def score(self, adapter, concept: Concept, drift: bool) -> tuple[dict, list]:
        """Fidelity, bleed (and with `drift`, drift at fusion 1) of `adapter`; its images at fusion 1."""
        from balora_diffusion.formats.fuse import Fused

        prompts = [p for p in concept.eval_prompts for _ in self.plan.score_seeds]
        scores: dict = {"fidelity": {}, "bleed": {}, "position": {}}
        with Fused(self.pipe, [(adapter, 1.0)]) as fused:
            for w in FUSIONS:
                fused.set_fusion(w)
                images = self.draw(list(concept.eval_prompts))
                scores["fidelity"][f"{w:g}"] = _mean(fidelity(image, concept) for image in images)
                scores["bleed"][f"{w:g}"] = _mean(bleed(image, p) for image, p in zip(images, prompts))
                checks = [scoring.adherence(image, scoring.Context(position=scoring.parse_context(p).position),
                                            scoring.Calibration()) for image, p in zip(images, prompts)]
                scores["position"][f"{w:g}"] = scoring.adherence_score(checks)
            if drift:
                moved = self.draw(self.drift)
                n = len(self.plan.score_seeds)
                diffs = [float(np.abs(world.as_pixels(a) - world.as_pixels(b)).mean())
                         for a, b in zip(moved, self.base)]
                scores.update(drift=_mean(diffs[n:]), class_drift=_mean(diffs[:n]),
                              changed=_mean(reading_changed(a, b) for a, b in zip(moved[n:], self.base[n:])))
        return scores, images


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _pairs(rows: list[dict], question: str) -> list[tuple[str, float, float]]:
    """(label, option's value, reference's value) of the deciding metric, per seed and fusion."""
    metric, _ = DECIDING[question]
    option = next(arm for arm, (q, ref, _) in ARMS.items() if q == question and ref is not None)
    reference = ARMS[option][1]
    by = {(r["arm"], r["seed"]): r["scores"] for r in rows}
    pairs = []
    for seed in sorted({r["seed"] for r in rows}):
        a, b = by.get((option, seed)), by.get((reference, seed))
        if a is None or b is None:
            continue
        if metric == "drift":  # the class prompt, which the prior trains on, and prompts it never sees
            pairs += [(f"seed {seed} {key}", a[key], b[key]) for key in ("class_drift", "drift")]
        else:
            pairs += [(f"seed {seed} w={w}", a[metric][w], b[metric][w]) for w in a[metric]]
    return [p for p in pairs if p[1] is not None and p[2] is not None]


def verdict(rows: list[dict], question: str) -> dict:
    lower = DECIDING[question][1]
    pairs = _pairs(rows, question)
    wins = sum((a < b) if lower else (a > b) for _, a, b in pairs)
    answer = ("not measurable" if not pairs else "holds" if wins == len(pairs)
              else "does not hold" if wins == 0 else "mixed")
    return {"question": QUESTIONS[question], "metric": DECIDING[question][0], "lower_is_better": lower,
            "wins": wins, "pairs": len(pairs), "answer": answer}


def summary(rows: list[dict]) -> dict[str, dict]:
    """arm -> metric -> {"mean", "spread" (max - min over seeds)}; per fusion for the per-fusion metrics."""
    out = {}
    for arm in ARMS:
        scores = [r["scores"] for r in rows if r["arm"] == arm]
        if not scores:
            continue
        table = {}
        for key, first in scores[0].items():
            names = [f"{key} w={w}" for w in first] if isinstance(first, dict) else [key]
            for name in names:
                values = [s[key][name.split("w=")[1]] if isinstance(first, dict) else s[key] for s in scores]
                values = [v for v in values if v is not None]
                table[name] = {"mean": _mean(values), "spread": float(max(values) - min(values)) if values else None}
        out[arm] = table
    return out


def run_bench(plan: Plan, out: Path, base_model: str | None, command: str) -> dict:
    from balora_diffusion.experiments.cell import cell_result
    from balora_diffusion.experiments.sweep import check_sweep_folder, expand, run_cells
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.models import load_pipeline
    from balora_diffusion.threads import use_cpu_threads
    from balora_diffusion.train import resolution_step

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    configs = sweep_configs(plan, out, base_model)
    per_arm = {arm: expand(config) for arm, config in configs.items()}
    for arm, cells in per_arm.items():
        check_sweep_folder(Path(configs[arm].out), cells)
    cells = [c for arm_cells in per_arm.values() for c in arm_cells]
    trained = sum(cell_result(Path(c.values["output_dir"])) is None for c in cells)
    records = run_cells(configs["whole"], cells, None)
    failed = [c.values["output_dir"] for c, r in zip(cells, records) if r is None or r["status"] != "done"]
    if failed:
        raise UserError(f"the trainings of {', '.join(failed)} did not finish; see their cell.log")
    training_seconds = time.perf_counter() - started
    seconds = {c.values["output_dir"]: r["training_seconds"] for c, r in zip(cells, records)}
    cost = time_steps(configs, plan, out)
    pipe = load_pipeline(base_model, device="cpu")
    use_cpu_threads(0, [pipe.unet, pipe.text_encoder, pipe.vae])
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    scorer = Scorer(pipe, plan)
    concepts = {"demo": load_concept(paths.DEMO_CONCEPT), "edge": load_concept(EDGE_CONCEPT)}
    rows, figure = [], []
    for arm, arm_cells in per_arm.items():
        question = ARMS[arm][0]
        concept = concepts["edge" if question == "buckets" else "demo"]
        for cell in arm_cells:
            scores, images = scorer.score(read_adapter(Path(cell.values["output_dir"])), concept,
                                          drift=arm in ("whole", "prior"))
            rows.append({"arm": arm, "seed": cell.labels["seed"], "scores": {**scores, "train_s": seconds[cell.values["output_dir"]]}})
            if cell is arm_cells[0]:
                figure.append((f"{arm} s{cell.labels['seed']}", images[::len(plan.score_seeds)]))
    kept = {arm: subject_kept(EDGE_CONCEPT, option, resolution, resolution_step(pipe))
            for arm, option in EDGE_BUCKETS.items()}
    result = {"plan": asdict(plan), "command": command, "base_model": base_model or "the shipped tiny model",
              "resolution": resolution, "rows": rows, "summary": summary(rows),
              "verdicts": {q: verdict(rows, q) for q in QUESTIONS}, "subject_kept": kept, "cost": cost,
              "drift_prompts": scorer.drift, "training_seconds": round(training_seconds, 1),
              "cells": len(cells), "trained_cells": trained,
              "cell_seconds": round(sum(r["wall_seconds"] for r in records), 1),
              "wall_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
              "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    write_json_atomic(out / "photos.json", result)
    _grid(out / "photos.png", figure, concepts)
    with atomic_path(out / "photos.md") as tmp:
        tmp.write_text(page(result, "photos.png"), encoding="utf-8")
    return result


def _grid(path: Path, figure: list, concepts: dict[str, Concept]) -> None:
    from balora_diffusion.generate import write_grid

    cols = [f"prompt {i + 1}" for i in range(len(concepts["demo"].eval_prompts))]
    write_grid(path, [images for _, images in figure], [label for label, _ in figure], cols, cell=64,
               title="each arm's first training and sampling seed at fusion 1 on its concept's eval prompts (zorb "
                     "for whole, masked and prior; zorb-edge for crop and buckets)")


# a cell's training time (run.json "seconds"), in every question's table: what the option costs
TRAIN_SECONDS = ("train_s", "training s", ".0f")


def _fmt(stat: dict | None, spec: str) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    return f"{stat['mean']:{spec}} ± {stat['spread'] / 2:{spec}}" if stat["spread"] else f"{stat['mean']:{spec}}"


def _table(result: dict, arms: list[str], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| arm | " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for arm in arms:
        row = result["summary"].get(arm, {})
        lines.append(f"| {arm} | " + " | ".join(_fmt(row.get(key), spec) for key, _, spec in columns) + " |")
    return lines


def _not_better(result: dict, option: str, reference: str, columns: list[tuple[str, str, str]],
                lower: set[str]) -> str:
    """The columns where `option`'s mean is no better than `reference`'s."""
    a, b = result["summary"].get(option, {}), result["summary"].get(reference, {})
    worse = []
    for key, title, spec in columns:
        x, y = (a.get(key) or {}).get("mean"), (b.get(key) or {}).get("mean")
        if x is not None and y is not None and ((x >= y) if key.split(" ")[0] in lower else (x <= y)):
            worse.append(f"{title} ({x:{spec}} against {y:{spec}})")
    return "; ".join(worse) if worse else "none of the columns above"


def page(result: dict, figure: str) -> str:
    """The results page of a run of the benchmark."""
    plan, v = result["plan"], result["verdicts"]
    seeds = ", ".join(map(str, plan["seeds"]))
    lines = ["# Your own photos: masked loss, prior preservation, aspect-ratio buckets", "", "Written by:", "",
             f"    {result['command']}", "",
             f"Every arm is `balora train` with the demo config (training/configs/demo.toml: BaLoRA, rank 4) on "
             f"{result['base_model']} at {result['resolution']} px, {plan['steps']} steps (the demo trains 600; fewer "
             f"to keep {len(ARMS) * len(plan['seeds'])} trainings short on 2 CPU cores), training seeds {seeds}; "
             "the arms of "
             f"a question differ in one option only. Every scored image is drawn with {plan['sample_steps']} sampling "
             f"steps and sampling seeds {', '.join(map(str, plan['score_seeds']))}: each concept's 6 eval prompts at "
             f"fusion {' and '.join(f'{w:g}' for w in FUSIONS)}. Tables give the mean over the training seeds ± half "
             f"the range between them; training s is one cell's training time, {plan['workers']} cell(s) training at "
             f"once. This invocation: wall time {result['wall_seconds']:.0f} s, "
             f"{result['training_seconds']:.0f} s of it "
             f"training {result['trained_cells']} of the {result['cells']} cells (a rerun keeps finished cells; the "
             f"cells' own times add up to {result['cell_seconds']:.0f} s), {result['cpu_count']} CPU cores, load "
             f"average {result['load_average'][0]} at the start and {result['load_average'][1]} at the end (the "
             "machine is shared).", "",
             f"A small run: {len(plan['seeds'])} training seed(s), {plan['steps']} steps, a {result['resolution']} px "
             "model (the shipped one knows only flat-coloured shapes), six training images per concept. A verdict "
             "counts paired comparisons (same seed and fusion): **holds** where the "
             "option is better in every pair, **does not hold** in none, **mixed** otherwise; with so few pairs it "
             "says what happened here, not what a photo set will show.", "", "## Verdicts", ""]
    for q in QUESTIONS:
        lines.append(f"- {v[q]['question']} **{v[q]['answer']}** (better {v[q]['metric']} in {v[q]['wins']} of "
                     f"{v[q]['pairs']} pairs)")
    masked_cols = [(f"{m} w={w:g}", f"{title} w={w:g}", spec) for m, title, spec in
                   (("bleed", "background bleed (RGB)", ".1f"), ("fidelity", "fidelity", ".3f")) for w in FUSIONS]
    masked_cols.append(TRAIN_SECONDS)
    lines += ["", "## 1. Masked loss (`--masked-loss true --unmasked-weight 0`) on `<zorb>`", "",
              "Background bleed: RGB distance (0-441) of the drawn border from the background the eval prompt asks "
              "for; lower is better. The masks are assets/concepts/zorb-masks beside the images.", "",
              *_table(result, ["whole", "masked"], masked_cols), "",
              f"Verdict: **{v['masked']['answer']}**. Where the masked loss did not help: "
              f"{_not_better(result, 'masked', 'whole', masked_cols, {'bleed', 'train_s'})}.", ""]
    prior_cols = [("drift", "drift, world prompts (pixels)", ".2f"), ("changed", "classify reading changed", ".2f"),
                  ("class_drift", f"drift, '{PRIOR_PROMPT}' (pixels)", ".2f"),
                  *((f"fidelity w={w:g}", f"fidelity w={w:g}", ".3f") for w in FUSIONS), TRAIN_SECONDS]
    lines += [f"## 2. Prior preservation (`--prior-prompt \"{PRIOR_PROMPT}\"`) on `<zorb>`", "",
              f"Drift: mean absolute pixel difference (0-255) between the base model's images and the adapter's at "
              f"fusion 1, same prompts and seeds, over {plan['drift_prompts']} world prompts without the token "
              f"({'; '.join(result['drift_prompts'][1:])}) and, apart, the class prompt '{PRIOR_PROMPT}'. "
              "Changed: the share of the world prompts' images whose world.classify reading (background, object "
              "colour, shape) differs from the base model's. Lower is better for all three.", "",
              *_table(result, ["whole", "prior"], prior_cols), "",
              f"Verdict: **{v['prior']['answer']}**. Where prior preservation did not help: "
              f"{_not_better(result, 'prior', 'whole', prior_cols, {'drift', 'changed', 'class_drift', 'train_s'})}.",
              ""]
    kept = result["subject_kept"]
    bucket_cols = [(f"{m} w={w:g}", f"{title} w={w:g}", ".3f") for m, title in
                   (("fidelity", "fidelity"), ("position", "position shown")) for w in FUSIONS]
    bucket_cols.append(TRAIN_SECONDS)
    lines += ["## 3. Aspect-ratio buckets (`--buckets auto`) against the centred square crop on zorb-edge", "",
              "zorb-edge: six 192x128 and 128x192 `<zorb>` photos with the heart near an edge (assets/concepts/"
              "zorb-edge, training/make_demo_concept.py). Subject kept: the share of each image's heart inside the "
              "view the trainer trains on (the same for every seed: the demo config crops without randomness and "
              "does not flip). Position shown: the share of images whose heart sits where the prompt places it.", "",
              "| arm | subject kept, mean | subject kept, worst image | images with all of the subject |",
              "|---|---|---|---|"]
    for arm in ("crop", "buckets"):
        lines.append(f"| {arm} | {np.mean(kept[arm]):.2f} | {min(kept[arm]):.2f} | "
                     f"{sum(k >= 0.99 for k in kept[arm])} of {len(kept[arm])} |")
    lines += ["", *_table(result, ["crop", "buckets"], bucket_cols), "",
              f"Verdict: **{v['buckets']['answer']}**. Where the buckets did not help: "
              f"{_not_better(result, 'buckets', 'crop', bucket_cols, {'train_s'})}.", "",
              f"![each arm's images at fusion 1]({figure})", "", *_cost_lines(result["cost"])]
    return "\n".join(lines)


def _cost_lines(cost: dict) -> list[str]:
    rounds = cost["rounds"]
    lines = ["## 4. Per-step cost of the masked loss and of prior preservation", "",
             f"The first seed's whole, masked and prior arms above trained again side by side, {cost['steps']} steps "
             f"each, {rounds} round(s) in a rotating order, one training at a time, on the same machine (outputs in "
             "cost/). Steps/s is `balora train`'s own training_steps_per_second (the steps alone: no loading, "
             "evals, grids or checkpoints); time per step is relative to plain training.", "",
             "| arm | steps/s, mean | time per step vs whole | steps/s per round | load average before -> after |",
             "|---|---|---|---|---|"]
    for arm, stats in cost["arms"].items():
        runs = sorted(cost["runs"][arm], key=lambda x: x["round"])
        lines.append(f"| {arm} | {stats['steps_per_second']:.2f} | {stats['seconds_per_step_ratio']:.2f}x | "
                     + ", ".join(f"{x['steps_per_second']:.2f}" for x in runs) + " | "
                     + ", ".join(f"{x['load_average'][0]} -> {x['load_average'][1]}" for x in runs) + " |")
    lines += ["", "Why: the masked loss multiplies the squared error by the mask at latent resolution and divides by "
              "its weighted area, work of the size of one latent per image, so a step costs what a plain one does. "
              "Prior preservation runs, every step, a second UNet and text-encoder forward on the class prompt "
              "with every adapter switched off (the base model's prediction, no gradients), then the adapted "
              "model's forward and backward on the class prompt as well: about a second step's work inside "
              "each step. A load average above the number of cores means other processes shared them during "
              "that run; compare the arms within a round.", ""]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.outputs import add_overwrite_flag

    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: photos.json, photos.md, photos.png, cells/ (the trainings, resumable) "
                             "and zorb-masked/")
    parser.add_argument("--page", type=Path, default=None,
                        help="also write the results page here (e.g. docs/results/photos.md), its figure beside it")
    parser.add_argument("--base-model", default=None,
                        help="diffusers folder to train and draw on (default: the shipped tiny model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: {QUICK.steps} steps, one seed ({len(ARMS)} trainings)")
    add_overwrite_flag(parser, "an earlier run's photos.json, photos.md and photos.png in --out, and --page")


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.bench.outputs import claim_out, write_page
    from balora_diffusion.models import check_model_dir
    from balora_diffusion.outputs import claim

    if args.base_model is not None:
        check_model_dir(Path(args.base_model))
    claim_out(args, ("photos.json", "photos.md", "photos.png"))
    if args.page is not None:
        claim([args.page, args.page.with_suffix(".png")], args.overwrite, flag="--page")
    command = ("balora bench photos" + (" --quick" if args.quick else "") + f" --out {shlex.quote(str(args.out))}"
               + (f" --base-model {shlex.quote(str(args.base_model))}" if args.base_model else "")
               + (f" --page {shlex.quote(str(args.page))}" if args.page else ""))
    result = run_bench(QUICK if args.quick else FULL, args.out, args.base_model, command)
    if args.page is not None:
        write_page(args.page, args.out / "photos.png", lambda figure: page(result, figure))
    for v in result["verdicts"].values():
        print(f"{v['question']} {v['answer']} ({v['wins']} of {v['pairs']})")
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {args.out / 'photos.md'}"
          + (f" and {args.page}" if args.page else ""))
    return 0
