"""`balora demo`: train the shipped demo concept on the shipped model, then show it in new contexts.

The README's main job. It trains with the shipped demo config (BaLoRA by default), then draws
the concept's evaluation prompts without (w = 0) and with (w = 1) the adapter, and scores both
with the concept's pixel fidelity (printed, and in demo.json), so "did it learn the concept?" has
a number, not only a picture.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from balora_diffusion import paths
from balora_diffusion.config import flag_values, parse_flag, read_toml
from balora_diffusion.train_config import TrainConfig

SEEDS = [1, 2, 3]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest = the TrainConfig option each flag sets, so flag_values parses and checks it like `balora train`'s
    parser.add_argument("--output-dir", default=None, help="run folder (default: the config's, else runs/demo)")
    parser.add_argument("--method", default=None, help="update rule (default: the config's, balora)")
    parser.add_argument("--steps", default=None, help="training steps (default: the config's)")
    parser.add_argument("--seeds", nargs="*", default=None,
                        help=f"sampling seeds of the final grid (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--overwrite", default=None, metavar="BOOL",
                        help="start over in a run folder that holds an earlier demo (default: false)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: finish an interrupted demo")
    parser.add_argument("--config", type=Path, default=Path("demo"),
                        help="training config: a TOML file or a shipped config's name (default: demo); "
                             "without a data_dir it trains the shipped concept")


def run(args: argparse.Namespace) -> int:
    values = {"output_dir": "runs/demo", **read_toml(TrainConfig, args.config), **flag_values(TrainConfig, args)}
    cfg = TrainConfig(**{**values, "data_dir": values.get("data_dir") or str(paths.DEMO_CONCEPT)})
    seeds = SEEDS if args.seeds is None else parse_flag(TrainConfig, "grid_seeds", args.seeds, "--seeds")

    from balora_diffusion.atomic import write_json_atomic
    from balora_diffusion.collector import libraries_loading
    from balora_diffusion.concept import fidelity, load_concept

    with libraries_loading():
        from balora_diffusion.generate import generate, write_grid
        from balora_diffusion.train import train

    concept = load_concept(cfg.data_dir)
    cfg = replace(cfg, token=[concept.token], init_word=concept.initializer,
                  grid_prompts=cfg.grid_prompts or list(concept.eval_prompts[:3]))

    out = train(cfg)

    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.models import load_pipeline

    # A fresh pipeline with the saved adapter: what a user loading the files would get.
    pipe = load_pipeline(cfg.base_model or None)
    fused = Fused(pipe, [(read_adapter(out), 1.0)])
    prompts = list(concept.eval_prompts)
    rows, labels, scores = [], [], {}
    for w in (0.0, 1.0):
        fused.set_fusion(w)
        images = generate(pipe, prompts, seeds, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
        scores[w] = [fidelity(img, concept) for row in images for img in row]
        rows.extend(images)
        labels.extend(f"w={w:g}: {p}" for p in prompts)
    grid = write_grid(out / "demo.png", rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds],
                      title=f"{concept.token} ({cfg.method}, {cfg.steps} steps): top LoRA off (w=0, the learned token "
                            "kept), bottom LoRA on (w=1)")
    means = {w: sum(vals) / len(vals) for w, vals in scores.items()}
    for w, vals in scores.items():
        print(f"fidelity at w={w:g}: mean {means[w]:.3f} over {len(vals)} images")
    write_json_atomic(out / "demo.json", {
        "method": cfg.method, "steps": cfg.steps, "prompts": prompts, "seeds": list(seeds),
        "fidelity_mean": {f"{w:g}": m for w, m in means.items()},
        "fidelity": {f"{w:g}": vals for w, vals in scores.items()}})
    print(f"demo grid: {grid}")
    return 0
