"""The results page: the synthetic and concept benchmarks' tables and figures, and a verdict per
claim of each paper, all computed here from the benchmarks' JSON (no number is typed by hand).

A claim's verdict comes from its pieces of evidence, each a comparison with plain LoRA (or
between two variants) that either supports the claim or not: all support it -> "holds", none ->
"does not hold", some -> "mixed". The rules are printed on the page next to the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from balora_diffusion.checkpoint_scoring import MODEL_METRICS

# A method is faster / better than another only by a margin: smaller differences are noise at
# three seeds, and count against a claim of an improvement.
FASTER = 0.9          # ratio of steps (concept) or of median final gaps (synthetic) below this
ADHERENCE_MARGIN = 0.05
EXPERIMENTS = ("one_layer", "two_layer")


@dataclass(frozen=True)
class Evidence:
    text: str
    supports: bool | None  # None: not measured (a method missing, a run that never got there)


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    evidence: tuple[Evidence, ...]

    @property
    def verdict(self) -> str:
        measured = [e.supports for e in self.evidence if e.supports is not None]
        if not measured:
            return "not measured"
        return "holds" if all(measured) else "does not hold" if not any(measured) else "mixed"


def _shared(runs: list[dict]) -> str:
    """Says so when other jobs already loaded the machine as a run started (its own workers come later)."""
    busy = any(r["load_average_start"] > 1 for r in runs)
    return " (other jobs shared the machine's cores)" if busy else ""


def _num(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "never"
    if spec.endswith("f") and abs(x) >= 1e6:  # a fixed-point huge number would fill the table's row
        return format(x, ".3g")
    return format(x, spec)


def _gap(synthetic: dict, experiment: str, method: str) -> float | None:
    row = synthetic.get(experiment, {}).get(method)
    return None if row is None else row["median_final_gap"]


def synthetic_faster(synthetic: dict, method: str, than: str = "lora") -> list[Evidence]:
    """Per experiment: is `method`'s median final gap below FASTER x `than`'s?"""
    out = []
    for experiment in EXPERIMENTS:
        a, b = _gap(synthetic, experiment, method), _gap(synthetic, experiment, than)
        ok = None if a is None or b is None else a < FASTER * b
        out.append(Evidence(f"synthetic {experiment.replace('_', '-')}: median final gap {method} {_num(a)} "
                            f"vs {than} {_num(b)}", ok))
    return out


def _concept_row(concept: dict, method: str) -> dict | None:
    return concept.get("methods", {}).get(method)


def concept_faster(concept: dict, method: str) -> Evidence:
    row = _concept_row(concept, method)
    ratio = None if row is None else row["ratio_to_lora"]
    ok = None if row is None else ratio is not None and ratio < FASTER
    return Evidence(f"concept: steps to LoRA's final held-out loss, ratio to LoRA {_num(ratio, '.2f')}", ok)


@dataclass(frozen=True)
class PromptScore:
    """The score that says how well images follow their prompts: a method row's `by_lr[lr][key][w]`
    (mean over seeds at fusion w), `row[key]` (at the best lr, w = 1) and `row[key + "_spread"]`."""
    key: str
    label: str
    margin: float  # a "better" score is at least this much higher; smaller differences are noise


ADHERENCE = PromptScore("adherence", "adherence (w=1)", ADHERENCE_MARGIN)
# CLIP-T is a cosine whose differences between fine-tuning methods run in the hundredths (DreamBooth's
# tables), a tenth of the share-of-attributes scale of adherence.
CLIP_T = PromptScore("clip-t", "CLIP-T (w=1)", 0.01)


def concept_robust(concept: dict, method: str, prompt: PromptScore = ADHERENCE) -> list[Evidence]:
    """Does the final held-out loss / the prompt score move less across the lr grid than LoRA's?"""
    row, lora = _concept_row(concept, method), _concept_row(concept, "lora")
    out = []
    for key, label in (("final_heldout_spread", "final held-out loss"), (f"{prompt.key}_spread", prompt.label)):
        if row is None or lora is None or ("by_lr" in row and len(row["by_lr"]) < 2):
            out.append(Evidence(f"concept: spread of the {label} across lrs", None))
            continue
        mine, theirs = _spread(row, key), _spread(lora, key)
        ok = None if mine is None or theirs is None else mine < theirs
        out.append(Evidence(f"concept: spread of the {label} across lrs, {method} {_num(mine)} vs lora {_num(theirs)}",
                            ok))
    return out


