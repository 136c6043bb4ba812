"""The results page: the synthetic and concept benchmarks' tables and figures, and a verdict per
claim of each paper, all computed here from the benchmarks' JSON (no number is typed by hand).

A claim's verdict comes from its pieces of evidence, each a comparison with plain LoRA (or
between two variants) that either supports the claim or not: all support it -> "holds", none ->
"does not hold", some -> "mixed". The rules are printed on the page next to the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def concept_robust(concept: dict, method: str) -> list[Evidence]:
    """Does the final held-out loss / adherence move less across the lr grid than LoRA's?"""
    row, lora = _concept_row(concept, method), _concept_row(concept, "lora")
    out = []
    for key, label in (("final_heldout_spread", "final held-out loss"), ("adherence_spread", "adherence (w=1)")):
        if row is None or lora is None:
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
    return row[key]


def concept_adherence(concept: dict, method: str) -> Evidence:
    """Adherence at w=1 averaged over the lr grid, against LoRA's."""
    row, lora = _concept_row(concept, method), _concept_row(concept, "lora")
    if row is None or lora is None:
        return Evidence("concept: adherence (w=1) over the lr grid", None)
    mine, theirs = _grid_mean(row, "adherence"), _grid_mean(lora, "adherence")
    ok = None if mine is None or theirs is None else mine >= theirs + ADHERENCE_MARGIN
    return Evidence(f"concept: adherence (w=1) averaged over the lr grid, {method} {_num(mine, '.3f')} vs lora "
                    f"{_num(theirs, '.3f')}", ok)


def _grid_mean(row: dict, key: str) -> float | None:
    """Mean over the lr grid; an lr whose cells all diverged drew nothing and counts as 0."""
    values = [s[key].get("1") for s in row["by_lr"].values()]
    values = [0.0 if v is None else v for v in values]
    return sum(values) / len(values) if values else None


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
              (concept_adherence(concept, "ilora"), concept_adherence(concept, "pilora"))),
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


def verdicts_markdown(found: list[Claim]) -> str:
    lines = ["| paper | claim | verdict | evidence |", "|---|---|---|---|"]
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
unbounded spread. "Follows the prompt better" means an adherence at least {ADHERENCE_MARGIN:g} higher than
LoRA's, averaged over the learning-rate grid (an lr whose cells all diverged draws nothing: 0).

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
