"""A LoRA pair as the rules see it: the two factor parameters of one adapted layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class LoRAPair:
    """A (..., r, n) and B (..., m, r), so that the layer's update is s * B @ A.

    conv=True: peft's Conv LoRA, A of shape (r, in, *kernel) and B of shape (out, r, 1, ...);
    the rules act on the flattened (r, in * prod(kernel)) and (out, r) matrices.
    Without conv, A and B may carry equal leading batch dims (independent pairs stacked
    in one parameter).
    """

    A: torch.nn.Parameter
    B: torch.nn.Parameter
    name: str = ""
    conv: bool = False

    def __post_init__(self) -> None:
        A, B = self.A, self.B
        if self.conv:
            good = A.dim() >= 3 and B.dim() == A.dim() and B.shape[1] == A.shape[0] and all(
                k == 1 for k in B.shape[2:])
        else:
            good = A.dim() >= 2 and B.dim() == A.dim() and A.shape[-2] == B.shape[-1] and A.shape[:-2] == B.shape[:-2]
        if not good:
            kind = "conv " if self.conv else ""
            raise ValueError(f"LoRA pair {self.name!r}: {kind}factors of shapes A {tuple(A.shape)} and "
                             f"B {tuple(B.shape)} do not form a product B @ A")

    def a_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like A (the factor, its grad, its moments) as the matrix the rules see."""
        return t.reshape(t.shape[0], -1) if self.conv else t

    def b_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like B as the matrix the rules see."""
        return t.reshape(t.shape[0], t.shape[1]) if self.conv else t
