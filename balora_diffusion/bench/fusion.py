"""`balora bench fusion`: the two shipped concepts (<zorb>, <quax>) trained with each of several
update rules, each pair fused into one adapter by sum and by gradient fusion, scored from pixels.

Per rule and seed, for each concept in each fused adapter:
- retention: its fidelity through its own token in the fused adapter over its fidelity with its
  own adapter (concept.fidelity on its eval prompts, the same sampling seeds);
- bleed: the other concept's colours in its images (the other concept's fidelity score of them),
  beside the same number for its own adapter;
- drift: how far prompts without any token move from the base model's images (mean absolute
  pixel difference, 0-255, same seeds), beside the own adapters' drift.
Gradient fusion records each concept's layer inputs on its training captions, never on the eval
prompts it is scored on. Fuse time for two and for more concepts is measured on this machine, and
the cost on SD 1.5 computed from its layer shapes (bench/fusion_cost.py).

The trainings are an ordinary sweep per concept (experiments/sweep.py), so the benchmark is resumable.
Outputs in --out: cells/ (run folders), fused/ (the fused run folders), fusion.json, fusion.md,
fusion.png; --page FILE writes the page (and its figure beside it) there too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from balora_diffusion import paths
from balora_diffusion.atomic import atomic_path, write_json_atomic
from balora_diffusion.concept import Concept, fidelity_batch, load_concept
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import TEXT_ENCODER, UNET
from balora_diffusion.run_layout import CELLS

CONCEPT_FOLDERS = (paths.DEMO_CONCEPT, paths.RING_CONCEPT)
FUSIONS = ("sum", "gradient")
FACTOR_AWARE = ("balora", "ilora", "pilora")
# an own-adapter fidelity below this is no concept to retain: its retention is not a number
MIN_OWN_FIDELITY = 0.05


@dataclass(frozen=True)
class Plan:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]            # training seeds
    steps: int
    sample_steps: int                 # of every scored image
    score_seeds: tuple[int, ...]      # sampling seeds of every scored image
    fuse_steps: int                   # gradient fusion: sampling steps while layer inputs are recorded
    drift_prompts: int
    cost_concepts: tuple[int, ...]    # numbers of concepts whose fusion is timed
    workers: int


FULL = Plan(methods=("lora", "balora", "ilora", "pilora"), seeds=(0, 1, 2), steps=300, sample_steps=20, score_seeds=(1, 2),
            fuse_steps=10, drift_prompts=4, cost_concepts=(2, 5), workers=2)
QUICK = Plan(methods=("lora", "balora"), seeds=(0,), steps=4, sample_steps=2, score_seeds=(1,), fuse_steps=2,
             drift_prompts=2, cost_concepts=(2, 3), workers=1)


def sweep_configs(plan: Plan, out: Path) -> list:
    """One `balora sweep` of the demo config per concept, its token and initialiser set."""
    from balora_diffusion.experiments.sweep import SweepConfig

    configs = []
    for folder in CONCEPT_FOLDERS:
        concept = load_concept(folder)
        sets = [f"data_dir={folder}", f"token={concept.token}", f"init_word={concept.initializer}",
                f"steps={plan.steps}", f"eval_every={plan.steps}", f"checkpoint_every={plan.steps}",
                "grid_seeds=1", "fusion=1", f"sample_steps={plan.sample_steps}"]
        configs.append(SweepConfig(config="demo", methods=list(plan.methods), lrs=["1"], seeds=list(plan.seeds),
                                   set=sets, out=str(out / CELLS / concept.name), workers=plan.workers, score=False))
    return configs


def drift_prompts(n: int) -> list[str]:
    """`n` world captions without a token, spread over the world's scenes."""
    from balora_diffusion import world

    scenes = world.all_scenes()
    return [scenes[i * len(scenes) // n].caption() for i in range(n)]


def captions(concept: Concept) -> list[str]:
    from balora_diffusion.data import read_concept_folder

    return sorted({e.caption for e in read_concept_folder(concept.path, [concept.token], concept.caption_template)})


def pixel_drift(images, base) -> float:
    """Mean absolute pixel difference (0-255) of two equally long lists of images."""
    return float(np.mean([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()
                          for a, b in zip(images, base, strict=True)]))


class Scorer:
    """Draws and scores on one pipeline, with the same prompts and seeds for every adapter."""

    def __init__(self, pipe, concepts: list[Concept], plan: Plan):
        self.pipe, self.concepts, self.plan = pipe, concepts, plan
        self.drift = drift_prompts(plan.drift_prompts)
        self.base = self._draw(self.drift)

    def _draw(self, prompts: list[str]) -> list:
        from balora_diffusion.generate import generate

        rows = generate(self.pipe, prompts, list(self.plan.score_seeds), steps=self.plan.sample_steps, progress=False)
        return [image for row in rows for image in row]

    def score(self, adapters: list, concepts: list[Concept]) -> tuple[dict, list]:
        """{token: {fidelity, bleed}, "drift": ...} of `adapters` loaded together for `concepts`, and
        the images (each concept's eval prompts, then the drift prompts)."""
        from balora_diffusion.formats.fuse import Fused

        scores, shown = {}, []
        with Fused(self.pipe, [(adapter, 1.0) for adapter in adapters]):
            for concept in concepts:
                images = self._draw(list(concept.eval_prompts))
                other = next(c for c in self.concepts if c is not concept)
                scores[concept.token] = {"fidelity": fidelity_batch(images, concept),
                                         "bleed": fidelity_batch(images, other)}
                shown.append(images)
            drift = self._draw(self.drift)
        scores["drift"] = pixel_drift(drift, self.base)
        return scores, shown + [drift]


def fuse(pipe, adapters: list, concepts: list[Concept], method: str, plan: Plan, folder: Path | None):
    """The fused adapter of `adapters` (one per concept) by `method`, read back from its run folder
    when `folder` is given (what a user loads), and the seconds the fusion took."""
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.formats.run_files import write_run_adapters
    from balora_diffusion.fusion import Concept as FuseConcept
    from balora_diffusion.fusion import check_concepts, fuse_concepts
    from balora_diffusion.generate import DEFAULT_GUIDANCE

    items = [FuseConcept(c.token, a, 1.0, [p.replace(c.token, a.tokens[0]) for p in captions(c)])
             for a, c in zip(adapters, concepts)]
    check_concepts(items, max_rank=10**6, rank=None)
    started = time.perf_counter()
    adapter, _ = fuse_concepts(pipe, items, method, rank=None, info={"method": f"fuse-{method}", "token": [
        t for a in adapters for t in a.tokens]}, ridge=1e-4, steps=plan.fuse_steps, seeds=[1],
                               guidance=DEFAULT_GUIDANCE, progress=False)
    seconds = time.perf_counter() - started
    if folder is None:
        return adapter, seconds
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        write_run_adapters(tmp, adapter)
    return read_adapter(folder), seconds


def retention(fused: float, own: float) -> float | None:
    return fused / own if own >= MIN_OWN_FIDELITY else None


def cell_rows(method: str, seed: int, own: dict, fused: dict, seconds: dict) -> list[dict]:
    """One row per (fusion, concept) of a rule and seed, from the own and fused scores."""
    rows = []
    for fusion, scores in fused.items():
        for token, own_scores in own.items():
            rows.append({"method": method, "seed": seed, "fusion": fusion, "concept": token,
                         "own_fidelity": own_scores["fidelity"], "fused_fidelity": scores[token]["fidelity"],
                         "retention": retention(scores[token]["fidelity"], own_scores["fidelity"]),
                         "own_bleed": own_scores["bleed"], "fused_bleed": scores[token]["bleed"],
                         "own_drift": own_scores["drift"], "fused_drift": scores["drift"],
                         "fuse_seconds": seconds[fusion]})
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _sd(values) -> float | None:
    """Spread over concepts and seeds: whether a difference of means is larger than the seeds' own."""
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summary(rows: list[dict]) -> dict[str, dict]:
    """(method, fusion) -> the means over concepts and seeds."""
    table = {}
    for key in dict.fromkeys((r["method"], r["fusion"]) for r in rows):
        group = [r for r in rows if (r["method"], r["fusion"]) == key]
        table[f"{key[0]}/{key[1]}"] = {
            name: _mean(r[name] for r in group)
            for name in ("own_fidelity", "fused_fidelity", "retention", "own_bleed", "fused_bleed", "own_drift",
                         "fused_drift", "fuse_seconds")} | {"method": key[0], "fusion": key[1],
                                                           "scored": sum(r["retention"] is not None for r in group),
                                                           "retention_sd": _sd(r["retention"] for r in group)}
    return table


def _compare(better: list[float | None], worse: list[float | None], labels: list[str]) -> tuple[int, int, list[str]]:
    """(wins, pairs, losses) of `better` over `worse`, pairs where both are numbers; losses names
    each pair `better` does not win, by its label, so that the page says where an option does not help."""
    pairs = [(a, b, label) for a, b, label in zip(better, worse, labels, strict=True) if a is not None and b is not None]
    losses = [f"{label} ({a:.3f} against {b:.3f})" for a, b, label in pairs if not a > b]
    return sum(a > b for a, b, _ in pairs), len(pairs), losses


def _verdict(wins: int, pairs: int) -> str:
    if pairs == 0:
        return "not measurable (no concept reached the fidelity a retention needs)"
    if wins == pairs:
        return "yes"
    return "no" if wins == 0 else "mixed"


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """The two questions, each answered from paired retentions: gradient against sum on the same
    adapters; each factor-aware rule against plain LoRA on the same fusion, concept and seed."""
    def key(r):
        return r["method"], r["seed"], r["concept"]

    by = {(key(r), r["fusion"]): r["retention"] for r in rows}
    pairs = sorted({key(r) for r in rows})
    wins, n, losses = _compare([by.get((k, "gradient")) for k in pairs], [by.get((k, "sum")) for k in pairs],
                               [f"{m} seed {s} {c}" for m, s, c in pairs])
    out = {"gradient_over_sum": {"question": "does gradient fusion retain concepts better than sum?",
                                 "wins": wins, "pairs": n, "answer": _verdict(wins, n), "losses": losses}}
    lora = {(r["seed"], r["concept"], r["fusion"]): r["retention"] for r in rows if r["method"] == "lora"}
    aware = [r for r in rows if r["method"] in FACTOR_AWARE]
    wins, n, losses = _compare([r["retention"] for r in aware],
                               [lora.get((r["seed"], r["concept"], r["fusion"])) for r in aware],
                               [f"{r['method']} seed {r['seed']} {r['concept']} {r['fusion']}" for r in aware])
    out["factor_aware_over_lora"] = {"question": "do the factor-aware rules (" + ", ".join(FACTOR_AWARE)
                                                 + ") fuse better than plain LoRA?", "wins": wins, "pairs": n,
                                     "answer": _verdict(wins, n), "losses": losses}
    return out


# the other concept's adapter piece by piece beside a concept's own: which part of it costs the concept
PARTS = {"token": (False, False), "token + text-encoder LoRA": (False, True), "token + UNet LoRA": (True, False)}


def part_study(scorer: Scorer, method: str, adapters: list, concepts: list[Concept]) -> list[dict]:
    """Each concept's fidelity with its own adapter plus one part of the other's (its token alone, its
    text-encoder LoRA with it, its UNet LoRA with it), loaded side by side as two adapters."""
    rows = []
    for k, concept in enumerate(concepts):
        other = adapters[1 - k]
        for label, (unet, text) in PARTS.items():
            part = dataclasses.replace(other, part_modules={UNET: other.parts()[UNET] if unet else {},
                                                            TEXT_ENCODER: other.parts()[TEXT_ENCODER] if text else {}})
            scores, _ = scorer.score([adapters[k], part], [concept])
            rows.append({"method": method, "concept": concept.token, "with": label,
                         "fidelity": scores[concept.token]["fidelity"]})
    return rows


def timed_fusions(pipe, adapters: list, concepts: list[Concept], plan: Plan) -> list[dict]:
    """Seconds to fuse 2 and more concepts by each method: the trained adapters, then the same ones
    again under other token names (the work per concept is the same whatever it learned)."""
    rows = []
    for n in plan.cost_concepts:
        chosen, of = [], []
        for k in range(n):
            adapter, concept = adapters[k % len(adapters)], concepts[k % len(concepts)]
            if k >= len(adapters):
                token = f"<{concept.token.strip('<>')}{k}>"
                adapter = dataclasses.replace(adapter, tokens=[token])
            chosen.append(adapter)
            of.append(concept)
        for method in FUSIONS:
            _, seconds = fuse(pipe, chosen, of, method, plan, None)
            rows.append({"concepts": n, "fusion": method, "seconds": seconds})
    return rows


def sd15_cost(widths_timed: dict[int, float]) -> list[dict]:
    """SD 1.5's gradient-fusion cost for 2 and 5 concepts at ranks 4 and 64, computed from its
    shapes; the solve's time from one eigendecomposition per distinct width timed here."""
    from balora_diffusion.bench.fusion_cost import cost, sd15_layers

    layers = sd15_layers()
    eigh_seconds = sum(widths_timed[layer.inputs] for layer in layers)
    return [{"concepts": n, "rank": r, **cost(layers, n, r), "eigh_seconds_here": eigh_seconds}
            for n in (2, 5) for r in (4, 64)]


def time_eigh(widths: set[int]) -> dict[int, float]:
    """Seconds of one float64 eigendecomposition of a d x d Gram-like matrix, per width."""
    out = {}
    for d in sorted(widths):
        x = torch.randn(2 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        gram = x.T @ x
        started = time.perf_counter()
        torch.linalg.eigh(gram)
        out[d] = time.perf_counter() - started
    return out


def run_bench(plan: Plan, out: Path, command: str) -> dict:
    from balora_diffusion.bench.fusion_cost import sd15_layers
    from balora_diffusion.experiments.sweep import check_sweep_folder, expand, run_cells
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.models import load_pipeline
    from balora_diffusion.threads import use_cpu_threads

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    concepts = [load_concept(folder) for folder in CONCEPT_FOLDERS]
    configs = sweep_configs(plan, out)
    per_concept = [expand(config) for config in configs]
    for config, cells in zip(configs, per_concept):
        check_sweep_folder(Path(config.out), cells)
    cells = [c for group in per_concept for c in group]
    records = run_cells(configs[0], cells, None)
    failed = [c.name for c, r in zip(cells, records) if r is None or r["status"] != "done"]
    if failed:
        raise UserError(f"the trainings of {', '.join(failed)} did not finish; see their cell.log")
    training_seconds = time.perf_counter() - started
    pipe = load_pipeline(None, device="cpu")
    use_cpu_threads(0, [pipe.unet, pipe.text_encoder, pipe.vae])
    scorer = Scorer(pipe, concepts, plan)
    rows, figure, timed, parts = [], [], [], []
    for method in plan.methods:
        for seed in plan.seeds:
            folders = [Path(group[0].values["output_dir"]).parent / _cell_name(group, method, seed)
                       for group in per_concept]
            adapters = [read_adapter(f) for f in folders]
            own = {}
            for adapter, concept in zip(adapters, concepts):
                scores, images = scorer.score([adapter], [concept])
                own[concept.token] = {**scores[concept.token], "drift": scores["drift"]}
                figure.append((f"{method} s{seed} own {concept.token}", images[0]))
            fused, seconds = {}, {}
            for fusion in FUSIONS:
                adapter, seconds[fusion] = fuse(pipe, adapters, concepts, fusion, plan,
                                                out / "fused" / f"{method}-s{seed}-{fusion}")
                fused[fusion], images = scorer.score([adapter], concepts)
                figure += [(f"{method} s{seed} {fusion} {c.token}", im) for c, im in zip(concepts, images)]
            rows += cell_rows(method, seed, own, fused, seconds)
            if not timed:
                timed = timed_fusions(pipe, adapters, concepts, plan)
                parts = part_study(scorer, method, adapters, concepts)
    eigh = time_eigh({layer.inputs for layer in sd15_layers()})
    result = {"plan": asdict(plan), "command": command, "threads": torch.get_num_threads(), "rows": rows,
              "parts": parts,
              "summary": summary(rows), "verdicts": verdicts(rows), "fuse_times": timed, "sd15": sd15_cost(eigh),
              "eigh_seconds": eigh,
              "drift_prompts": scorer.drift, "training_seconds": round(training_seconds, 1),
              "cell_seconds": round(sum(r["wall_seconds"] for r in records), 1),
              "wall_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
              # what else ran: the same plan takes far longer beside other processes
              "load_average": [load_start, os.getloadavg()[0]]}
    write_json_atomic(out / "fusion.json", result)
    _grid(out / "fusion.png", figure, concepts, plan)
    with atomic_path(out / "fusion.md") as tmp:
        tmp.write_text(page(result, "fusion.png"), encoding="utf-8")
    return result


def _cell_name(cells: list, method: str, seed: int) -> str:
    return next(c.name for c in cells if c.labels["method"] == method and c.labels["seed"] == seed)


def _grid(path: Path, figure: list, concepts: list[Concept], plan: Plan) -> None:
    """The first sampling seed's images, in 256 colours: a figure for the docs, not the scored pixels."""
    from PIL import Image

    from balora_diffusion.generate import image_grid, save_image

    seeds = len(plan.score_seeds)
    cols = [f"{p.replace(concepts[0].token, 'TOKEN')}" for p in concepts[0].eval_prompts]
    grid = image_grid([images[::seeds] for _, images in figure], [label for label, _ in figure], cols, cell=96,
                      title=f"each concept's eval prompts (TOKEN = its token), seed {plan.score_seeds[0]}, with its "
                            "own adapter and in the fused ones")
    save_image(path, grid.quantize(256, method=Image.Quantize.MEDIANCUT))


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def page(result: dict, figure: str) -> str:
    """The results page of a run of the benchmark."""
    plan = result["plan"]
    lines = ["# Several concepts in one adapter: sum against gradient fusion, per update rule", "",
             "Written by:", "", f"    {result['command']}", "",
             f"`<zorb>` and `<quax>` (assets/concepts) are each trained with the demo config for {plan['steps']} "
             f"steps (the demo trains 600; fewer to keep the benchmark's many trainings affordable on a CPU), "
             f"training seed(s) {', '.join(map(str, plan['seeds']))}, by each rule; every pair is fused by sum and by "
             f"gradient fusion (layer inputs recorded on each concept's training captions, {plan['fuse_steps']} "
             f"sampling steps, ridge 1e-4), and every image is drawn with {plan['sample_steps']} sampling steps and "
             f"seeds {', '.join(map(str, plan['score_seeds']))}. Retention: a concept's fidelity through its own token "
             f"in the fused adapter over its fidelity with its own adapter (none where that is below "
             f"{MIN_OWN_FIDELITY}). Bleed: the other concept's fidelity score of the same images. Drift: mean "
             f"absolute pixel difference (0-255) from the base model on {plan['drift_prompts']} prompts without a "
             f"token ({'; '.join(result['drift_prompts'])}). Wall time {result['wall_seconds']:.0f} s, "
             f"{result['training_seconds']:.0f} s of it training (the {len(plan['methods']) * len(plan['seeds']) * 2} "
             f"trainings took {result['cell_seconds']:.0f} s in all, {plan['workers']} at a time, whichever run of "
             f"the command trained them), on {result['cpu_count']} CPU cores with a load "
             f"average of {result['load_average'][0]:.1f} at the start and {result['load_average'][1]:.1f} at the end "
             f"(1 per busy core: above {result['cpu_count']}, other processes shared the cores).", "",
             "## Verdicts", ""]
    for verdict in result["verdicts"].values():
        lines.append(f"- {verdict['question']} **{verdict['answer']}** (higher retention in {verdict['wins']} of "
                     f"{verdict['pairs']} paired comparisons)")
        if verdict["losses"]:
            lines.append(f"  - where it does not help: {'; '.join(verdict['losses'])}")
    lines += ["", "## Per rule and fusion (means over both concepts and the seeds)", "",
              "| rule | fusion | own fidelity | fused fidelity | retention (sd) | own bleed | fused bleed | own drift | "
              "fused drift | fuse s |", "|" + "---|" * 10]
    for row in result["summary"].values():
        lines.append("| " + " | ".join([row["method"], row["fusion"], _fmt(row["own_fidelity"]),
                                         _fmt(row["fused_fidelity"]),
                                         f"{_fmt(row['retention'], '.2f')} ({_fmt(row.get('retention_sd'), '.2f')})",
                                         _fmt(row["own_bleed"]), _fmt(row["fused_bleed"]),
                                         _fmt(row["own_drift"], ".1f"), _fmt(row["fused_drift"], ".1f"),
                                         _fmt(row["fuse_seconds"], ".1f")]) + " |")
    lines += ["", "## Per concept", "",
              "| rule | seed | fusion | concept | own fidelity | fused fidelity | retention | own bleed | "
              "fused bleed |",
              "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["method"], str(r["seed"]), r["fusion"], r["concept"],
                                         _fmt(r["own_fidelity"]), _fmt(r["fused_fidelity"]),
                                         _fmt(r["retention"], ".2f"), _fmt(r["own_bleed"]),
                                         _fmt(r["fused_bleed"])]) + " |")
    lines += ["", "## Which part of the other adapter costs a concept", "",
              f"Rule {result['parts'][0]['method']}, seed {plan['seeds'][0]}: each concept's fidelity with its own "
              "adapter and one part of the other concept's adapter loaded beside it, as two adapters (no fusion):",
              "", "| concept | own | " + " | ".join(f"+ the other's {label}" for label in PARTS)
              + " | sum | gradient |",
              "|" + "---|" * (4 + len(PARTS))]
    for concept in dict.fromkeys(p["concept"] for p in result["parts"]):
        mine = {p["with"]: p["fidelity"] for p in result["parts"] if p["concept"] == concept}
        row = next(r for r in result["rows"] if r["concept"] == concept and r["method"] == result["parts"][0]["method"]
                   and r["seed"] == plan["seeds"][0])
        fused = {r["fusion"]: r["fused_fidelity"] for r in result["rows"] if r["concept"] == concept
                 and r["method"] == row["method"] and r["seed"] == row["seed"]}
        lines.append(f"| {concept} | {_fmt(row['own_fidelity'])} | " + " | ".join(_fmt(mine[label]) for label in PARTS)
                     + f" | {_fmt(fused['sum'])} | {_fmt(fused['gradient'])} |")
    lines += ["", f"![each concept with its own adapter and in the fused ones]({figure})", "",
              "## Cost", "", f"Measured here (the tiny model on this machine's CPU, {result['threads']} torch "
              "thread(s), the first rule's adapters above, layer inputs recorded as above; beyond two concepts "
              "the same adapters again under other token names):", "",
              "| concepts | fusion | seconds |", "|---|---|---|"]
    lines += [f"| {t['concepts']} | {t['fusion']} | {t['seconds']:.2f} |" for t in result["fuse_times"]]
    lines += ["", "Computed, not measured, for SD 1.5 (its 176 default LoRA layers: the UNet's 128 attention "
              "projections and the text encoder's 48, shapes from bench/fusion_cost.py): the summed float64 Grams, "
              "their peak while a concept is recorded, the solve's flops, and the recording's flops per UNet call "
              "on one 512 px image and per prompt encoding. The solve's time is the sum over layers of one "
              "eigendecomposition of that width timed once on this machine, same threads (" + ", ".join(
                  f"d={d}: {s:.2f} s" for d, s in sorted(result["eigh_seconds"].items(), key=lambda kv: int(kv[0])))
              + "), which is most of the solve's flops.", "",
              "| concepts | rank | Grams (GiB) | peak Grams (GiB) | solve (GFLOP) | solve here (s, eigh) | "
              "record per UNet call (GFLOP) | record per prompt (GFLOP) |", "|" + "---|" * 8]
    for c in result["sd15"]:
        lines.append(f"| {c['concepts']} | {c['rank']} | {c['gram_bytes'] / 2**30:.2f} | "
                     f"{c['peak_gram_bytes'] / 2**30:.2f} | {c['solve_flops'] / 1e9:.0f} | "
                     f"{c['eigh_seconds_here']:.0f} | {c['record_flops_unet_call'] / 1e9:.1f} | "
                     f"{c['record_flops_text_call'] / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.outputs import add_overwrite_flag

    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: fusion.json, fusion.md, fusion.png, cells/ (the trainings, resumable) "
                             "and fused/ (the fused run folders)")
    parser.add_argument("--page", type=Path, default=None,
                        help="also write the results page here (e.g. docs/results/fusion.md), its figure beside it")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: {', '.join(QUICK.methods)}, {QUICK.steps} steps")
    add_overwrite_flag(parser, "an earlier run's fusion.json, fusion.md, fusion.png and fused/ in --out, and --page")


def run(args: argparse.Namespace) -> int:
    import shlex
    import shutil

    from balora_diffusion.bench.outputs import claim_out, write_page
    from balora_diffusion.outputs import claim

    plan = QUICK if args.quick else FULL
    claim_out(args, ("fusion.json", "fusion.md", "fusion.png", "fused"))
    if args.page is not None:
        claim([args.page, args.page.with_suffix(".png")], args.overwrite, flag="--page")
    command = "balora bench fusion" + (" --quick" if args.quick else "") + f" --out {shlex.quote(str(args.out))}"
    if args.page is not None:
        command += f" --page {shlex.quote(str(args.page))}"
    if args.overwrite and (args.out / "fused").is_dir():
        shutil.rmtree(args.out / "fused")
    result = run_bench(plan, args.out, command)
    if args.page is not None:
        write_page(args.page, args.out / "fusion.png", lambda figure: page(result, figure))
    for verdict in result["verdicts"].values():
        print(f"{verdict['question']} {verdict['answer']} ({verdict['wins']} of {verdict['pairs']})")
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {args.out / 'fusion.md'}"
          + (f" and {args.page}" if args.page else ""))
    return 0