def _spread(row: dict, key: str) -> float | None:
    """A spread where some lr diverged is unbounded: the method did not survive the grid."""
    if key == "final_heldout_spread" and row["diverged_lrs"]:
        return math.inf
    return row.get(key)


def _better(mine: float | None, theirs: float | None, prompt: PromptScore) -> bool | None:
    return None if mine is None or theirs is None else mine >= theirs + prompt.margin


def prompt_at_best_lr(concept: dict, method: str, prompt: PromptScore = ADHERENCE) -> Evidence:
    """The prompt score at each method's own best learning rate against LoRA's at LoRA's."""
    row, lora = _concept_row(concept, method), _concept_row(concept, "lora")
    if row is None or lora is None:
        return Evidence(f"concept: {prompt.label} at each method's best lr", None)
    mine, theirs = row.get(prompt.key), lora.get(prompt.key)
    return Evidence(f"concept: {prompt.label} at each method's best lr, {method} {_num(mine, '.3f')} (lr {row['best_lr']}) "
                    f"vs lora {_num(theirs, '.3f')} (lr {lora['best_lr']})", _better(mine, theirs, prompt))


def prompt_over_grid(concept: dict, method: str, prompt: PromptScore = ADHERENCE) -> Evidence:
    """The prompt score averaged over the learning rates at which both methods drew images: an lr where
    every seed of either diverged is left out, since diverging is what robustness measures, and a
    mean that counted it would say little about the images drawn."""
    row, lora = _concept_row(concept, method), _concept_row(concept, "lora")
    if row is None or lora is None:
        return Evidence(f"concept: {prompt.label} over the lr grid", None)
    mine, theirs = _at_w1(row, prompt), _at_w1(lora, prompt)
    shared = [lr for lr in mine if lr in theirs and mine[lr] is not None and theirs[lr] is not None]
    left = [lr for lr in dict.fromkeys([*mine, *theirs]) if lr not in shared]
    if not shared:
        return Evidence(f"concept: {prompt.label} over the lr grid (no lr at which both drew images)", None)
    a, b = (sum(values[lr] for lr in shared) / len(shared) for values in (mine, theirs))
    out = f" (left out, one of them drew nothing: lr {', '.join(left)})" if left else ""
    return Evidence(f"concept: {prompt.label} averaged over the {len(shared)} lrs both drew at, {method} {_num(a, '.3f')} "
                    f"vs lora {_num(b, '.3f')}{out}", _better(a, b, prompt))


def _at_w1(row: dict, prompt: PromptScore) -> dict[str, float | None]:
    return {lr: (s.get(prompt.key) or {}).get("1") for lr, s in row["by_lr"].items()}


