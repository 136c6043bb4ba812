"""The BaLoRA paper's synthetic least-squares problems (its Fig. 3), seeds batched on dim 0.

Every tensor carries a leading seed dimension S, so one LoRA parameter of shape
(S, r, n) holds S independent runs: Adam is elementwise and the update rules are
batched over leading dims, and `losses` returns one loss per seed (their sum is
what gets differentiated, which keeps the seeds' gradients separate).

LoRA init as in the paper: the input-side factor A is standard normal, the
output-side factor B is zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

Factors = Sequence[tuple[Tensor, Tensor]]  # (A (S, r, n), B (S, m, r)) per LoRA pair


def truncation_loss(residual: Tensor, rank: int) -> Tensor:
    """min over rank-`rank` X of 1/2 ||residual - X||_F^2 (Eckart-Young), batched over leading dims."""
    s = torch.linalg.svdvals(residual.double())
    return 0.5 * (s[..., rank:] ** 2).sum(-1)


def _draw(seeds: Sequence[int], shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Standard normal tensors, one generator per seed, stacked on dim 0 (float64)."""
    out: dict[str, list[Tensor]] = {k: [] for k in shapes}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        for key, shape in shapes.items():
            out[key].append(torch.randn(shape, generator=gen, dtype=torch.float64))
    return {k: torch.stack(v) for k, v in out.items()}


def _frob2(x: Tensor) -> Tensor:
    return 0.5 * (x ** 2).sum((-2, -1))


@dataclass(frozen=True)
class OneLayer:
    """Fit W0 + B A to Z; Z and W0 standard normal. Optimal loss: Eckart-Young on Z - W0."""

    z: Tensor
    w0: Tensor
    init: tuple[tuple[Tensor, Tensor], ...]
    name: str = "one_layer"

    @classmethod
    def make(cls, seeds: Sequence[int], m: int = 20, n: int = 20, rank: int = 4) -> "OneLayer":
        t = _draw(seeds, {"z": (m, n), "w0": (m, n), "a": (rank, n)})
        b = torch.zeros(len(seeds), m, rank, dtype=torch.float64)
        return cls(z=t["z"], w0=t["w0"], init=((t["a"], b),))

    @property
    def rank(self) -> int:
        return self.init[0][0].shape[-2]

    @property
    def optimum(self) -> Tensor:
        return truncation_loss(self.z - self.w0, self.rank)

    def losses(self, factors: Factors) -> Tensor:
        (a, b), = factors
        return _frob2(self.z - (self.w0 + b @ a))


@dataclass(frozen=True)
class TwoLayer:
    """Fit (W1 + B1 A1)(W2 + B2 A2) to T = (W1 + P1)(W2 + P2).

    W1, W2 have N(0, 1/n) entries (a unit-gain layer, so the product stays O(1));
    P_i = U_i V_i^T / sqrt(r n) with U, V standard normal is a planted rank-r
    perturbation with entries of the same N(0, 1/n) scale. B_i A_i = P_i is
    feasible, so the optimal loss is exactly 0.
    """

    target: Tensor
    w1: Tensor
    w2: Tensor
    planted: tuple[Tensor, Tensor]  # (P1, P2): a zero-loss solution B_i A_i = P_i
    init: tuple[tuple[Tensor, Tensor], ...]
    name: str = "two_layer"

    @classmethod
    def make(cls, seeds: Sequence[int], d: int = 20, rank: int = 4) -> "TwoLayer":
        t = _draw(seeds, {"w1": (d, d), "w2": (d, d), "u1": (d, rank), "v1": (d, rank),
                          "u2": (d, rank), "v2": (d, rank), "a1": (rank, d), "a2": (rank, d)})
        gain = 1.0 / math.sqrt(d)
        w1, w2 = t["w1"] * gain, t["w2"] * gain
        p1 = t["u1"] @ t["v1"].mT * (gain / math.sqrt(rank))
        p2 = t["u2"] @ t["v2"].mT * (gain / math.sqrt(rank))
        zero = torch.zeros(len(seeds), d, rank, dtype=torch.float64)
        return cls(target=(w1 + p1) @ (w2 + p2), w1=w1, w2=w2, planted=(p1, p2),
                   init=((t["a1"], zero), (t["a2"], zero.clone())))

    @property
    def optimum(self) -> Tensor:
        return torch.zeros(self.target.shape[0], dtype=torch.float64)

    def losses(self, factors: Factors) -> Tensor:
        (a1, b1), (a2, b2) = factors
        return _frob2(self.target - (self.w1 + b1 @ a1) @ (self.w2 + b2 @ a2))
