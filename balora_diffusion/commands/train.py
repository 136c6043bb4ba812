"""`balora train`: train a concept LoRA (UNet + text encoder) with any update rule."""
from __future__ import annotations

import argparse

from balora_diffusion.config import add_config_arguments, config_from_args
from balora_diffusion.run_layout import BEST, DIFFUSERS_FOLDER, GRID, METRICS, SCORES_PLOT
from balora_diffusion.train_config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.paths import shipped_configs

    parser.epilog = ("Every option can also be set in a TOML file given with --config (keys are the option "
                     "names with underscores; relative paths in it are relative to the file); flags override "
                     "the file. Shipped configs can be named instead of a file: "
                     f"{', '.join(shipped_configs())}. "
                     "Under `accelerate launch` the same command trains on several processes.")
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, args)
    # only now: importing the loop (torch, diffusers) takes seconds a bad option should not wait for
    from balora_diffusion.collector import libraries_loading

    with libraries_loading():
        from balora_diffusion.train import train

    out = train(cfg)
    print(f"adapter written to {out / DIFFUSERS_FOLDER}; grid: {out / GRID}")
    if cfg.best_by:
        from balora_diffusion.checkpoint_scoring import read_best

        best = read_best(out)
        where = (f"step {best['step']} ({best['value']:.4f}), in every format in {out / BEST}" if best else
                 f"no scored step got a {cfg.best_by} score, so there is no {out / BEST}")
        print(f"best by {cfg.best_by}: {where}; scores at each checkpoint: {out / SCORES_PLOT}")
    elif cfg.eval_metrics:
        print(f"scores at each checkpoint: {out / SCORES_PLOT} (and eval/* in {out / METRICS})")
    return 0