def claims(synthetic: dict, concept: dict) -> list[Claim]:
    concept_balora = _concept_row(concept, "balora")
    concept_hilora = _concept_row(concept, "hilora")
    target_concept = Evidence(
        f"concept: final held-out loss at the best lr, balora {_num(concept_balora and concept_balora['final_heldout'], '.4f')}"
        f" vs hilora {_num(concept_hilora and concept_hilora['final_heldout'], '.4f')}",
        None if not (concept_balora and concept_hilora)
        else concept_balora["final_heldout"] <= concept_hilora["final_heldout"])
    states = [Evidence(f"synthetic {e.replace('_', '-')}: keep {_num(_gap(synthetic, e, 'balora'))}, reset_once "
                       f"{_num(_gap(synthetic, e, 'balora-reset_once'))}, carry {_num(_gap(synthetic, e, 'balora-carry'))}",
                       _keep_is_within(synthetic, e)) for e in EXPERIMENTS]
    return [
        Claim("BaLoRA", "BaLoRA converges faster than LoRA",
              (*synthetic_faster(synthetic, "balora"), concept_faster(concept, "balora"))),
        Claim("BaLoRA", "aligning the singular vectors' signs after each projection is needed (our implementation's "
                        "finding): the unaligned projection is slower",
              tuple(synthetic_faster(synthetic, "balora", than="balora-unaligned"))),
        Claim("BaLoRA", "the balanced target A A^T = B^T B beats iLoRA's imbalanced one A A^T = rho B^T B "
                        "(hilora: the same projection onto iLoRA's target)",
              (*synthetic_faster(synthetic, "balora", than="hilora"), target_concept)),
        Claim("BaLoRA", "keeping Adam's buffers through the projection (the authors' choice) is as good as resetting "
                        "them once or carrying the first moment (within 2x of the best of the three)", tuple(states)),
        Claim("iLoRA / piLoRA", "iLoRA is robust to the learning rate", tuple(concept_robust(concept, "ilora"))),
        Claim("iLoRA / piLoRA", "piLoRA is robust to the learning rate", tuple(concept_robust(concept, "pilora"))),
        Claim("iLoRA / piLoRA", "images follow the prompt better than with LoRA (Fig. 1: LoRA ignores the context)",
              tuple(e for m in ("ilora", "pilora") for e in (prompt_at_best_lr(concept, m),
                                                               prompt_over_grid(concept, m)))),
        Claim("iLoRA / piLoRA", "piLoRA converges faster than LoRA",
              (*synthetic_faster(synthetic, "pilora"), concept_faster(concept, "pilora"))),
        Claim("scaled LoRA (Zhang & Pilanci)", "preconditioning makes LoRA faster",
              (*synthetic_faster(synthetic, "scaled"), concept_faster(concept, "scaled"))),
        Claim("scaled LoRA (Zhang & Pilanci)", "preconditioning makes LoRA robust to the learning rate",
              tuple(concept_robust(concept, "scaled"))),
        Claim("LoRA+ (Hayou et al.)", "a 16x larger learning rate for B makes LoRA faster",
              (*synthetic_faster(synthetic, "loraplus"), concept_faster(concept, "loraplus"))),
    ]


def _keep_is_within(synthetic: dict, experiment: str) -> bool | None:
    gaps = [_gap(synthetic, experiment, m) for m in ("balora", "balora-reset_once", "balora-carry")]
    if any(g is None for g in gaps):
        return None
    return gaps[0] <= 2 * min(gaps)


PROMPT_RULE = ("\"Follows the prompt better\" is judged twice, as two lines: {score} at least {margin} higher "
               "than LoRA's at each method's own best learning rate, and averaged over the learning rates at which "
               "both drew images (an lr at which every seed of either diverged is left out and named: diverging is "
               "what robustness measures).")


def verdicts_markdown(found: list[Claim], first: str = "paper") -> str:
    lines = [f"| {first} | claim | verdict | evidence |", "|---|---|---|---|"]
    for c in found:
        evidence = "<br>".join(f"{'✔' if e.supports else '✘' if e.supports is False else '–'} {e.text}"
                               for e in c.evidence)
        lines.append(f"| {c.paper} | {c.claim} | **{c.verdict}** | {evidence} |")
    return "\n".join(lines) + "\n"


