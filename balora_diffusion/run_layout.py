"""The names of every file and folder of a run folder, of a checkpoint and of a sweep and its cells.

`balora train` writes a run folder; export, resume, eval, the sweep and the app find their way
in it through these names only. What each file holds stays with the module that writes it.
"""
from __future__ import annotations

# ---- a run folder (balora train --output-dir)
CONFIG = "config.json"              # the TrainConfig, written when training starts
RUN = "run.json"                    # the finished run's record (its config, timings, final values)
METRICS = "metrics.jsonl"           # every logged value, one line each
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"         # step-NNNNNNN folders (below)
DIFFUSERS_FOLDER = "adapter"        # the adapter in diffusers' layout, with the token embedding
KOHYA_FOLDER = "kohya"              # the same adapter as one kohya file
GRID = "grid.png"                   # the validation grid of the final adapter (also a sweep's grid)
STEP_GRIDS = "grid-step*.png"       # the grids drawn during training (--grid-every)
BEST = "best"                       # the best-scored adapter (--best-by), exported as it is found
BEST_RECORD = "best.json"           # in BEST: which step, by which metric, its scores
DEMO_GRID = "demo.png"              # `balora demo`'s images
DEMO_RECORD = "demo.json"
FUSE_RECORD = "fuse.json"           # `balora fuse`'s run folder: how its adapter was fused
# An OS lock (flock) on this file, not the file itself, says a training is running: the kernel
# drops it when its process dies, so a killed run never blocks the next one.
LOCK = ".balora.lock"
# Curves drawn from the metrics
LOSS_PLOT = "loss.png"
HELDOUT_PLOT = "heldout_loss.png"
BALANCE_PLOT = "balance.png"
SCORES_PLOT = "scores.png"          # --eval-metrics: redrawn at every scored step
PLOTS = (LOSS_PLOT, HELDOUT_PLOT, BALANCE_PLOT, SCORES_PLOT)
# A folder holding either of these is a run (listed by the app, found by `balora eval`)
RUN_MARKERS = (CONFIG, RUN)
# What a training (and the demo after it) writes into its folder: any of them means that the
# folder holds a run, and --overwrite true deletes exactly these (and STEP_GRIDS), never other files
# kept there. BEST is an output of the run: starting the run over deletes it with the rest.
RUN_OUTPUTS = (CHECKPOINTS, DIFFUSERS_FOLDER, KOHYA_FOLDER, RUN, CONFIG, METRICS, TENSORBOARD, GRID, *PLOTS,
               DEMO_GRID, DEMO_RECORD, BEST)


def step_grid(step: int) -> str:
    return f"grid-step{step:06d}.png"


# ---- a checkpoint (RUN/checkpoints/step-NNNNNNN/): each tree NAME as NAME.json + NAME.safetensors
CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"          # size and SHA-256 of every file of the checkpoint
TRAINABLE_TREE = "trainable"        # the trainable tensors by key ("unet.NAME", "text_encoder.NAME")
OPTIMIZER_TREE = "optimizer"
SCHEDULE_TREE = "schedule"          # the learning-rate schedule
META_TREE = "meta"                  # {"step": N}
CONFIG_TREE = "config"              # the TrainConfig: what a resume must not change
BEST_TREE = "best_so_far"           # --best-by: the best state scored up to this step


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


# ---- an evaluation (balora eval --out)
EVAL_RECORD = "eval.json"           # beside GRID

# ---- a sweep (balora sweep --out): its files, and one run folder per cell
SUMMARY = "summary.json"
SUMMARY_TABLE = "summary.md"
SUBMITIT = ".submitit"              # SLURM jobs' logs
SWEEP_FILES = (SUMMARY, SUMMARY_TABLE, GRID, SUBMITIT)
CELLS = "cells"                     # a benchmark's sweep, under the benchmark's --out
CELL_RECORD = "cell.json"           # a finished cell's record, beside the run's own files
CELL_LOG = "cell.log"               # a cell's training output
CELL_SAMPLE = "sample.png"          # one image of the cell's adapter, for the sweep's grid
# the images a world-concept cell was scored on; the same name as SCORES_PLOT, which a cell trained
# with --eval-metrics also writes
CELL_SCORED_IMAGES = "scores.png"


def cell_name(method: str, lr_label: str, options: dict[str, str], seed: int) -> str:
    """A cell's folder: method, learning rate, the swept options, seed, e.g. balora-lrx3-rank8-s0."""
    return "-".join([method, f"lr{lr_label.replace(':', '_')}", *(f"{k}{v}" for k, v in options.items()), f"s{seed}"])
