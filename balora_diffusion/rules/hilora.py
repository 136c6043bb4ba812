"""Hard iLoRA: the balanced projection applied to (A, sqrt(rho) B), B then scaled back.

The result keeps B A and satisfies iLoRA's target A A^T = rho B^T B exactly; the gauge
change is the same G as for the scaled pair.
"""
from __future__ import annotations

import math

import torch

from balora_diffusion.rules.balora import Balanced, balance_with_gauge, compute_dtype


def hard_imbalance_with_gauge(A: torch.Tensor, B: torch.Tensor, rho: float | None = None,
                              align: bool = True, tol: float = 1e-6) -> Balanced:
    if rho is None:
        rho = A.shape[-2] / B.shape[-2]
    c = math.sqrt(rho)
    B_wide = B.to(compute_dtype(A, B))
    out = balance_with_gauge(A, c * B_wide, align, tol)
    # where the pair was skipped, return B itself rather than (c B) / c, which may round
    return out._replace(B=torch.where(out.ok[..., None, None], out.B / c, B_wide))


def hard_imbalance_projection(A: torch.Tensor, B: torch.Tensor, rho: float | None = None,
                              align: bool = True, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2, B2) with B2 A2 = B A and A2 A2^T = rho B2^T B2 (rho defaults to r / m), in the inputs' dtype."""
    out = hard_imbalance_with_gauge(A, B, rho, align, tol)
    return out.A.to(A.dtype), out.B.to(B.dtype)
