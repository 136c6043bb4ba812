"""Timing plans of the benchmarks: warm-up steps, rounds, steps per round, per device, overridable by flags."""
from __future__ import annotations

import argparse

import torch

from balora_diffusion.errors import UserError

KEYS = ("warmup", "rounds", "steps_per_round")


def add_plan_arguments(parser: argparse.ArgumentParser, plans: dict[str, dict[str, int]],
                       help_texts: dict[str, str]) -> None:
    for key in KEYS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, dest=key,
                            help=f"{help_texts[key]} (default per plan: " +
                                 ", ".join(f"{k} {v[key]}" for k, v in plans.items()) + ")")


def timing_plan(plans: dict[str, dict[str, int]], args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """The quick plan or the device's, with the flags given on top; a UserError for impossible ones."""
    plan = dict(plans["quick" if args.quick else device.type])
    for key in KEYS:
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if plan["warmup"] < 0 or plan["rounds"] < 1 or plan["steps_per_round"] < 1:
        raise UserError(f"need --warmup >= 0, --rounds >= 1 and --steps-per-round >= 1, got {plan}")
    return plan
