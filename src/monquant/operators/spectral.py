"""Iterative spectral estimates for operators too large for a dense eigendecomposition.

Power iteration on ``(I - W)^T (I - W)`` and on the shifted symmetric part gives *one-sided*
estimates: the computed ``L`` is a lower bound on ``||I - W||`` and the computed margin an upper
bound on ``lmin(sym(I - W))`` (Rayleigh quotients). They are returned with ``exact=False``: a solver
may use them to choose a step (PR and DR converge for every step), a certificate never.
"""

from __future__ import annotations

import math

import torch

from monquant.operators.base import MonotoneOperator
from monquant.operators.matrix import SpectralStats

__all__ = ["estimate_margin", "estimate_stats"]


def _power(matvec, shape: tuple[int, ...], dtype, device, iters: int) -> tuple[float, torch.Tensor]:
    v = torch.ones((1, *shape), dtype=dtype, device=device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        nrm = float(w.norm())
        if nrm == 0.0 or not math.isfinite(nrm):
            return 0.0, v
        lam = float((v * w).sum())
        v = w / nrm
    return lam, v


def estimate_stats(op: MonotoneOperator, iters: int = 50) -> SpectralStats:
    """One-sided estimates of ``m``, ``L``, ``||W||`` by power iteration (``exact=False``)."""
    shape, dt, dev = op.state_shape, op.dtype, op.device
    with torch.no_grad():

        def gram(v):
            r = v - op.apply(v)
            return r - op.apply_T(r)

        L2, _ = _power(gram, shape, dt, dev, iters)
        nW2, _ = _power(lambda v: op.apply_T(op.apply(v)), shape, dt, dev, iters)
    L = math.sqrt(max(L2, 0.0))
    return SpectralStats(m=estimate_margin(op, L, iters), L=L, norm_W=math.sqrt(max(nW2, 0.0)),
                         exact=False)  # fmt: skip


def estimate_margin(op: MonotoneOperator, L: float, iters: int = 50) -> float:
    """An estimate of ``margin(W) = lmin(S)``, ``S = sym(I - W)``, by power iteration on
    ``L I - S`` (positive semidefinite when ``L >= ||I - W|| >= ||S||``): a Rayleigh quotient, so
    an upper estimate of the margin, never a bound to decide on."""
    shape, dt, dev = op.state_shape, op.dtype, op.device

    def shifted(v):
        s = v - 0.5 * (op.apply(v) + op.apply_T(v))
        return L * v - s

    with torch.no_grad():
        top, _ = _power(shifted, shape, dt, dev, iters)
    return L - top
