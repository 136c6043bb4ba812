"""`balora bench concept`: every main method on the shipped concept and model, over a learning-rate
grid and three seeds, iLoRA's lambda swept with the learning rate.

The cells are an ordinary sweep (experiments/sweep.py) of the shipped demo config, so the benchmark is
resumable and each cell is a `balora train` run folder. From the cells it measures, per method:
the held-out loss against steps (median and range over seeds) at the method's best learning rate
(smallest median final held-out loss); the steps it needs to reach plain LoRA's final held-out
loss at LoRA's best learning rate, and the ratio to LoRA's own; how much the final loss, fidelity
and prompt adherence move across the learning-rate grid (the robustness claim); and fidelity and
adherence at the best learning rate. For iLoRA and piLoRA each learning rate keeps its best lambda.

Outputs in --out: concept.json ({"methods": {METHOD: {...}}, "protocol": ...}), concept.md (the
table), concept.png (curves and the lr sweep), and the sweep's summary.json, summary.md, grid.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from balora_diffusion import paths
from balora_diffusion.atomic import atomic_path, write_json_atomic
from balora_diffusion.bench import curves as C
from balora_diffusion.concept import load_concept
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import check_writable
from balora_diffusion.rules.registry import NAMED_METHODS, parse_method
from balora_diffusion.run_layout import CELLS

# every named method, and after BaLoRA BaLoRA with scaled LoRA's preconditioner
METHODS = tuple(m for named in NAMED_METHODS for m in ((named, "balora+scaled") if named == "balora" else (named,)))
LAMBDA_KEY = "ilora_lambda"
TOP_FUSION = "1"


@dataclass(frozen=True)
class Plan:
    """The grid and its sizes; FULL fits 60 minutes on 2 idle CPU cores with 2 workers."""
    methods: tuple[str, ...]
    lrs: tuple[str, ...]          # factors on demo.toml's lr_unet and lr_text
    lambdas: tuple[float, ...]    # for the methods that use ilora_lambda
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    sample_steps: int             # sampling steps of the scored images and the run's grid
    unseen_contexts: int
    workers: int

    def cells(self) -> int:
        per_lr = len(self.methods) + sum(uses_lambda(m) for m in self.methods) * (len(self.lambdas) - 1)
        return per_lr * len(self.lrs) * len(self.seeds)


FULL = Plan(methods=METHODS, lrs=("1", "3", "9"), lambdas=(1.0, 10.0), seeds=(0, 1, 2), steps=150,
            eval_every=25, sample_steps=10, unseen_contexts=4, workers=2)
QUICK = Plan(methods=("lora", "ilora"), lrs=("1", "4"), lambdas=(1.0, 10.0), seeds=(0,), steps=4, eval_every=2,
             sample_steps=2, unseen_contexts=1, workers=1)


def uses_lambda(method: str) -> bool:
    return parse_method(method).uses_lambda


def sweep_configs(plan: Plan, out: Path) -> list:
    """The benchmark as `balora sweep` configs: the methods without lambda, then the lambda family."""
    from balora_diffusion.experiments.sweep import SweepConfig

    common = [f"data_dir={paths.DEMO_CONCEPT}", f"steps={plan.steps}", f"eval_every={plan.eval_every}",
              f"checkpoint_every={max(plan.eval_every, plan.steps // 2)}", "grid_seeds=1", "fusion=1",
              f"sample_steps={plan.sample_steps}"]
    kwargs = {"config": "demo", "lrs": list(plan.lrs), "seeds": list(plan.seeds), "out": str(out / CELLS),
              "workers": plan.workers, "unseen_contexts": plan.unseen_contexts}
    plain = [m for m in plan.methods if not uses_lambda(m)]
    family = [m for m in plan.methods if uses_lambda(m)]
    configs = [SweepConfig(methods=plain, set=common, **kwargs)] if plain else []
    if family:
        lambdas = ",".join(f"{v:g}" for v in plan.lambdas)
        configs.append(SweepConfig(methods=family, set=[*common, f"{LAMBDA_KEY}={lambdas}"], **kwargs))
    return configs


def sweep_command(config) -> str:
    """The `balora sweep` command line that trains the same cells."""
    sets = " ".join(f'"{s}"' if " " in s else s for s in config.set)
    return (f"balora sweep --config {config.config} --methods {' '.join(config.methods)} --lrs {' '.join(config.lrs)} "
            f"--seeds {' '.join(map(str, config.seeds))} --set {sets} --out {config.out} --workers {config.workers}")


# --- analysis of the cells' records (pure: lists of cell.json dicts in, numbers out) -------------

def _final(record: dict) -> float:
    value = record.get("final_heldout_loss")
    return float("inf") if record["status"] != "done" or value is None else float(value)


def _score(record: dict, key: str, w: str) -> float | None:
    value = (record.get(key) or {}).get(w)
    return value["all"] if isinstance(value, dict) else value


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _spread(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(max(values) - min(values)) if values else None


def _curves(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Eval steps and held-out losses (evals, seeds), NaN past a divergence."""
    steps = sorted({int(s) for r in records for s, _ in r["heldout_loss"]})
    table = np.full((len(steps), len(records)), np.nan)
    index = {s: i for i, s in enumerate(steps)}
    for j, r in enumerate(records):
        for s, v in r["heldout_loss"]:
            table[index[int(s)], j] = v
    return np.asarray(steps), table