def synthetic_markdown(synthetic: dict) -> str:
    parts = []
    for experiment, rows in synthetic.items():
        lines = [f"**{experiment.replace('_', '-')}**", "",
                 "| method | best lr | median final gap | steps to 1e-2 | steps to 1e-4 |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {_num(r['best_lr'], '.4g')} | {_num(r['median_final_gap'], '.3e')} | "
                  f"{_num(r['steps_to_1e-2'], 'g')} | {_num(r['steps_to_1e-4'], 'g')} |" for m, r in rows.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def concept_lr_markdown(concept: dict) -> str:
    """Per method and lr: median final held-out loss (lambda kept), diverged seeds, fidelity and adherence."""
    lines = ["| method | lr (UNet / text) | lambda | median final held-out | diverged seeds | fidelity w=0.7 / 1 | "
             "adherence w=0.7 / 1 |", "|---|---|---|---|---|---|---|"]
    for method, row in concept["methods"].items():
        for lr, s in row["by_lr"].items():
            pair = lambda d: " / ".join(_num(d.get(w), ".3f") for w in ("0.7", "1"))  # noqa: E731
            lam = "-" if s["lambda"] is None else f"{s['lambda']:g}"
            lines.append(f"| {method} | {lr}: {s['lr_unet']:.3g} / {s['lr_text']:.3g} | {lam} | "
                         f"{_num(s['median_final_heldout'], '.4f')} | {s['diverged_seeds']} | {pair(s['fidelity'])} | "
                         f"{pair(s['adherence'])} |")
    return "\n".join(lines) + "\n"


def render_page(synthetic: dict, synthetic_protocol: dict, concept: dict, concept_table: str,
                commands: dict[str, str]) -> str:
    """docs/results.md. commands: "page", "concept", "synthetic" -> the command lines that made each part."""
    p = concept["protocol"]
    plan = p["plan"]
    runs = p["runs"]
    found = claims(synthetic, concept)
    return f"""# Results: where the papers' claims hold on our task

Everything on this page, numbers, tables, figures and verdicts, is written by one command from the
benchmarks' own output files; nothing is typed by hand:

```
{commands["page"]}
```

It runs each benchmark whose output is missing (both resume where they stopped) and rewrites this
page and its figures in `docs/img/`. The benchmarks themselves:

```
{commands["concept"]}
{commands["synthetic"]}
```

## Verdicts

A verdict gathers its evidence: each line compares a method with plain LoRA (or two variants) and
supports the claim (✔) or not (✘); all ✔ = **holds**, all ✘ = **does not hold**, some of each =
**mixed**. "Faster" means a ratio below {FASTER:g}: fewer steps to plain LoRA's final held-out loss on the
concept task, or a smaller median final gap after the synthetic benchmark's fixed number of steps.
"Robust to the learning rate" means a smaller spread (largest minus smallest median over seeds)
across the learning-rate grid than LoRA's; a method that diverges at some learning rate has an
unbounded spread. {PROMPT_RULE.format(score="an adherence", margin=f"{ADHERENCE_MARGIN:g}")}

{verdicts_markdown(found)}
## Concept task: every method on the shipped `<zorb>` concept and the shipped tiny model

Protocol: the shipped demo config (`training/configs/demo.toml`: rank 4, AdamW, batch 4, constant
learning rate) for {plan["steps"]} steps, learning-rate factors {", ".join(plan["lrs"])} on its UNet and
text-encoder rates (the token embedding keeps its own), seeds {", ".join(map(str, plan["seeds"]))}, and for
iLoRA / piLoRA lambda in {{{", ".join(f"{v:g}" for v in plan["lambdas"])}}} at every learning rate (each learning rate keeps its
best lambda): {p["cells"]} cells, each a `balora train` run folder. Held-out loss every
{plan["eval_every"]} steps on 16 fixed (image, noise, timestep) triples. Best learning rate: {p["best_lr"]}.
Steps to LoRA's final: {p["steps_to_lora_final"]}; they are counted at the evaluations, so a
ratio moves in steps of {plan["eval_every"]} over LoRA's count, and 1.00 means the same evaluation.

{_partial(p)}Pixel scores: each cell's adapter is loaded into a fresh pipeline and draws the concept's
{_count(p, "eval")} evaluation prompts and {plan["unseen_contexts"]} contexts it never appeared in (background, size and
position in the world's words), at fusion coefficients 0.7 and 1, with {plan["sample_steps"]} sampling steps.
Fidelity is the concept's colour score (`concept.fidelity`); adherence is the share of what the
prompt names (background colour, size, position) that `scoring.read_context` reads back from the
pixels, sizes and positions calibrated on the concept's own training images. The tables give w = 1
unless they say otherwise.

Cost: {p["wall_time_s"] / 60:.1f} minutes of wall time in {len(runs)} run(s) of the benchmark on
{"; ".join(f'{r["cpu_count"]} CPU cores, Python {r["python"]}, torch {r["torch"]}' for r in runs)}, with {plan["workers"]}
worker(s) of one thread each ({p["cell_seconds"]:.0f} s of cell wall time, {p["cpu_seconds"]:.0f} s of CPU time);
one-minute load average {", ".join(f'{r["load_average_start"]:.1f} at the start and {r["load_average_end"]:.1f} at the end'
                                   for r in runs)}{_shared(runs)}. The cells' CPU time over two
cores is {p["cpu_seconds"] / 2 / 60:.0f} minutes, the floor on two idle cores: the grid
({plan["steps"]} steps, {len(plan["lrs"])} learning rates, {len(plan["lambdas"])} lambdas for the iLoRA family,
scoring with {plan["sample_steps"]} sampling steps) was sized to fit 60 minutes there.

{concept_table}
![held-out loss curves at each method's best lr, and the final loss, fidelity and adherence across the lr grid](img/concept.png)

One prompt per cell (first seed), rows = learning rate, columns = method (Fig. 1 of the iLoRA paper):

![the lr x method grid](img/concept-grid.png)

Per learning rate:

{concept_lr_markdown(concept)}
## Synthetic benchmark (the BaLoRA paper's Fig. 3)

Protocol and figures: [benchmarks.md](benchmarks.md). {synthetic_protocol["experiments"]["one_layer"]["steps"]} and
{synthetic_protocol["experiments"]["two_layer"]["steps"]} steps, {len(synthetic_protocol["experiments"]["one_layer"]["seeds"])} seeds,
the best learning rate per method from the grid; wall time {synthetic_protocol.get("wall_time_s", 0):.0f} s.

{synthetic_markdown(synthetic)}
![median gap curves of the synthetic benchmark](img/synthetic.png)
"""


def _partial(protocol: dict) -> str:
    if protocol["finished_cells"] == protocol["cells"]:
        return ""
    return (f"**This run is partial: {protocol['finished_cells']} of the {protocol['cells']} cells finished** within "
            "the time it was given (`--max-minutes`; seeds are trained in turn, so every method has its first "
            "seeds). The `seeds` column says how many stand behind each row; rerunning the command trains the "
            "rest and rewrites the page.\n\n")


def _count(protocol: dict, kind: str) -> int:
    return protocol.get("prompts", {}).get(kind, 0)


# --- the page of a user's own sweep (`balora results --sweep DIR`) --------------------------------

# `balora sweep`'s scores of a cell's final adapter by CLIP / DINO (experiments.cell_scores), besides the
# world's pixel scores; each a cell record's {w: score}.
SWEEP_METRICS = MODEL_METRICS
# a cell's scores: CLIP's and DINO's cosines lie in [-1, 1], fidelity and adherence (shares) in [0, 1]
SCORE_RANGES = {**{metric: (-1.0, 1.0) for metric in SWEEP_METRICS}, "fidelity": (0.0, 1.0), "adherence": (0.0, 1.0)}
MOST_STEPS = 2 ** 63


def read_sweep_summary(text: str) -> dict:
    """A sweep's summary.json, checked field by field as far as its page reads it; anything else (not strict
    JSON, another shape, a number out of its range) is a ValueError saying where."""
    import json

    def no_constant(name: str):
        raise ValueError(f"{name} is no JSON number")

    try:
        summary = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    _check_summary(summary)
    return summary


def _is_number(x, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where} should be {what}")


def _check_summary(summary) -> None:
    _expect(isinstance(summary, dict), "the file", "an object with protocol and cells")
    protocol, cells = summary.get("protocol"), summary.get("cells")
    _expect(isinstance(protocol, dict), "protocol", "an object")
    _expect(isinstance(cells, list), "cells", "a list")
    settings = protocol.get("sweep", {})
    _expect(isinstance(settings, dict), "protocol.sweep", "an object")
    for key in ("methods", "lrs", "seeds"):
        _expect(isinstance(settings.get(key, []), list) and all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                                for v in settings.get(key, [])),
                f"protocol.sweep.{key}", "a list of names")
    scoring = protocol.get("scoring") or {}
    _expect(isinstance(scoring, dict) and isinstance(scoring.get("metrics") or {}, dict), "protocol.scoring",
            "an object")
    for i, cell in enumerate(cells):
        if cell is not None:
            _check_cell(cell, f"cells[{i}]")


