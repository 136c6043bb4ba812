"""`balora inspect`: what an adapter file, adapter folder, run or checkpoint holds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="LoRA or embedding file (diffusers, peft, kohya), adapter folder, "
                                                "run folder or checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.atomic import json_safe
    from balora_diffusion.formats.inspect import render, summary
    from balora_diffusion.formats.read import read_adapter

    report = summary(read_adapter(args.path))
    print(json.dumps(json_safe(report), indent=2) if args.json else render(report))
    return 0