def steps_to_reach(records: list[dict], target: float) -> float:
    """Median over seeds of the first evaluated step whose held-out loss is <= target (inf: never)."""
    steps, table = _curves(records)
    if not len(steps):
        return float("inf")
    first = C.steps_to_reach(table, target)
    at = np.where(np.isfinite(first), steps[np.minimum(first, len(steps) - 1).astype(int)], np.inf)
    return float(np.median(at))


def by_lr(records: list[dict]) -> dict[str, dict]:
    """lr label -> the seeds' records at that lr (the best lambda's, if lambda was swept), ordered by lr."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        groups.setdefault(r["labels"]["lr"], {}).setdefault(r["labels"].get(LAMBDA_KEY), []).append(r)
    chosen = {}
    for lr, per_lambda in groups.items():
        lam = min(per_lambda, key=lambda k: float(np.median([_final(r) for r in per_lambda[k]])))
        chosen[lr] = {"lambda": lam, "records": per_lambda[lam]}
    return dict(sorted(chosen.items(), key=lambda kv: kv[1]["records"][0]["labels"]["lr_unet"]))


def analyse(records: list[dict]) -> dict[str, dict]:
    """The concept.json "methods" table from the cells' records (method -> numbers)."""
    per_method: dict[str, list[dict]] = {}
    for r in records:
        per_method.setdefault(r["labels"]["method"], []).append(r)
    table = {}
    for method, rows in per_method.items():
        lrs = by_lr(rows)
        stats = {}
        for lr, group in lrs.items():
            recs = group["records"]
            finals = [_final(r) for r in recs]
            stats[lr] = {
                "lr_unet": recs[0]["labels"]["lr_unet"], "lr_text": recs[0]["labels"]["lr_text"],
                "lambda": None if group["lambda"] is None else float(group["lambda"]),
                "median_final_heldout": float(np.median(finals)),
                "final_heldout": finals, "diverged_seeds": sum(r["status"] != "done" for r in recs),
                "fidelity": {w: _mean(_score(r, "fidelity", w) for r in recs) for w in _fusions(recs)},
                "adherence": {w: _mean(_score(r, "adherence", w) for r in recs) for w in _fusions(recs)},
            }
        best = min(stats, key=lambda lr: stats[lr]["median_final_heldout"])  # ties: the smaller lr
        table[method] = {"best_lr": best, "best_lr_unet": stats[best]["lr_unet"], "best_lambda": stats[best]["lambda"],
                         "final_heldout": stats[best]["median_final_heldout"], "seeds": len(lrs[best]["records"]),
                         "by_lr": stats,
                         "_records": lrs[best]["records"]}
    lora = table.get("lora")
    target = lora["final_heldout"] if lora else None
    lora_steps = steps_to_reach(lora["_records"], target) if lora else None
    for method, row in table.items():
        stats = row["by_lr"].values()
        steps = steps_to_reach(row.pop("_records"), target) if target is not None else None
        best = row["by_lr"][row["best_lr"]]
        row.update(
            steps_to_lora_final=steps,
            ratio_to_lora=steps / lora_steps if steps is not None and lora_steps else None,
            final_heldout_spread=_spread(s["median_final_heldout"] for s in stats),
            diverged_lrs=[lr for lr, s in row["by_lr"].items() if not np.isfinite(s["median_final_heldout"])],
            fidelity=best["fidelity"].get(TOP_FUSION), adherence=best["adherence"].get(TOP_FUSION),
            fidelity_by_fusion=best["fidelity"], adherence_by_fusion=best["adherence"],
            fidelity_spread=_spread(s["fidelity"].get(TOP_FUSION) for s in stats),
            adherence_spread=_spread(s["adherence"].get(TOP_FUSION) for s in stats))
    return table


