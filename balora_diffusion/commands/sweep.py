"""`balora sweep`: a grid of trainings (methods x learning rates x seeds x options), one run folder each."""
from __future__ import annotations

import argparse
from pathlib import Path

from balora_diffusion.experiments.sweep import SweepConfig, run_sweep
from balora_diffusion.config import add_config_arguments, config_from_args
from balora_diffusion.run_layout import GRID, SUMMARY, SUMMARY_TABLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Example: balora sweep --config my.toml --methods lora balora --lrs 0.5 1 2 --seeds 0 1 "
        "--set ilora_lambda=1,10 --out runs/sweep --workers 2. Every option can also be set in a sweep TOML "
        "given with --sweep (keys are the option names with underscores); flags override it. Each cell is a "
        "balora train run folder DIR/METHOD-lrLR-...-sSEED with cell.json (its scores) and cell.log; the sweep "
        "writes DIR/summary.json, summary.md and grid.png. Rerunning the command skips finished cells and "
        "resumes interrupted ones. Cells are scored from pixels on the world concept (concept.toml), else with "
        "balora eval's metrics (--clip DIR, --metrics clip-t clip-i dino); --sort-by orders summary.md; "
        "`balora results --sweep DIR --out PAGE` writes the sweep's verdict page.")
    add_config_arguments(parser, SweepConfig, file_flag="--sweep")


def run(args: argparse.Namespace) -> int:
    sweep = config_from_args(SweepConfig, args, file_flag="--sweep")
    records = run_sweep(sweep)
    diverged = sum(r["status"] == "diverged" for r in records)
    grid = f", {GRID}" if (Path(sweep.out) / GRID).is_file() else ""
    print(f"{len(records)} cells ({diverged} diverged); wrote {sweep.out}/{SUMMARY}, {SUMMARY_TABLE}{grid}")
    return 0
