"""Gradient fusion in closed form: the math on plain tensors.

For one layer, concepts i = 1..n with updates dW_i = U_i A_i (U_i = w_i s_i B_i, the scaled up factor)
and recorded input Grams G_i = X_i X_i^T, the update that best reproduces every concept's own outputs
on its own inputs,

    dW* = argmin_dW  sum_i || dW X_i - dW_i X_i ||^2  =  (sum_i dW_i G_i) G^+,    G = sum_i G_i,

is again a LoRA product: dW* = [U_1 ... U_n] [A_1 G_1 G^+ ; ... ; A_n G_n G^+], of rank at most
sum_i r_i, with no decomposition needed. Directions no concept's input reaches (the null space of G)
get no update, as the minimum-norm least-squares solution has it. G is regularised by
ridge * trace(G) / d * I: a relative ridge means the same at any activation scale.

Everything runs in float64, whatever the dtype the factors arrive in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float64
# An eigenvalue of G below this share of the largest is rounding, not a direction the inputs reach:
# they are float32 activations, whose relative precision squared is about 1e-14.
SINGULAR = 1e-12


@dataclass
class LayerTerms:
    """What one layer contributes, summed over the concepts as their inputs are recorded: each
    concept's scaled up factor U_i and projected down factor A_i G_i, and G = sum_i G_i (a concept
    that leaves the layer alone still adds its G_i: its outputs there must stay the base's)."""

    ups: list[torch.Tensor]
    projected: list[torch.Tensor]
    gram: torch.Tensor


@dataclass
class FusedLayer:
    up: torch.Tensor          # (out, R) float64
    down: torch.Tensor        # (R, d) float64
    condition: float
    singular: bool


@dataclass
class Solved:
    """The down factors of a group of layers and what their Grams were like."""

    downs: torch.Tensor       # (L, R, d): the rows A_i G_i G^+ of each layer, stacked as given
    condition: torch.Tensor   # (L,): condition number of each layer's G (inf where singular)
    singular: torch.Tensor    # (L,) bool: G had fewer than d independent directions


def gram(inputs: torch.Tensor) -> torch.Tensor:
    """X X^T for columns X: `inputs` is (..., d), every leading position one column."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(DTYPE)
    return x.T @ x


def solve_downs(projected: torch.Tensor, grams: torch.Tensor, ridge: float) -> Solved:
    """`projected` (L, R, d) holds each layer's rows A_i G_i (zero rows as padding are fine),
    `grams` (L, d, d) each layer's G = sum_i G_i; layers of one input width, solved at once.

    Returns projected @ (G + ridge * tr(G)/d * I)^+ on the directions the inputs reach; the others
    get nothing (A_i G_i has no part there, so only rounding would be amplified)."""
    grams = grams.to(DTYPE)
    d = grams.shape[-1]
    values, vectors = torch.linalg.eigh((grams + grams.transpose(-1, -2)) / 2)
    largest = values[:, -1].clamp_min(0)
    reached = values > largest[:, None] * SINGULAR
    singular = ~reached[:, 0]
    condition = torch.where(singular, torch.full_like(largest, float("inf")), largest / values[:, 0])
    shifted = values + (ridge * torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1) / d)[:, None]
    inverse_values = torch.where(reached, 1.0 / torch.where(reached, shifted, torch.ones_like(shifted)),
                                 torch.zeros_like(shifted))
    inverse = (vectors * inverse_values[:, None, :]) @ vectors.transpose(-1, -2)
    return Solved(projected.to(DTYPE) @ inverse, condition, singular)


def solve_layers(layers: dict[str, LayerTerms], ridge: float) -> dict[str, FusedLayer]:
    """Every layer's fused factors: layers of equal input width are solved as one batch, their
    rows zero-padded to the widest (a zero row stays zero and is cut off again)."""
    by_width: dict[int, list[str]] = {}
    for name, terms in layers.items():
        by_width.setdefault(terms.gram.shape[-1], []).append(name)
    fused = {}
    for names in by_width.values():
        rows = [torch.cat([p.to(DTYPE) for p in layers[name].projected]) for name in names]
        padded = torch.zeros(len(names), max(r.shape[0] for r in rows), rows[0].shape[1], dtype=DTYPE)
        for k, r in enumerate(rows):
            padded[k, :r.shape[0]] = r
        solved = solve_downs(padded, torch.stack([layers[name].gram for name in names]), ridge)
        for k, name in enumerate(names):
            fused[name] = FusedLayer(torch.cat([u.to(DTYPE) for u in layers[name].ups], dim=1), solved.downs[k, :rows[k].shape[0]],
                                     float(solved.condition[k]), bool(solved.singular[k]))
    return fused


def truncate(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of up @ down (Eckart-Young) as balanced factors
    (up^T up = down down^T), and the relative Frobenius error it leaves.

    Works through QR of the two thin factors, so the SVD is of an R x R core, never of the
    full out x d product."""
    q_up, r_up = torch.linalg.qr(up.to(DTYPE))
    q_down, r_down = torch.linalg.qr(down.to(DTYPE).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    total = float(s.square().sum())
    lost = float(s[keep:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    return (q_up @ u[:, :keep]) * root, (root[:, None] * vh[:keep]) @ q_down.T, lost


def lossless_rank(up: torch.Tensor, down: torch.Tensor) -> int:
    """The rank at which up @ down is kept exactly: its factors' width, or the layer's smaller
    side when that is narrower (a product cannot have a higher rank)."""
    return min(up.shape[1], up.shape[0], down.shape[1])
