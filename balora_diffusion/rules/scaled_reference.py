"""Scaled LoRA by its closed form: one pair at a time, float64, explicit solves (pinv when reg = 0)."""
from __future__ import annotations

import torch


def _apply_inverse(gram: torch.Tensor, rhs: torch.Tensor, reg: float) -> torch.Tensor:
    if reg == 0:
        return torch.linalg.pinv(gram) @ rhs
    return torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


def precondition_grads_reference(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                                 reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    r, n, m = A.shape[-2], A.shape[-1], B.shape[-2]
    flat = [t.double().reshape(-1, *t.shape[-2:]) for t in (A, B, grad_A, grad_B)]
    out_A, out_B = [], []
    for a, b, ga, gb in zip(*flat):
        out_A.append(_apply_inverse(b.T @ b, ga, reg))
        out_B.append(_apply_inverse(a @ a.T, gb.T, reg).T)  # (A A^T) is symmetric
    new_A = torch.stack(out_A).reshape(*A.shape[:-2], r, n)
    new_B = torch.stack(out_B).reshape(*B.shape[:-2], m, r)
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)
