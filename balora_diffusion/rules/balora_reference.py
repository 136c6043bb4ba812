"""Plain BaLoRA projection: one pair at a time, float64, the SVD of the full m x n product.

Slow and memory-hungry on purpose: it shares no code path with balora.py, so the two
agreeing is evidence that the QR route is right.
"""
from __future__ import annotations

import torch


def _project_one(A: torch.Tensor, B: torch.Tensor, align: bool, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    if S.numel() < r or not S[r - 1] > tol * S[0]:
        return A, B
    root = S[:r].sqrt()
    A_new = root[:, None] * Vh[:r]
    B_new = U[:, :r] * root[None, :]
    if align:
        agree = (A_new * A).sum(dim=1) + (B_new * B).sum(dim=0)
        sign = torch.where(agree < 0, -1.0, 1.0).to(A.dtype)
        A_new, B_new = sign[:, None] * A_new, B_new * sign[None, :]
    return A_new, B_new


def balanced_projection_reference(A: torch.Tensor, B: torch.Tensor, align: bool = True,
                                  tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    A64, B64 = A.double(), B.double()
    flat_A = A64.reshape(-1, *A.shape[-2:])
    flat_B = B64.reshape(-1, *B.shape[-2:])
    outs = [_project_one(a, b, align, tol) for a, b in zip(flat_A, flat_B)]
    A_new = torch.stack([a for a, _ in outs]).reshape(A.shape)
    B_new = torch.stack([b for _, b in outs]).reshape(B.shape)
    return A_new.to(A.dtype), B_new.to(B.dtype)
