"""BaLoRA: move a LoRA pair along its gauge orbit to the balanced point.

(A, B) -> (G A, B G^-1) leaves the product B @ A unchanged; the balanced
("hyperbalanced") representative has A A^T = B^T B = diag(singular values of B A).
It is reached through r x r float64 algebra only, never forming the m x n product:

    A A^T = LA LA^T,  B^T B = LB LB^T        (Cholesky: RA = LA^T, RB = LB^T are the R of
                                              thin QRs of A^T and B, without the Q)
    LB^T LA = U S Vh                         (B A = QB (RB RA^T) QA^T)
    G = sqrt(S) Vh LA^-1,  G^-1 = LB^-T U sqrt(S),  A' = G A,  B' = B G^-1

Batched Cholesky on the Grams instead of batched QR on the factors: on an H100,
torch.linalg.qr over a batch of (768 x 4) matrices took ~7 ms where the Gram and its
Cholesky took ~0.1 ms. The Grams square the factors' condition numbers, so they are
formed in float64 from the (float32 or narrower) factors: exact enough for any pair
the rank cutoff lets through.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Balanced(NamedTuple):
    """A projection's result in compute dtype, and its gauge change.

    `ok` (leading dims) marks the pairs that were projected; elsewhere A, B are the
    inputs and G = G_inv = I (float64), so moment buffers can be carried uniformly.
    """

    A: torch.Tensor
    B: torch.Tensor
    G: torch.Tensor
    G_inv: torch.Tensor
    ok: torch.Tensor


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input already is: half precision is never used for the math."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_pair_shapes(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() < 2 or B.dim() < 2 or A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"expected A (..., r, n) and B (..., m, r) with equal leading dims, "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")


def _unchanged(A: torch.Tensor, B: torch.Tensor) -> Balanced:
    lead, r = A.shape[:-2], A.shape[-2]
    eye = torch.eye(r, dtype=torch.float64, device=A.device).expand(*lead, r, r)
    return Balanced(A, B, eye, eye, torch.zeros(lead, dtype=torch.bool, device=A.device))


def _cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors, with the identity (and a True flag) where the Gram is singular or not finite."""
    L, info = torch.linalg.cholesky_ex(gram)
    bad = (info != 0) | ~torch.isfinite(L).all(dim=-1).all(dim=-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.where(bad[..., None, None], eye, L), bad


def balance_with_gauge(A: torch.Tensor, B: torch.Tensor, align: bool = True, tol: float = 1e-6) -> Balanced:
    """The balanced projection of A (..., r, n), B (..., m, r) in compute dtype, with its gauge change.

    Pairs whose product has smallest singular value <= tol * largest (B = 0 at peft's
    init, rank-deficient products, non-finite values) are left as they are: projecting
    them would zero the missing components for good.
    """
    check_pair_shapes(A, B)
    dtype = compute_dtype(A, B)
    r, m, n = A.shape[-2], B.shape[-2], A.shape[-1]
    if r > min(m, n):  # the product has rank < r for every element: nothing to project
        return _unchanged(A.to(dtype), B.to(dtype))

    A64, B64 = A.double(), B.double()
    LA, bad_A = _cholesky(A64 @ A64.mT)
    LB, bad_B = _cholesky(B64.mT @ B64)
    U, S, Vh = torch.linalg.svd(LB.mT @ LA)
    if align:
        # <A'_i, A_i> + <B'_:i, B_:i> = sqrt(S_i) [(Vh LA^T)_ii + (U^T LB^T)_ii]: the sign of each
        # component that keeps it closest to the input, read off the r x r factors.
        agree = (Vh * LA).sum(-1) + (U * LB.mT).sum(-2)
        sign = torch.where(agree < 0, -1.0, 1.0).to(S.dtype)
        U, Vh = U * sign.unsqueeze(-2), Vh * sign.unsqueeze(-1)

    ok = ~bad_A & ~bad_B & (S[..., -1] > tol * S[..., 0])  # also False for all-zero and NaN products
    keep = ~ok[..., None, None]
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    root = torch.where(ok.unsqueeze(-1), S.sqrt(), 1.0)
    G = torch.linalg.solve_triangular(LA, root.unsqueeze(-1) * Vh, upper=False, left=False)
    G_inv = torch.linalg.solve_triangular(LB.mT, U * root.unsqueeze(-2), upper=True)
    G, G_inv = torch.where(keep, eye, G), torch.where(keep, eye, G_inv)
    # the products in float64 too: G is as ill-conditioned as the pair is imbalanced
    A_new = torch.where(keep, A64, G @ A64).to(dtype)
    B_new = torch.where(keep, B64, B64 @ G_inv).to(dtype)
    return Balanced(A_new, B_new, G, G_inv, ok)


def balanced_projection(A: torch.Tensor, B: torch.Tensor, align: bool = True,
                        tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2, B2) with B2 A2 = B A and A2 A2^T = B2^T B2 = diag(S), in the inputs' dtype.

    align=True flips each component's sign to agree with the input, so a balanced pair
    is a fixed point; align=False keeps the SVD's arbitrary signs.
    """
    out = balance_with_gauge(A, B, align, tol)
    return out.A.to(A.dtype), out.B.to(B.dtype)
