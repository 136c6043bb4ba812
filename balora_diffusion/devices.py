"""Choosing the torch device from a user's word ("auto", "cpu", "cuda", "cuda:N")."""
from __future__ import annotations

import torch

from balora_diffusion.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when one is usable, else the CPU; an explicit CUDA request
    without a usable GPU is a user error rather than a silent fall-back to a much slower run."""
    word = (name or "auto").strip().lower()
    if word == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if word == "cpu":
        return torch.device("cpu")
    if word == "cuda" or word.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but no CUDA GPU is usable here (try --device cpu)")
        try:
            device = torch.device(word)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
