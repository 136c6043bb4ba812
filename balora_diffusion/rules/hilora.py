"""Hard iLoRA: the balanced projection applied to (A, sqrt(rho) B), B then scaled back.

The result keeps B A and satisfies iLoRA's target A A^T = rho B^T B exactly; the gauge
change is the same G as for the scaled pair.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from balora_diffusion.rules.balora import Balanced, balance_many, compute_dtype


def hard_imbalance_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], rho: float | None = None,
                        align: bool = True, tol: float = 1e-6) -> list[Balanced]:
    """hard_imbalance_with_gauge of each (A, B), their r x r algebra batched as in balance_many."""
    scales = [math.sqrt(A.shape[-2] / B.shape[-2] if rho is None else rho) for A, B in pairs]
    wide = [B.to(compute_dtype(A, B)) for A, B in pairs]
    outs = balance_many([(A, c * B) for (A, _), c, B in zip(pairs, scales, wide)], align, tol)
    # where a pair was skipped, return B itself rather than (c B) / c, which may round
    return [out._replace(B=torch.where(out.ok[..., None, None], out.B / c, B))
            for out, c, B in zip(outs, scales, wide)]


def hard_imbalance_with_gauge(A: torch.Tensor, B: torch.Tensor, rho: float | None = None,
                              align: bool = True, tol: float = 1e-6) -> Balanced:
    return hard_imbalance_many([(A, B)], rho, align, tol)[0]


def hard_imbalance_projection(A: torch.Tensor, B: torch.Tensor, rho: float | None = None,
                              align: bool = True, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2, B2) with B2 A2 = B A and A2 A2^T = rho B2^T B2 (rho defaults to r / m), in the inputs' dtype."""
    out = hard_imbalance_with_gauge(A, B, rho, align, tol)
    return out.A.to(A.dtype), out.B.to(B.dtype)
