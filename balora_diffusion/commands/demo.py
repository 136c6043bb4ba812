"""`balora demo`: train the shipped demo concept on the shipped model, then show it in new contexts.

The README's main job. It trains with the shipped demo config (BaLoRA by default), then draws
the concept's evaluation prompts without (w = 0) and with (w = 1) the adapter, and scores both
with the concept's pixel fidelity (printed, and in demo.json), so "did it learn the concept?" has
a number, not only a picture.

With --fusion it trains both shipped concepts (<zorb>, <quax>) the same way, fuses them into one
adapter by gradient fusion (`balora fuse`'s default) and draws both tokens with the fused adapter
and with each concept's own: what `balora fuse` keeps of each, on the user's machine.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from balora_diffusion import paths
from balora_diffusion.config import flag_values, parse_flag, read_toml
from balora_diffusion.run_layout import CHECKPOINTS, DEMO_GRID, DEMO_RECORD, RUN
from balora_diffusion.train_config import TrainConfig

SEEDS = [1, 2, 3]
FUSION_CONCEPTS = (paths.DEMO_CONCEPT, paths.RING_CONCEPT)
# eval prompts per concept shown in the --fusion figure (all of them are scored)
FIGURE_PROMPTS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest = the TrainConfig option each flag sets, so flag_values parses and checks it like `balora train`'s
    parser.add_argument("--output-dir", default=None,
                        help="run folder (default: the config's, else runs/demo, or runs/demo-fusion with --fusion)")
    # not dest "fusion": that is TrainConfig's list of fusion coefficients, which flag_values would read
    parser.add_argument("--fusion", dest="two_concepts", action="store_true",
                        help="train both shipped concepts (<zorb>, <quax>) into OUTPUT_DIR/zorb and OUTPUT_DIR/quax "
                             "(a finished training there is reused, an interrupted one continued), fuse them by "
                             "gradient fusion into OUTPUT_DIR/fused and draw both tokens with the fused adapter and "
                             "with each concept's own (OUTPUT_DIR/demo-fusion.png, scores in demo-fusion.json)")
    parser.add_argument("--method", default=None, help="update rule (default: the config's, balora)")
    parser.add_argument("--steps", default=None, help="training steps, of each concept with --fusion (default: "
                                                     "the config's)")
    parser.add_argument("--seeds", nargs="*", default=None,
                        help=f"sampling seeds of the final grid (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--overwrite", default=None, metavar="BOOL",
                        help="start over in a run folder that holds an earlier demo (default: false)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: finish an interrupted demo")
    parser.add_argument("--config", type=Path, default=Path("demo"),
                        help="training config: a TOML file or a shipped config's name (default: demo); "
                             "without a data_dir it trains the shipped concept")


def run(args: argparse.Namespace) -> int:
    if args.two_concepts:
        return run_fusion(args)
    values = {"output_dir": "runs/demo", **read_toml(TrainConfig, args.config), **flag_values(TrainConfig, args)}
    cfg = TrainConfig(**{**values, "data_dir": values.get("data_dir") or str(paths.DEMO_CONCEPT)})
    seeds = SEEDS if args.seeds is None else parse_flag(TrainConfig, "grid_seeds", args.seeds, "--seeds")

    from balora_diffusion.atomic import write_json_atomic
    from balora_diffusion.collector import libraries_loading
    from balora_diffusion.concept import fidelity, load_concept

    with libraries_loading():
        from balora_diffusion.generate import write_grid
        from balora_diffusion.train import train

    concept = load_concept(cfg.data_dir)
    cfg = replace(cfg, token=[concept.token], init_word=concept.initializer,
                  grid_prompts=cfg.grid_prompts or list(concept.eval_prompts[:3]))

    out = train(cfg)

    from balora_diffusion.formats.read import read_adapter

    # A fresh pipeline with the saved adapter: what a user loading the files would get.
    drawer = demo_drawer(cfg).hold([(read_adapter(out), 1.0)])
    prompts = list(concept.eval_prompts)
    rows, labels, scores = [], [], {}
    for w in (0.0, 1.0):
        images = drawer.draw(prompts, seeds, w)
        scores[w] = [fidelity(img, concept) for row in images for img in row]
        rows.extend(images)
        labels.extend(f"w={w:g}: {p}" for p in prompts)
    grid = write_grid(out / DEMO_GRID, rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds],
                      title=f"{concept.token} ({cfg.method}, {cfg.steps} steps): top LoRA off (w=0, the learned token "
                            "kept), bottom LoRA on (w=1)")
    means = {w: sum(vals) / len(vals) for w, vals in scores.items()}
    for w, vals in scores.items():
        print(f"fidelity at w={w:g}: mean {means[w]:.3f} over {len(vals)} images")
    write_json_atomic(out / DEMO_RECORD, {
        "method": cfg.method, "steps": cfg.steps, "prompts": prompts, "seeds": list(seeds),
        "fidelity_mean": {f"{w:g}": m for w, m in means.items()},
        "fidelity": {f"{w:g}": vals for w, vals in scores.items()}})
    print(f"demo grid: {grid}")
    return 0


def demo_drawer(cfg: TrainConfig):
    """A draw.Drawer on a fresh pipeline of cfg's base model, sampling as cfg's validation grid does."""
    from balora_diffusion.draw import Drawer, Sampling
    from balora_diffusion.models import load_pipeline

    return Drawer(load_pipeline(cfg.base_model or None), Sampling(steps=cfg.sample_steps, guidance=cfg.guidance_scale))


def finished(cfg: TrainConfig) -> bool:
    """Does cfg.output_dir hold a finished training of `cfg` (its run.json, written last, with the same
    steps and every option a resume must keep)? Then --fusion reuses it instead of training again."""
    from balora_diffusion.errors import UserError
    from balora_diffusion.runfolder import check_resumable

    path = Path(cfg.output_dir) / RUN
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["steps"] != cfg.steps:
            return False
        check_resumable(saved["config"], cfg, path.parent)
    except (ValueError, KeyError, TypeError, UserError):
        return False
    return True


def train_or_reuse(cfg: TrainConfig) -> str:
    """Train `cfg`, go on from its folder's newest checkpoint, or keep its finished run; which of the three."""
    from balora_diffusion import checkpoint as ckpt
    from balora_diffusion.train import train

    if not cfg.overwrite and finished(cfg):
        return "reused"
    resume = not cfg.overwrite and ckpt.newest_intact(Path(cfg.output_dir) / CHECKPOINTS)[0] is not None
    train(replace(cfg, resume="latest" if resume else ""))
    return "continued" if resume else "trained"


