"""`balora bench overhead`: optimizer-step time of each method relative to plain torch AdamW.

The LoRA pairs are those of SD 1.5's attention projections (UNet to_q/k/v/out.0
and CLIP ViT-L/14 text encoder q/k/v/out_proj), with random factors (B non-zero,
so BaLoRA's projection is never skipped) and random gradients. Every method's
optimizer works on the same parameters with its own state. The baseline is a
bare `torch.optim.AdamW`, not the rules wrapper, so the "lora" row measures the
wrapper's own overhead. Methods run interleaved in rounds (rotating the order),
so a slow drift of the machine hits all of them alike; each step is timed
alone, between device synchronisations, with the gradients restored before it
(the preconditioning rules rewrite .grad in place in training, where backward
supplies fresh ones).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from balora_diffusion.bench.methods import METHOD_SPECS, METHODS_HELP
from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.bench.outputs import claim_out
from balora_diffusion.bench.sd15_shapes import text_encoder_shapes, unet_shapes
from balora_diffusion.bench.plans import add_plan_arguments, timing_plan
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag

BASELINE = "adamw"
LR = 1e-4
# Timing plans: a one-thread CPU step on all 176 pairs at rank 64 takes 0.1-1 s, a GPU step milliseconds.
PLANS = {
    "cuda": {"warmup": 5, "rounds": 10, "steps_per_round": 3},
    "cpu": {"warmup": 2, "rounds": 5, "steps_per_round": 2},
    "quick": {"warmup": 1, "rounds": 2, "steps_per_round": 1},
}


def sd15_shapes(quick: bool) -> list[tuple[str, int, int]]:
    """All SD 1.5 attention projections; with quick, the first of each distinct (out, in) shape."""
    shapes = [("unet." + n, m, k) for n, m, k in unet_shapes()] + \
             [("text_encoder." + n, m, k) for n, m, k in text_encoder_shapes()]
    if not quick:
        return shapes
    seen: dict[tuple[int, int], tuple[str, int, int]] = {}
    for s in shapes:
        seen.setdefault(s[1:], s)
    return list(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_factors(shapes: Sequence[tuple[str, int, int]], rank: int, device: torch.device, seed: int = 0):
    """Random (A, B) parameters with random gradients; returns (names, factors, saved grads)."""
    gen = torch.Generator().manual_seed(seed)
    factors, grads = [], []
    for _, m, n in shapes:
        a = torch.nn.Parameter((torch.randn(rank, n, generator=gen) / n ** 0.5).to(device))
        b = torch.nn.Parameter((torch.randn(m, rank, generator=gen) * 1e-2).to(device))
        for p in (a, b):
            g = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
            p.grad = g.clone()
            grads.append(g)
        factors.append((a, b))
    return [s[0] for s in shapes], factors, grads


def build_optimizers(labels: Sequence[str], names, factors) -> dict[str, torch.optim.Optimizer]:
    from balora_diffusion.rules import LoRAPair, build_optimizer

    params = [p for ab in factors for p in ab]
    pairs = [LoRAPair(A=a, B=b, name=n) for n, (a, b) in zip(names, factors)]
    opts: dict[str, torch.optim.Optimizer] = {BASELINE: torch.optim.AdamW(params, lr=LR)}
    for label in labels:
        method, overrides = METHOD_SPECS[label]
        opts[label] = build_optimizer(method, [{"params": params, "lr": LR}], pairs, base="adamw", **overrides)
    return opts


def time_steps(opts: dict[str, torch.optim.Optimizer], params, grads, device: torch.device,
               warmup: int, rounds: int, steps_per_round: int, bar: tqdm | None = None) -> dict[str, list[float]]:
    """Seconds per step for each optimizer, `rounds * steps_per_round` timed steps each."""
    def one_step(opt) -> float:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        return time.perf_counter() - start

    labels = list(opts)
    for label in labels:
        for _ in range(warmup):
            one_step(opts[label])
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            times[label].extend(one_step(opts[label]) for _ in range(steps_per_round))
            if bar is not None:
                bar.update()
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms/step (and IQR) per method; ratio = median / the AdamW baseline's median."""
    base = float(np.median(times[BASELINE]))
    out = {}
    for label, ts in times.items():
        q25, med, q75 = np.percentile(np.asarray(ts) * 1e3, [25, 50, 75])
        out[label] = {"ms_per_step": float(med), "ms_q25": float(q25), "ms_q75": float(q75),
                      "ratio": float(np.median(ts)) / base, "timed_steps": len(ts)}
    return out