def _check_cell(cell, where: str) -> None:
    from balora_diffusion.bench.concept import LAMBDA_KEY

    _expect(isinstance(cell, dict), where, "an object")
    labels = cell.get("labels")
    _expect(isinstance(labels, dict), f"{where}.labels", "an object")
    for key in ("method", "lr"):
        _expect(isinstance(labels.get(key), str), f"{where}.labels.{key}", "a name")
    for key in ("lr_unet", "lr_text"):
        _expect(_is_number(labels.get(key), 0), f"{where}.labels.{key}", "a finite number >= 0")
    _expect(labels.get(LAMBDA_KEY) is None or _is_number(labels[LAMBDA_KEY]), f"{where}.labels.{LAMBDA_KEY}",
            "a finite number")
    _expect(isinstance(cell.get("status"), str), f"{where}.status", "a word (done, diverged, ...)")
    final = cell.get("final_heldout_loss")
    _expect(final is None or _is_number(final), f"{where}.final_heldout_loss", "a finite number")
    steps = cell.get("steps")
    _expect(steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps <= MOST_STEPS),
            f"{where}.steps", f"a whole number from 0 to {MOST_STEPS}")
    curve = cell.get("heldout_loss", [])
    _expect(isinstance(curve, list) and all(
        isinstance(p, list) and len(p) == 2 and _is_number(p[0], 0, MOST_STEPS) and (p[1] is None or _is_number(p[1]))
        for p in curve), f"{where}.heldout_loss", "a list of [step, loss] pairs")
    for metric, (low, high) in SCORE_RANGES.items():
        scores = cell.get(metric)
        _expect(scores is None or isinstance(scores, dict), f"{where}.{metric}", "an object {fusion: score}")
        for w, value in (scores or {}).items():
            if metric == "adherence" and isinstance(value, dict):
                value = value.get("all")
            _expect(value is None or _is_number(value, low, high), f"{where}.{metric}.{w}",
                    f"a score from {low:g} to {high:g}")