def _fusions(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(w for r in records for w in (r.get("fidelity") or {})))


def best_curves(records: list[dict], table: dict[str, dict]) -> dict[str, dict]:
    """method -> steps and median / min / max held-out loss over seeds at its best lr (and lambda)."""
    out = {}
    for method, row in table.items():
        recs = [r for r in records if r["labels"]["method"] == method and r["labels"]["lr"] == row["best_lr"]
                and (row["best_lambda"] is None or float(r["labels"].get(LAMBDA_KEY)) == row["best_lambda"])]
        steps, values = _curves(recs)
        worst = C.as_worst(values)
        out[method] = {"steps": steps.tolist(), "median": np.median(worst, axis=1).tolist(),
                       "min": np.min(worst, axis=1).tolist(), "max": np.max(worst, axis=1).tolist()}
    return out


def _fmt(x, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not np.isfinite(x):
        return "never"
    return format(x, spec)


def table_markdown(table: dict[str, dict]) -> str:
    head = ["method", "best lr (x demo)", "lambda", "seeds", "final held-out", "steps to LoRA's final", "ratio to LoRA",
            "final held-out spread over lrs", "fidelity w=1", "adherence w=1", "fidelity spread", "adherence spread"]
    rows = []
    for method, r in table.items():
        spread = _fmt(r["final_heldout_spread"]) + (f" ({len(r['diverged_lrs'])} lr diverged)" if r["diverged_lrs"] else "")
        rows.append([method, r["best_lr"], _fmt(r["best_lambda"], "g"), str(r["seeds"]), _fmt(r["final_heldout"]),
                     _fmt(r["steps_to_lora_final"], "g"), _fmt(r["ratio_to_lora"], ".2f"), spread,
                     _fmt(r["fidelity"], ".3f"), _fmt(r["adherence"], ".3f"), _fmt(r["fidelity_spread"], ".3f"),
                     _fmt(r["adherence_spread"], ".3f")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def plot(path: Path, table: dict[str, dict], curves: dict[str, dict]) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from balora_diffusion.bench.outputs import save_figure

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.4))
    colours = {m: plt.get_cmap("tab10").colors[i % 10] for i, m in enumerate(table)}
    for method, c in curves.items():
        style = "--" if "balora" in method or method == "hilora" else "-"
        steps = np.asarray(c["steps"])
        axes[0].plot(steps, c["median"], style, color=colours[method], label=method, lw=2 if method == "lora" else 1.3)
        axes[0].fill_between(steps, np.minimum(c["min"], 1e3), np.minimum(c["max"], 1e3), color=colours[method],
                             alpha=0.12, lw=0)
    axes[0].set(title="held-out loss at the best lr (median, range over seeds)", xlabel="step", ylabel="held-out loss",
                yscale="log")
    axes[1].set_yscale("log")
    for ax, (key, title) in zip(axes[1:], (("median_final_heldout", "final held-out loss (median over seeds)"),
                                           ("fidelity", "concept fidelity, w = 1"),
                                           ("adherence", "prompt adherence, w = 1"))):
        for method, row in table.items():
            lrs = [s["lr_unet"] for s in row["by_lr"].values()]
            values = [s[key] if key == "median_final_heldout" else s[key].get(TOP_FUSION) for s in row["by_lr"].values()]
            values = [np.nan if v is None or not np.isfinite(v) else v for v in values]
            ax.plot(lrs, values, "o-", color=colours[method], label=method)
        ax.set(xscale="log", title=title, xlabel="UNet learning rate (missing point: diverged)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(path, fig)
    finally:
        plt.close(fig)


def _history(out: Path, entry: dict) -> list[dict]:
    """Every invocation of the benchmark in `out`, this one appended: an interrupted benchmark's
    wall time is the sum of the runs that trained cells."""
    path = out / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append(entry)
    write_json_atomic(path, history)
    return history


def run_bench(plan: Plan, out: Path, max_minutes: float | None = None) -> dict:
    """Train the cells that are not finished (all of one seed before the next, so that a benchmark
    stopped by `max_minutes` has every method), then analyse the finished ones."""
    from balora_diffusion.experiments.cell import cell_result
    from balora_diffusion.experiments.sweep import check_sweep_folder, expand, run_cells, scoring_settings, write_summary

    check_writable(out / "concept.json")
    configs = sweep_configs(plan, out)
    cells = sorted((cell for config in configs for cell in expand(config)), key=lambda c: c.labels["seed"])
    check_sweep_folder(Path(configs[0].out), cells)
    scoring = scoring_settings(configs[0], cells)
    todo = sum(cell_result(Path(c.values["output_dir"])) is None for c in cells)
    load_start, started = os.getloadavg()[0], time.perf_counter()
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    finished = [(c, r) for c, r in zip(cells, run_cells(configs[0], cells, scoring, deadline)) if r is not None]
    if not finished:
        raise UserError(f"no cell of the benchmark finished within --max-minutes {max_minutes:g}")
    records = [r for _, r in finished]
    history = _history(out, {"trained_cells": todo - (len(cells) - len(finished)),
                             "wall_time_s": round(time.perf_counter() - started, 1),
                             "workers": plan.workers, "load_average_start": load_start,
                             "load_average_end": os.getloadavg()[0], "cpu_count": os.cpu_count(),
                             "python": platform.python_version(), "torch": torch.__version__})
    worked = [h for h in history if h["trained_cells"]]
    concept = load_concept(paths.DEMO_CONCEPT)
    protocol = {"plan": asdict(plan), "commands": [sweep_command(c) for c in configs], "scoring": scoring,
                "prompts": {"eval": len(concept.eval_prompts), "unseen": plan.unseen_contexts},
                "cells": len(cells), "finished_cells": len(finished), "wall_time_s": round(sum(h["wall_time_s"] for h in worked), 1),
                "runs": worked,
                "cell_seconds": round(sum(r["wall_seconds"] for r in records), 1),
                "cpu_seconds": round(sum(r["cpu_seconds"] for r in records), 1),
                "best_lr": "per method, the lr with the smallest median final held-out loss over seeds; "
                           "for ilora/pilora each lr keeps the lambda with the smallest median",
                "steps_to_lora_final": "median over seeds of the first evaluated step at which the held-out loss "
                                       "is <= LoRA's median final held-out loss at LoRA's best lr"}
    write_summary(out, protocol, [c for c, _ in finished], records, configs[0].fusions)
    table = analyse(records)
    curves = best_curves(records, table)
    write_json_atomic(out / "concept.json", {"methods": table, "curves": curves, "protocol": protocol})
    with atomic_path(out / "concept.md") as tmp:
        tmp.write_text(table_markdown(table), encoding="utf-8")
    plot(out / "concept.png", table, curves)
    return {"methods": table, "protocol": protocol}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: concept.json, concept.md, concept.png, the sweep's summary and "
                             "cells/ (one run folder per cell; rerunning continues an interrupted benchmark)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: {', '.join(QUICK.methods)}, {len(QUICK.lrs)} lrs, "
                             f"{QUICK.steps} steps, one seed ({QUICK.cells()} cells, about a minute)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no cell after this many minutes and analyse the finished ones (seeds are "
                             "trained in turn, so every method has its first seeds); rerun to finish the rest")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"cells trained at once (default {FULL.workers}; --quick {QUICK.workers})")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    plan = QUICK if args.quick else FULL
    if args.workers is not None:
        if args.workers < 1:
            raise UserError(f"--workers must be >= 1, got {args.workers}")
        plan = replace(plan, workers=args.workers)
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be > 0, got {args.max_minutes:g}")
    result = run_bench(plan, args.out, args.max_minutes)
    print(table_markdown(result["methods"]))
    p = result["protocol"]
    print(f"wall time {p['wall_time_s']:.0f} s; {p['finished_cells']} of {p['cells']} cells finished; "
          f"wrote {args.out / 'concept.json'}, concept.md, concept.png, summary.md, grid.png")
    return 0
