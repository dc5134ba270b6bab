"""Iterate quantizers (Corollary 2): quantized solver iterates ``z_{k+1} = T(z_k) + e_k``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monquant.quant.uniform import QuantizationError

__all__ = ["AdaptiveCellQuantizer", "FixedCellQuantizer"]


@dataclass(frozen=True)
class FixedCellQuantizer:
    """Iterate quantizer with a fixed cell width ``h``: ``z -> h round(z / h)``.

    Per-step error ``||e_k|| <= sqrt(n) h / 2`` (Corollary 2: constant error, a ball of radius
    ``e / (1 - rho)``).
    """

    width: float

    def __call__(self, z_prev: torch.Tensor, z_next: torch.Tensor, k: int) -> torch.Tensor:
        return self.width * torch.round(z_next / self.width)

    def error_bound(self, k: int, n: int) -> float:
        return math.sqrt(n) * self.width / 2.0


@dataclass(frozen=True)
class AdaptiveCellQuantizer:
    """Quantize the increment with a geometrically shrinking cell width ``h_k = h_0 s^k``.

    ``z_{k+1} = z_k + h_k round((T(z_k) - z_k) / h_k)``: the errors ``||e_k|| <= sqrt(n) h_k / 2``
    are summable, so the iterates converge to the exact equilibrium (Corollary 2).
    """

    width: float
    shrink: float

    def __post_init__(self) -> None:
        if not 0 < self.shrink < 1:
            raise QuantizationError(f"shrink must be in (0, 1), got {self.shrink}")

    def cell(self, k: int) -> float:
        return self.width * self.shrink**k

    def __call__(self, z_prev: torch.Tensor, z_next: torch.Tensor, k: int) -> torch.Tensor:
        h = self.cell(k)
        return z_prev + h * torch.round((z_next - z_prev) / h)

    def error_bound(self, k: int, n: int) -> float:
        return math.sqrt(n) * self.cell(k) / 2.0
