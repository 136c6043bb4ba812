"""Riemannian-preconditioned ("scaled") LoRA (Zhang & Pilanci 2024), applied to the gradients before the base step.

grad_A <- (B^T B + reg I)^-1 grad_A and grad_B <- grad_B (A A^T + reg I)^-1, with both
r x r matrices built from the pre-step factors. The Gram matrices and their inverses are
formed in float64 (they square the factors' condition numbers); with reg = 0 the
pseudo-inverse keeps B = 0 at peft's init from producing infinities.
"""
from __future__ import annotations

import torch

from balora_diffusion.rules.balora import check_pair_shapes, compute_dtype


def _regularized_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    if reg == 0:
        return torch.linalg.pinv(gram, hermitian=True)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(gram + reg * eye))


def precondition_grads(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                       reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Preconditioned (grad_A, grad_B) for A (..., r, n), B (..., m, r), in the gradients' dtype."""
    check_pair_shapes(A, B)
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    dtype = compute_dtype(A, B, grad_A, grad_B)
    A64, B64 = A.double(), B.double()
    inv_BB = _regularized_inverse(B64.mT @ B64, reg).to(dtype)
    inv_AA = _regularized_inverse(A64 @ A64.mT, reg).to(dtype)
    new_A = inv_BB @ grad_A.to(dtype)
    new_B = grad_B.to(dtype) @ inv_AA
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)
