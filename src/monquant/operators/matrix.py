"""Spectral constants of a dense weight matrix ``W`` (the monotone operator ``z -> (I - W) z``).

A MonDEQ layer with weight ``W`` is well posed when its linear part ``I - W`` is strongly monotone:

    margin(W) = lmin(sym(I - W)) > 0,        sym(M) = (M + M^T) / 2.

The Winston-Kolter parameterization builds such a ``W`` from free parameters:

    W = (1 - m) I - A^T A + B - B^T    =>    sym(I - W) = m I + A^T A >= m I.

``L(W) = ||I - W||`` (spectral norm) is the Lipschitz constant and ``kappa = L / m`` the condition
number. A quantized ``W~`` is "just another operator": every function here takes any square ``W``.
Spectral quantities are computed in float64 for certification; callers get Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monquant.errors import MonquantError

__all__ = [
    "OperatorError",
    "SpectralStats",
    "all_finite",
    "check_weight",
    "lipschitz",
    "margin",
    "margin_tensor",
    "spectral_norm",
    "spectral_stats",
    "wk_weight",
]


class OperatorError(MonquantError, ValueError):
    """A weight matrix that cannot define a MonDEQ operator (shape, non-finite entries...)."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A NaN or infinite entry makes the sum NaN or
    infinite, so a finite sum proves it in one reduction; only a sum that overflows (finite but
    huge entries) falls back to the entrywise test."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_weight(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    """Validate that ``W`` is a finite, square, floating-point matrix; return it unchanged."""
    if not isinstance(W, torch.Tensor):
        raise OperatorError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise OperatorError(f"{name} must be a square matrix, got shape {tuple(W.shape)}")
    if W.shape[0] == 0:
        raise OperatorError(f"{name} must not be empty")
    if not W.is_floating_point():
        raise OperatorError(f"{name} must be floating point, got {W.dtype}")
    if not all_finite(W):
        bad = int((~torch.isfinite(W)).sum())
        raise OperatorError(f"{name} has {bad} non-finite (NaN or inf) entries")
    return W


def wk_weight(A: torch.Tensor, B: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    """Winston-Kolter parameterization ``W = (1 - m) I - A^T A + B - B^T``.

    ``A`` is ``r x n`` (any rank ``r``), ``B`` is ``n x n`` and ``m > 0`` the margin; then
    ``sym(I - W) = m I + A^T A`` so ``margin(W) >= m`` for every value of ``A`` and ``B``.
    Differentiable in all three arguments.
    """
    n = B.shape[0]
    eye = torch.eye(n, dtype=B.dtype, device=B.device)
    return (1 - m) * eye - A.T @ A + B - B.T


def _sym_i_minus(W: torch.Tensor) -> torch.Tensor:
    W64 = W.detach().to(torch.float64)
    M = torch.eye(W.shape[0], dtype=torch.float64, device=W.device) - W64
    return 0.5 * (M + M.T)


def margin(W: torch.Tensor) -> float:
    """Monotonicity margin ``margin(W) = lmin(sym(I - W))`` (float64 eigenvalue; docs/theory.md section 1).

    ``> 0`` iff ``z -> (I - W) z`` is strongly monotone, i.e. the MonDEQ has a unique equilibrium.
    """
    check_weight(W)
    return float(torch.linalg.eigvalsh(_sym_i_minus(W))[0])


def margin_tensor(W: torch.Tensor) -> torch.Tensor:
    """``margin(W) = lmin(sym(I - W))`` as a differentiable tensor in ``W``'s dtype.

    For penalties during training (gradients flow through the symmetric eigenvalue problem);
    use :func:`margin` for certification (float64, a Python float).
    """
    S = torch.eye(W.shape[0], dtype=W.dtype, device=W.device) - W
    return torch.linalg.eigvalsh(0.5 * (S + S.T))[0]


def spectral_norm(M: torch.Tensor) -> float:
    """Largest singular value ``||M||`` in float64."""
    return float(torch.linalg.matrix_norm(M.detach().to(torch.float64), ord=2))


def lipschitz(W: torch.Tensor) -> float:
    """Lipschitz constant ``L(W) = ||I - W||`` (spectral norm, float64; docs/theory.md section 1)."""
    check_weight(W)
    eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
    return spectral_norm(eye - W.detach().to(torch.float64))


@dataclass(frozen=True)
class SpectralStats:
    """``m = margin(W)``, ``L = ||I - W||``, ``norm_W = ||W||`` and ``kappa = L / m``.

    ``kappa`` is ``inf`` when ``m <= 0`` (no monotone structure, nothing is certified).
    ``exact`` is ``True`` when the values come from a full eigen/singular value computation of the
    operator (float64), ``False`` for one-sided iterative estimates (power iteration, Lanczos),
    which are labelled as such and never decide a certificate.
    """

    m: float
    L: float
    norm_W: float
    exact: bool = True

    @property
    def kappa(self) -> float:
        return self.L / self.m if self.m > 0 else math.inf

    @property
    def monotone(self) -> bool:
        return self.m > 0

    def as_dict(self) -> dict[str, float]:
        return {"m": self.m, "L": self.L, "norm_W": self.norm_W, "kappa": self.kappa}


def spectral_stats(W: torch.Tensor) -> SpectralStats:
    """All spectral constants of ``W`` at once (float64)."""
    check_weight(W)
    return SpectralStats(m=margin(W), L=lipschitz(W), norm_W=spectral_norm(W))