def sweep_table(records: list[dict]) -> dict[str, dict]:
    """bench.concept.analyse's method table of a sweep's cell records, with each CLIP / DINO metric the
    cells hold beside fidelity and adherence: per lr {w: mean over seeds}, at the best lr (w = 1) and its
    spread across lrs."""
    from balora_diffusion.bench import concept as bench_concept

    table = bench_concept.analyse(records)
    for method, row in table.items():
        groups = bench_concept.by_lr([r for r in records if r["labels"]["method"] == method])
        for metric in SWEEP_METRICS:
            per_lr = {lr: _mean_by_fusion(r.get(metric) for r in g["records"]) for lr, g in groups.items()}
            if not any(per_lr.values()):
                continue
            for lr, scores in per_lr.items():
                row["by_lr"][lr][metric] = scores
            row[metric] = per_lr[row["best_lr"]].get("1")
            top = [v["1"] for v in per_lr.values() if v.get("1") is not None]
            row[f"{metric}_spread"] = max(top) - min(top) if top else None
    return table


def _mean_by_fusion(scores) -> dict[str, float]:
    """{w: mean} over the records' {w: score} (a diverged cell has none)."""
    found: dict[str, list[float]] = {}
    for by_w in scores:
        for w, value in (by_w or {}).items():
            if value is not None:
                found.setdefault(w, []).append(value)
    return {w: sum(v) / len(v) for w, v in found.items()}


def sweep_prompt_score(records: list[dict]) -> PromptScore | None:
    """Adherence where the cells were scored on the world concept, else CLIP-T, else None."""
    for prompt in (ADHERENCE, CLIP_T):
        if any(r.get(prompt.key) for r in records):
            return prompt
    return None


def sweep_claims(table: dict[str, dict], prompt: PromptScore | None) -> list[Claim]:
    """Per method of the sweep against its lora cells: robust to the learning rate, faster, follows the prompt."""
    concept = {"methods": table}
    found = []
    for method in table:
        if method == "lora":
            continue
        robust = concept_robust(concept, method, prompt or ADHERENCE)
        follows = (prompt_at_best_lr(concept, method, prompt), prompt_over_grid(concept, method, prompt)) if prompt \
            else (Evidence("no score of how images follow their prompts in the cells", None),)
        found += [Claim(method, "robust to the learning rate (than LoRA)", tuple(robust if prompt else robust[:1])),
                  Claim(method, "faster (than LoRA)", (concept_faster(concept, method),)),
                  Claim(method, "follows the prompt (better than LoRA)", follows)]
    return found


