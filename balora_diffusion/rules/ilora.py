"""iLoRA's decoupled imbalance step (Zhu et al.), applied after the base optimizer's step.

With M = A A^T - rho B^T B, the step A -= lr lam M A, B += lr lam rho B M is exactly a
gradient step of size lr on (lam / 4) ||M||_F^2, pulling the pair towards A A^T = rho B^T B.
"""
from __future__ import annotations

import torch

from balora_diffusion.rules.balora import check_pair_shapes, compute_dtype


def imbalance_step(A: torch.Tensor, B: torch.Tensor, lr: float, lam: float,
                   rho: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoupled step on A (..., r, n), B (..., m, r); rho defaults to r / m."""
    check_pair_shapes(A, B)
    if rho is None:
        rho = A.shape[-2] / B.shape[-2]
    dtype = compute_dtype(A, B)
    A32, B32 = A.to(dtype), B.to(dtype)
    M = A32 @ A32.mT - rho * (B32.mT @ B32)
    A_new = A32 - (lr * lam) * (M @ A32)
    B_new = B32 + (lr * lam * rho) * (B32 @ M)
    return A_new.to(A.dtype), B_new.to(B.dtype)