def format_table(rank: int, rows: dict[str, dict[str, float]]) -> str:
    head = f"{'method':<24}{'ms/step':>10}{'IQR (ms)':>20}{'x AdamW':>9}"
    lines = []
    for m, r in rows.items():
        iqr = f"{r['ms_q25']:.3f}-{r['ms_q75']:.3f}"
        lines.append(f"{m:<24}{r['ms_per_step']:>10.3f}{iqr:>20}{r['ratio']:>9.2f}")
    return "\n".join([f"rank {rank}", head, "-" * len(head), *lines])


def _time_ranks(ranks: Sequence[int], labels: Sequence[str], shapes, device: torch.device,
                plan: dict[str, int]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with tqdm(total=len(ranks) * plan["rounds"] * (len(labels) + 1), unit="block") as bar:
        for rank in ranks:
            bar.set_postfix_str(f"rank {rank}")
            names, factors, grads = make_factors(shapes, rank, device)
            opts = build_optimizers(labels, names, factors)
            params = [p for ab in factors for p in ab]
            results[str(rank)] = summarize(time_steps(opts, params, grads, device, bar=bar, **plan))
            del opts, factors, grads  # free the optimizer states before the next rank
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 64], help="LoRA ranks to time (default: 4 64)")
    parser.add_argument("--device", default="auto",
                        help="where the parameters live: auto (a CUDA GPU when usable, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: one pair per distinct shape (7 instead of 176) and the quick plan")
    add_plan_arguments(parser, PLANS, {"warmup": "untimed warm-up steps per method", "rounds": "rounds over all methods",
                                          "steps_per_round": "timed steps per method in each round"})
    parser.add_argument("--methods", nargs="+", default=list(METHOD_SPECS), metavar="METHOD",
                        help=METHODS_HELP)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the per-parameter ops are small, and on a busy machine "
                             "a second thread made every step ~10x slower in our measurements)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write overhead.json into (optional)")
    add_overwrite_flag(parser, "an earlier overhead.json in --out")


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHOD_SPECS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_SPECS)}")
    if any(r < 1 for r in args.ranks):
        raise UserError(f"--ranks must be positive integers, got {args.ranks}")
    device = pick_device(args.device)
    labels = list(dict.fromkeys(args.methods))
    plan = timing_plan(PLANS, args, device)
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    shapes = sd15_shapes(args.quick)
    claim_out(args, ("overhead.json",))

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = _time_ranks(args.ranks, labels, shapes, device, plan)
    finally:
        torch.set_num_threads(threads)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": "float32",
        "lr": LR,
        "baseline": "torch.optim.AdamW (defaults, lr 1e-4) on the same parameters",
        "pairs": len(shapes),
        "shapes": [[n, m, k] for n, m, k in shapes],
        **plan,
        "ranks": results,
    }
    for rank in args.ranks:
        print(format_table(rank, results[str(rank)]))
        print()
    print(f"device {report['device']}, {len(shapes)} LoRA pairs, median of {plan['rounds'] * plan['steps_per_round']} "
          f"timed steps per method after {plan['warmup']} warm-up")
    if args.out is not None:
        print(f"wrote {write_json_atomic(Path(args.out) / 'overhead.json', report)}")
    return 0
