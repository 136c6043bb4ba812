"""How many CPU threads torch uses, chosen one way by every command.

torch starts one intra-op thread per core. A step of a model as small as the shipped one is
thousands of small kernels, and the threads of each meet at a barrier: on an idle machine a second
thread saves little, and beside other busy processes a thread that the scheduler has parked holds
every barrier up, so the step falls off a cliff (docs/results/contention.md). The automatic choice
is therefore one thread for a small model and torch's own default for a large one (SD 1.5), whose
kernels are big enough to share. `OMP_NUM_THREADS`, when the user set it, is left to rule.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable

# The shipped tiny model is a few million parameters, SD 1.5's UNet 860 million.
SMALL_MODEL_PARAMETERS = 100_000_000
HELP = ("torch CPU threads; 0 = automatic: 1 for a model as small as the shipped one (more fall off a cliff "
        "beside other busy processes), torch's default (one per core) for larger ones; OMP_NUM_THREADS, "
        "when set, is kept")


@functools.cache
def torch_default_threads() -> int:
    """torch's own choice, read before anything here changes it."""
    import torch

    return torch.get_num_threads()


def automatic_threads(parameters: int) -> int:
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch_default_threads()


def use_cpu_threads(requested: int, modules: Iterable) -> int:
    """Set torch's CPU threads: `requested` when above 0, else the automatic choice for the model
    made of `modules` (torch modules), unless `OMP_NUM_THREADS` says; returns the number in force."""
    import torch

    torch_default_threads()
    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(automatic_threads(sum(p.numel() for m in modules for p in m.parameters())))
    return torch.get_num_threads()
