"""`balora bench synthetic`: the BaLoRA paper's one- and two-layer benchmark (its Fig. 3), every method.

For each experiment and method, every learning rate of the grid is run on all
seeds at once (the seeds are stacked into the leading dim of one LoRA parameter),
the learning rate with the smallest median final gap is kept, and its curves are
summarised. Outputs in --out: synthetic.json (results, keyed experiment ->
method), synthetic_protocol.json (everything needed to reproduce them) and
synthetic.png (median gap curves with inter-quartile bands).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from balora_diffusion.bench import curves as C
from balora_diffusion.bench.methods import METHOD_SPECS, METHODS_HELP, describe
from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.bench.outputs import claim_out
from balora_diffusion.bench.synthetic_problems import OneLayer, TwoLayer
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag

THRESHOLDS = {"steps_to_1e-2": 1e-2, "steps_to_1e-4": 1e-4}  # JSON key -> gap threshold
# Plain Adam: AdamW with weight decay 0 is exactly Adam (torch defaults otherwise).
BASE = "adamw"
BASE_KWARGS = {"weight_decay": 0.0}
QUICK_SEEDS = 2
QUICK_STEPS = 40


@dataclass(frozen=True)
class Experiment:
    name: str
    lrs: tuple[float, ...]
    steps: int
    seed_offset: int  # keeps the two experiments' random draws unrelated
    make: Callable[[Sequence[int]], OneLayer | TwoLayer]
    description: str

    def quick(self) -> "Experiment":
        n = len(self.lrs)
        lrs = tuple(self.lrs[i] for i in (0, n // 4, n // 2))  # the smallest keeps iLoRA's decoupled step stable
        return Experiment(self.name, lrs, QUICK_STEPS, self.seed_offset, self.make, self.description)


EXPERIMENTS = (
    Experiment("one_layer", tuple(np.linspace(5e-3, 5e-1, 20).tolist()), 100, 0, OneLayer.make,
               "fit W0 + B A to Z; Z, W0 20x20 standard normal; rank 4; A0 standard normal, B0 = 0; "
               "loss 1/2||Z - (W0 + B A)||_F^2; optimal loss 1/2 sum_{i>4} s_i(Z - W0)^2"),
    Experiment("two_layer", tuple(np.linspace(1e-5, 3e-1, 50).tolist()), 200, 1000, TwoLayer.make,
               "fit (W1 + B1 A1)(W2 + B2 A2) to T = (W1 + P1)(W2 + P2); 20x20; rank 4; W_i N(0, 1/20) entries; "
               "P_i = U_i V_i^T / sqrt(4 * 20), U_i, V_i standard normal (planted rank 4); "
               "A_i0 standard normal, B_i0 = 0; loss 1/2||T - product||_F^2; optimal loss 0"),
)


def run_curve(problem: OneLayer | TwoLayer, label: str, lr: float, steps: int) -> np.ndarray:
    """Gap curves (steps + 1, seeds) of one method at one learning rate; NaN after a divergence."""
    from balora_diffusion.rules import LoRAPair, build_optimizer

    factors = [(torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for a, b in problem.init]
    pairs = [LoRAPair(A=a, B=b, name=f"layer{i}") for i, (a, b) in enumerate(factors)]
    method, overrides = METHOD_SPECS[label]
    opt = build_optimizer(method, [{"params": [p for ab in factors for p in ab], "lr": lr}], pairs,
                          base=BASE, base_kwargs=dict(BASE_KWARGS), **overrides)
    optimum = problem.optimum
    gaps = np.full((steps + 1, optimum.shape[0]), np.nan)
    for t in range(steps + 1):
        losses = problem.losses(factors)
        gaps[t] = (losses.detach() - optimum).numpy()
        if t == steps or not torch.isfinite(losses).any():
            break
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        try:
            opt.step()
        except torch.linalg.LinAlgError:  # an SVD of non-finite factors: the run has diverged
            break
    return gaps


def summarize(lrs: Sequence[float], curves_by_lr: Sequence[np.ndarray]) -> dict:
    finals = np.stack([c[-1] for c in curves_by_lr])
    best = C.select_lr(finals)
    curves = curves_by_lr[best]
    median, q25, q75 = C.median_band(curves)
    return {
        "best_lr": float(lrs[best]),
        "median_final_gap": float(median[-1]),
        **{key: C.median_steps_to_reach(curves, thr) for key, thr in THRESHOLDS.items()},
        "q25_final_gap": float(q25[-1]),
        "q75_final_gap": float(q75[-1]),
        "median_final_gap_by_lr": np.median(C.as_worst(finals), axis=1).tolist(),
        "median_curve": median.tolist(),
        "q25_curve": q25.tolist(),
        "q75_curve": q75.tolist(),
        "seed_curves": curves.T.tolist(),  # [seed][step]: raw gaps at the best learning rate
    }


def sweep(experiment: Experiment, labels: Sequence[str], n_seeds: int, bar: tqdm) -> dict[str, dict]:
    problem = experiment.make([experiment.seed_offset + s for s in range(n_seeds)])
    results = {}
    for label in labels:
        bar.set_postfix_str(f"{experiment.name} {label}")
        curves_by_lr = []
        for lr in experiment.lrs:
            curves_by_lr.append(run_curve(problem, label, lr, experiment.steps))
            bar.update()
        results[label] = summarize(experiment.lrs, curves_by_lr)
    return results


def _fmt_steps(x: float) -> str:
    return "never" if not np.isfinite(x) else f"{x:g}"


def format_table(name: str, per_method: dict[str, dict]) -> str:
    head = f"{'method':<24}{'best lr':>10}{'median final gap':>18}{'steps to 1e-2':>15}{'steps to 1e-4':>15}"
    rows = [f"{m:<24}{r['best_lr']:>10.4g}{r['median_final_gap']:>18.3e}"
            f"{_fmt_steps(r['steps_to_1e-2']):>15}{_fmt_steps(r['steps_to_1e-4']):>15}"
            for m, r in per_method.items()]
    return "\n".join([name, head, "-" * len(head), *rows])


def protocol(experiments: Sequence[Experiment], labels: Sequence[str], n_seeds: int, quick: bool) -> dict:
    return {
        "quick": quick,
        "dtype": "float64",
        "base_optimizer": "torch.optim.AdamW with weight_decay=0 (= Adam), betas (0.9, 0.999), eps 1e-8",
        "lr_selection": "per method, the grid lr with the smallest median final gap over seeds (ties: smaller lr)",
        "steps_to": "median over seeds of the first step count whose gap is <= the threshold; null = never",
        "thresholds": THRESHOLDS,
        "methods": {label: describe(label) for label in labels},
        "experiments": {e.name: {"description": e.description, "steps": e.steps, "lrs": list(e.lrs),
                                 "seeds": [e.seed_offset + s for s in range(n_seeds)]} for e in experiments},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for synthetic.json, synthetic_protocol.json and synthetic.png")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: 3 learning rates per grid (its 1st, 1/4 and 1/2 points), {QUICK_STEPS} steps, "
                             f"{QUICK_SEEDS} seeds unless --seeds is given (seconds, not minutes)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of random seeds per experiment (default 8, {QUICK_SEEDS} with --quick)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_SPECS), metavar="METHOD",
                        help=METHODS_HELP)
    add_overwrite_flag(parser, "an earlier run's files in --out")


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHOD_SPECS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_SPECS)}")
    n_seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 8)
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {n_seeds}")
    labels = list(dict.fromkeys(args.methods))
    experiments = [e.quick() if args.quick else e for e in EXPERIMENTS]
    claim_out(args, ("synthetic.json", "synthetic_protocol.json", "synthetic.png"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 20x20 matrices: threads only add synchronisation cost
    start = time.perf_counter()
    try:
        with tqdm(total=sum(len(e.lrs) for e in experiments) * len(labels), unit="run") as bar:
            results = {e.name: sweep(e, labels, n_seeds, bar) for e in experiments}
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    from balora_diffusion.bench.plots import plot_gap_curves

    out: Path = args.out
    proto = protocol(experiments, labels, n_seeds, args.quick)
    proto["wall_time_s"] = round(elapsed, 1)
    write_json_atomic(out / "synthetic.json", results)
    write_json_atomic(out / "synthetic_protocol.json", proto)
    plot_gap_curves(out / "synthetic.png", results)
    for e in experiments:
        print(format_table(f"{e.name}: {e.steps} steps, {n_seeds} seeds, {len(e.lrs)} learning rates",
                           results[e.name]))
        print()
    print(f"wall time {elapsed:.1f} s; wrote {out / 'synthetic.json'}, synthetic_protocol.json, synthetic.png")
    return 0
