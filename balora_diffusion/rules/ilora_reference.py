"""iLoRA's step by its definition: autograd's gradient of (lam / 4) ||A A^T - rho B^T B||_F^2, float64."""
from __future__ import annotations

import torch


def imbalance_step_reference(A: torch.Tensor, B: torch.Tensor, lr: float, lam: float,
                             rho: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if rho is None:
        rho = A.shape[-2] / B.shape[-2]
    with torch.enable_grad():
        A64 = A.detach().double().requires_grad_(True)
        B64 = B.detach().double().requires_grad_(True)
        M = A64 @ A64.mT - rho * (B64.mT @ B64)
        energy = lam / 4 * (M ** 2).sum()
        grad_A, grad_B = torch.autograd.grad(energy, (A64, B64))
    return (A64 - lr * grad_A).detach().to(A.dtype), (B64 - lr * grad_B).detach().to(B.dtype)
