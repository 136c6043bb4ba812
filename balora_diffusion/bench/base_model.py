"""`balora bench base-model`: does a base model draw what the prompt says?

Every held-out scene of the procedural world (colour/background and shape/colour pairs never
seen in training) plus a fixed sample of training scenes is drawn with several seeds, and
world.classify() reads back the background colour, the object colour and the shape. The
held-out accuracies measure composition; the seen ones, fitting.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from balora_diffusion import world
from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.bench.outputs import claim_out
from balora_diffusion.errors import UserError
from balora_diffusion.draw import DEFAULT_GUIDANCE, DEFAULT_STEPS, Drawer, Sampling, model_parts
from balora_diffusion.generate import write_grid
from balora_diffusion.outputs import add_overwrite_flag

ATTRIBUTES = {"background": "background", "object": "colour", "shape": "shape"}  # classify key -> Scene field
SPLITS = ("heldout", "seen")
QUICK_HELDOUT, QUICK_SEEN = 6, 3
GRID_HELDOUT, GRID_SEEN, GRID_SEEDS = 12, 6, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="diffusers model folder (default: the shipped tiny model, assets/tiny-sd)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt, 1..N (default: %(default)s)")
    parser.add_argument("--seen", type=int, default=40,
                        help="number of training-split prompts drawn alongside (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write DIR/base_model.json (accuracies + every sample) and "
                        "DIR/base_model.png (labelled grid)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_HELDOUT} held-out and {QUICK_SEEN} seen prompts, one seed")
    add_overwrite_flag(parser, "an earlier run's files in --out")


def pick(items: list, n: int, seed: int = 0) -> list:
    """A fixed pseudo-random choice of n items, kept in their original order (all if n >= len).
    The world's scene lists vary size and position fastest, so an evenly spaced pick would
    show only one of them."""
    chosen = sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))
    return [items[i] for i in chosen]


def prompt_scenes(n_seen: int, quick: bool) -> list[tuple[str, world.Scene]]:
    heldout, seen = world.heldout_scenes(), pick(world.train_scenes(), n_seen)
    if quick:
        heldout, seen = pick(heldout, QUICK_HELDOUT), seen[:QUICK_SEEN]
    return [("heldout", s) for s in heldout] + [("seen", s) for s in seen]


def score(scene: world.Scene, measured: dict) -> dict[str, bool]:
    return {key: measured[key] == getattr(scene, field) for key, field in ATTRIBUTES.items()}


def summarise(records: list[dict]) -> dict[str, float | int | None]:
    """`<split>_<attribute>_accuracy` fractions and `<split>_samples` counts from per-sample records."""
    summary: dict[str, float | int | None] = {}
    for split in SPLITS:
        rows = [r for r in records if r["split"] == split]
        summary[f"{split}_samples"] = len(rows)
        for key in ATTRIBUTES:
            summary[f"{split}_{key}_accuracy"] = (sum(r["correct"][key] for r in rows) / len(rows)) if rows else None
    return summary


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.models import DEFAULT_MODEL_DIR, load_pipeline
    from balora_diffusion.threads import use_cpu_threads

    if args.seeds < 1 or args.steps < 1 or args.batch_size < 1 or args.seen < 0:
        raise UserError("--seeds, --steps and --batch-size must be >= 1 and --seen >= 0")
    claim_out(args, ("base_model.json", "base_model.png"))
    pipe = load_pipeline(args.model, args.device)
    use_cpu_threads(0, model_parts(pipe))
    jobs = prompt_scenes(args.seen, args.quick)
    seeds = [1] if args.quick else list(range(1, args.seeds + 1))
    images = Drawer(pipe, Sampling(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)).draw(
        [s.caption() for _, s in jobs], seeds)
    records = []
    for (split, scene), row in zip(jobs, images):
        for seed, image in zip(seeds, row):
            measured = world.classify(image)
            records.append({"split": split, "prompt": scene.caption(), "seed": seed,
                            "expected": {k: getattr(scene, f) for k, f in ATTRIBUTES.items()},
                            "measured": {k: measured[k] for k in ATTRIBUTES}, "correct": score(scene, measured)})
    summary = summarise(records)
    print(f"{'split':8} {'samples':>7} {'background':>10} {'object':>7} {'shape':>6}")
    for split in SPLITS:
        accs = [summary[f"{split}_{k}_accuracy"] for k in ATTRIBUTES]
        print(f"{split:8} {summary[f'{split}_samples']:7d} "
              + " ".join(f"{'-' if a is None else f'{a:.1%}':>{w}}" for a, w in zip(accs, (10, 7, 6))))
    if args.out is not None:
        model = str(args.model) if args.model is not None else str(DEFAULT_MODEL_DIR)
        write_json_atomic(args.out / "base_model.json",
                   {"model": model, "seeds": seeds, "steps": args.steps, "guidance_scale": args.guidance,
                    "scheduler": type(pipe.scheduler).__name__, **summary, "records": records})
        rows = [i for split, n in (("heldout", GRID_HELDOUT), ("seen", GRID_SEEN))
                for i in pick([i for i, (s, _) in enumerate(jobs) if s == split], n)]
        write_grid(args.out / "base_model.png", [images[i][:GRID_SEEDS] for i in rows],
                   [("* " if jobs[i][0] == "heldout" else "") + jobs[i][1].caption() for i in rows],
                   [f"seed {s}" for s in seeds[:GRID_SEEDS]],
                   title=f"{Path(model).name}: {args.steps} steps, guidance {args.guidance:g}; * = held-out pair")
        print(f"wrote {args.out / 'base_model.json'} and {args.out / 'base_model.png'}")
    return 0