def run_fusion(args: argparse.Namespace) -> int:
    from balora_diffusion.errors import UserError

    values = {"output_dir": "runs/demo-fusion", **read_toml(TrainConfig, args.config),
              **flag_values(TrainConfig, args)}
    if values.get("data_dir"):
        raise UserError("--fusion trains the two shipped concepts: give a config without a data_dir")
    if values.get("resume") not in (None, "", "latest"):
        raise UserError("--fusion continues each interrupted training from its newest checkpoint by itself: "
                        "--resume takes no checkpoint folder with it")
    root = Path(values["output_dir"])
    base = TrainConfig(**{**values, "data_dir": str(FUSION_CONCEPTS[0]), "resume": ""})
    seeds = SEEDS if args.seeds is None else parse_flag(TrainConfig, "grid_seeds", args.seeds, "--seeds")

    from balora_diffusion.atomic import write_json_atomic
    from balora_diffusion.collector import libraries_loading
    from balora_diffusion.concept import fidelity, load_concept

    with libraries_loading():
        from balora_diffusion.commands.fuse import (
            DEFAULT_MAX_RANK,
            DEFAULT_RIDGE,
            DEFAULT_STEPS,
            describe_fused,
            read_concepts,
            write_fused,
        )
        from balora_diffusion.formats.read import read_adapter
        from balora_diffusion.generate import write_grid

    concepts, outs, how = [], [], {}
    for folder in FUSION_CONCEPTS:
        concept = load_concept(folder)
        cfg = replace(base, data_dir=str(folder), token=[concept.token], init_word=concept.initializer,
                      grid_prompts=list(concept.eval_prompts[:3]), output_dir=str(root / folder.name))
        how[concept.token] = train_or_reuse(cfg)
        print(f"{concept.token}: {how[concept.token]} in {cfg.output_dir}")
        concepts.append(concept)
        outs.append(Path(cfg.output_dir))

    specs = [(str(out), 1.0) for out in outs]
    parts = read_concepts(specs, "gradient", max_rank=DEFAULT_MAX_RANK, rank=None, lines=None)
    started = time.perf_counter()
    # A fresh pipeline: what a user loading the files would get.
    drawer = demo_drawer(base)
    fused_out = root / "fused"
    # layer inputs recorded as `balora fuse` does, with no more sampling steps than the demo draws with
    adapter, report, seconds = write_fused(drawer.pipe, parts, specs, fused_out, "gradient", rank=None, ridge=DEFAULT_RIDGE,
                                           steps=min(DEFAULT_STEPS, base.sample_steps), seeds=[1], started=started)
    print(describe_fused(parts, adapter, report, "gradient", fused_out, seconds))

    adapters = [(f"{c.token} alone", read_adapter(out)) for c, out in zip(concepts, outs)]
    adapters.append(("fused", read_adapter(fused_out)))
    prompts = [list(c.eval_prompts) for c in concepts]
    rows, labels, scores = [], [], {}
    for label, one in adapters:
        with drawer.hold([(one, 1.0)]):
            scores[label] = {}
            for concept, own_prompts in zip(concepts, prompts):
                images = drawer.draw(own_prompts, seeds)
                scores[label][concept.token] = sum(fidelity(im, concept) for row in images for im in row) / (
                    len(own_prompts) * len(seeds))
                rows.extend(images[:FIGURE_PROMPTS])
                labels.extend(f"{label}: {p}" for p in own_prompts[:FIGURE_PROMPTS])
    grid = write_grid(root / "demo-fusion.png", rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds],
                      title=f"{' and '.join(c.token for c in concepts)} ({base.method}, {base.steps} steps each): each "
                            "concept's own adapter, then both in one adapter by gradient fusion")
    for concept in concepts:
        own = scores[f"{concept.token} alone"][concept.token]
        print(f"{concept.token}: fidelity {own:.3f} with its own adapter, {scores['fused'][concept.token]:.3f} "
              f"in the fused one (mean over {len(prompts[0]) * len(seeds)} images)")
    write_json_atomic(root / "demo-fusion.json", {
        "method": base.method, "steps": base.steps, "seeds": list(seeds), "trainings": how,
        "runs": {c.token: str(out) for c, out in zip(concepts, outs)}, "fused": str(fused_out),
        "fuse_seconds": seconds, "prompts": {c.token: p for c, p in zip(concepts, prompts)},
        "fidelity_mean": scores})
    print(f"demo grid: {grid}")
    return 0
