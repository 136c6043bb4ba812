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

import math
from collections.abc import Sequence
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


class Gauge(NamedTuple):
    """The gauge change of a batch of pairs, from their Grams alone (float64, leading dims of the Grams)."""

    G: torch.Tensor
    G_inv: torch.Tensor
    ok: torch.Tensor


def grams(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A A^T and B^T B in float64: they square the factors' condition numbers."""
    A64, B64 = A.double(), B.double()
    return A64 @ A64.mT, B64.mT @ B64


def _svd(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a batch of r x r cores. On CUDA, for r > 32, cuSOLVER's default loops over the batch
    (tens of ms for a UNet's pairs); its batched gesvda is fast but Gram-based, so it is kept only
    where its U and V come out orthonormal to 1e-10, and the accurate driver redoes the rest."""
    if core.device.type != "cuda" or core.shape[-1] <= 32:
        return torch.linalg.svd(core)
    U, S, Vh = torch.linalg.svd(core, driver="gesvda")
    eye = torch.eye(core.shape[-1], dtype=core.dtype, device=core.device)
    error = torch.maximum((U.mT @ U - eye).abs().amax((-2, -1)), (Vh @ Vh.mT - eye).abs().amax((-2, -1)))
    redo = ~(error <= 1e-10)  # NaN too
    if bool(redo.any()):
        U[redo], S[redo], Vh[redo] = torch.linalg.svd(core[redo])
    return U, S, Vh


def balance_gauge(gram_A: torch.Tensor, gram_B: torch.Tensor, align: bool = True, tol: float = 1e-6) -> Gauge:
    """G with G A, B G^-1 balanced, for pairs given by their float64 Grams A A^T and B^T B (..., r, r).

    Everything is r x r, so pairs of any (m, n) with the same r can go through one batched call.
    """
    r = gram_A.shape[-1]
    LA, bad_A = _cholesky(gram_A)
    LB, bad_B = _cholesky(gram_B)
    U, S, Vh = _svd(LB.mT @ LA)
    if align:
        # <A'_i, A_i> + <B'_:i, B_:i> = sqrt(S_i) [(Vh LA^T)_ii + (U^T LB^T)_ii]: the sign of each
        # component that keeps it closest to the input, read off the r x r factors.
        agree = (Vh * LA).sum(-1) + (U * LB.mT).sum(-2)
        sign = torch.where(agree < 0, -1.0, 1.0).to(S.dtype)
        U, Vh = U * sign.unsqueeze(-2), Vh * sign.unsqueeze(-1)

    ok = ~bad_A & ~bad_B & (S[..., -1] > tol * S[..., 0])  # also False for all-zero and NaN products
    keep = ~ok[..., None, None]
    eye = torch.eye(r, dtype=torch.float64, device=gram_A.device)
    root = torch.where(ok.unsqueeze(-1), S.sqrt(), 1.0)
    G = torch.linalg.solve_triangular(LA, root.unsqueeze(-1) * Vh, upper=False, left=False)
    G_inv = torch.linalg.solve_triangular(LB.mT, U * root.unsqueeze(-2), upper=True)
    return Gauge(torch.where(keep, eye, G), torch.where(keep, eye, G_inv), ok)


def apply_gauge(A: torch.Tensor, B: torch.Tensor, gauge: Gauge) -> Balanced:
    """(G A, B G^-1) in compute dtype, the skipped pairs (ok False) returned as they are."""
    dtype = compute_dtype(A, B)
    keep = ~gauge.ok[..., None, None]
    # the products in float64 too: G is as ill-conditioned as the pair is imbalanced
    A64, B64 = A.double(), B.double()
    A_new = torch.where(keep, A64, gauge.G @ A64).to(dtype)
    B_new = torch.where(keep, B64, B64 @ gauge.G_inv).to(dtype)
    return Balanced(A_new, B_new, gauge.G, gauge.G_inv, gauge.ok)


def projectable(A: torch.Tensor, B: torch.Tensor) -> bool:
    """False when r > min(m, n): the product has rank < r for every element, nothing to project."""
    check_pair_shapes(A, B)
    return A.shape[-2] <= min(B.shape[-2], A.shape[-1])


def balance_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], align: bool = True,
                 tol: float = 1e-6) -> list[Balanced]:
    """balance_with_gauge of each (A, B), with the r x r algebra of all pairs of equal rank and
    device in one batched call: a UNet's pairs come in a handful of shapes but one or two ranks,
    and each call of the small linear algebra costs launches, not arithmetic."""
    out: list[Balanced | None] = [None] * len(pairs)
    by_core: dict[tuple, list[int]] = {}
    for i, (A, B) in enumerate(pairs):
        if projectable(A, B):
            by_core.setdefault((A.shape[-2], A.device), []).append(i)
        else:
            dtype = compute_dtype(A, B)
            out[i] = _unchanged(A.to(dtype), B.to(dtype))
    for (r, _), index in by_core.items():
        gram_A, gram_B = zip(*(grams(*pairs[i]) for i in index))
        leads = [g.shape[:-2] for g in gram_A]
        gauge = balance_gauge(torch.cat([g.reshape(-1, r, r) for g in gram_A]),
                              torch.cat([g.reshape(-1, r, r) for g in gram_B]), align, tol)
        sizes = [math.prod(lead) for lead in leads]
        for i, lead, G, G_inv, ok in zip(index, leads, *(t.split(sizes) for t in gauge)):
            out[i] = apply_gauge(*pairs[i], Gauge(G.reshape(*lead, r, r), G_inv.reshape(*lead, r, r),
                                                  ok.reshape(lead)))
    return out


def balance_with_gauge(A: torch.Tensor, B: torch.Tensor, align: bool = True, tol: float = 1e-6) -> Balanced:
    """The balanced projection of A (..., r, n), B (..., m, r) in compute dtype, with its gauge change.

    Pairs whose product has smallest singular value <= tol * largest (B = 0 at peft's
    init, rank-deficient products, non-finite values) are left as they are: projecting
    them would zero the missing components for good.
    """
    return balance_many([(A, B)], align, tol)[0]


def balanced_projection(A: torch.Tensor, B: torch.Tensor, align: bool = True,
                        tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2, B2) with B2 A2 = B A and A2 A2^T = B2^T B2 = diag(S), in the inputs' dtype.

    align=True flips each component's sign to agree with the input, so a balanced pair
    is a fixed point; align=False keeps the SVD's arbitrary signs.
    """
    out = balance_with_gauge(A, B, align, tol)
    return out.A.to(A.dtype), out.B.to(B.dtype)