def _sweep_method_markdown(table: dict[str, dict], prompt: PromptScore | None) -> str:
    head = ["method", "best lr", "seeds", "final held-out", "steps to LoRA's final", "ratio to LoRA",
            "final held-out spread over lrs"]
    if prompt:
        head += [f"{prompt.label} at the best lr", f"{prompt.label} spread over lrs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in table.items():
        cells = [method, r["best_lr"], str(r["seeds"]), _num(r["final_heldout"], ".4f"), _num(r["steps_to_lora_final"], "g"),
                 _num(r["ratio_to_lora"], ".2f"), _num(_spread(r, "final_heldout_spread"), ".4f")]
        if prompt:
            cells += [_num(r.get(prompt.key), ".3f"), _num(r.get(f"{prompt.key}_spread"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sweep_lr_markdown(table: dict[str, dict], scores: list[str]) -> str:
    """Per method and lr: median final held-out loss, diverged seeds and every score at every fusion."""
    fusions = sorted({w for row in table.values() for s in row["by_lr"].values() for k in scores
                      for w in (s.get(k) or {})}, key=float)
    head = ["method", "lr (UNet / text)", "median final held-out", "diverged seeds",
            *(f"{k} w={w}" for k in scores for w in fusions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        for lr, s in row["by_lr"].items():
            values = [_num((s.get(k) or {}).get(w), ".3f") for k in scores for w in fusions]
            lines.append(f"| {method} | {lr}: {s['lr_unet']:.3g} / {s['lr_text']:.3g} | "
                         f"{_num(s['median_final_heldout'], '.4f')} | {s['diverged_seeds']} | " + " | ".join(values)
                         + (" |" if values else "|"))
    return "\n".join(lines) + "\n"


def render_sweep_page(sweep: str, summary: dict, command: str, grid: str | None) -> str:
    """The results page of a user's sweep folder `sweep` (its summary.json: `summary`); `grid`: the name
    of the copied sweep grid beside the page, or None."""
    records = [r for r in summary["cells"] if r is not None]
    table = sweep_table(records)
    prompt = sweep_prompt_score(records)
    found = sweep_claims(table, prompt)
    settings = summary["protocol"].get("sweep", {})
    scoring = summary["protocol"].get("scoring") or {}
    scores = [k for k in ("fidelity", "adherence", *SWEEP_METRICS) if any(r.get(k) for r in records)]
    steps = sorted({r.get("steps") for r in records if r.get("steps")})
    diverged = sum(r["status"] != "done" for r in records)
    if prompt is ADHERENCE:
        prompt_text = ("adherence (the share of what each prompt names, background, size and position, that "
                       "the pixels show; the world concept's concept.toml gives the prompts)")
    elif prompt is CLIP_T:
        prompt_text = (f"CLIP-T (the cosine of each image with its prompt, the token read as its class word; CLIP "
                       f"model {(scoring.get('metrics') or {}).get('clip', '?')})")
    else:
        prompt_text = "no score: the cells were scored neither on a world concept nor with a CLIP model"
    rule = PROMPT_RULE.format(score=f"a {prompt.label}" if prompt else "a score", margin=f"{prompt.margin:g}"
                              if prompt else "-")
    figure = f"\nOne image per cell (first seed), rows = learning rate, columns = method:\n\n![the sweep's grid]({grid})\n" \
        if grid else ""
    return f"""# Results of the sweep `{sweep}`

Everything on this page is written by one command from the sweep's own `summary.json`; nothing is
typed by hand:

```
{command}
```

The sweep: methods {", ".join(settings.get("methods", sorted(table)))}, learning rates
{", ".join(settings.get("lrs", []))}, seeds {", ".join(map(str, settings.get("seeds", [])))};
{len(records)} cells of {", ".join(map(str, steps))} steps, {diverged} diverged. Scores of each cell's final
adapter: {", ".join(scores) or "none"}; following the prompt is measured by {prompt_text}.

## Verdicts

Each method is compared with the sweep's plain LoRA cells. A verdict gathers its evidence: each line
supports the claim (✔) or not (✘), or could not be measured (–); all ✔ = **holds**, all ✘ = **does not
hold**, some of each = **mixed**.

- "Robust to the learning rate" measured the spread (largest minus smallest median over seeds) of the
  final held-out loss across the sweep's learning rates, and of the prompt score (w = 1), against
  LoRA's; a method that diverges at some learning rate has an unbounded spread.
- "Faster" measured the steps, at the held-out evaluations, to LoRA's final held-out loss at LoRA's
  best learning rate (median over seeds), as a ratio to LoRA's own; faster means below {FASTER:g}.
- {rule}

{verdicts_markdown(found, first="method")}
## Per method, at its best learning rate (smallest median final held-out loss)

{_sweep_method_markdown(table, prompt)}
## Per learning rate

{_sweep_lr_markdown(table, scores)}{figure}"""
