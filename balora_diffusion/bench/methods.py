"""The benchmarked methods: a label -> (rules method string, build_optimizer keyword overrides).

Shared by the synthetic and the overhead benchmarks so both measure the same list.
Everything not overridden uses build_optimizer's defaults (LoRA+ ratio 16,
scaled reg 1e-6, iLoRA lambda 1 and rho = r / m, projection every step, tol 1e-6).
"""
from __future__ import annotations

from typing import Any

from balora_diffusion.rules.registry import NAMED_METHODS

# what is measured beside a named method, right after it: combinations and BaLoRA's options
_BESIDE: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "scaled": {"scaled+loraplus": ("scaled+loraplus", {})},
    "balora": {
        "balora-unaligned": ("balora", {"align": False}),
        "balora-reset_once": ("balora", {"state": "reset_once"}),
        "balora-carry": ("balora", {"state": "carry"}),
        "balora+scaled": ("balora+scaled", {}),
        "balora+loraplus": ("balora+loraplus", {}),
        "balora+scaled+loraplus": ("balora+scaled+loraplus", {}),
    },
}
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    label: spec for named in NAMED_METHODS for label, spec in {named: (named, {}), **_BESIDE.get(named, {})}.items()
}


def describe(label: str) -> dict[str, Any]:
    method, overrides = METHOD_SPECS[label]
    return {"method": method, **overrides}


METHODS_HELP = ("methods (default: all): " + ", ".join(METHOD_SPECS) + ". Names are the rules' method names; "
                "balora-unaligned is BaLoRA without sign alignment, balora-reset_once / balora-carry use that "
                "optimizer-state mode instead of keeping Adam's buffers")
