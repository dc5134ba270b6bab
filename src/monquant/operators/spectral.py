"""Iterative spectral estimates for operators too large for a dense eigendecomposition.

Power iteration on ``(I - W)^T (I - W)`` and on the shifted symmetric part gives *one-sided*
estimates: the computed ``L`` is a lower bound on ``||I - W||`` and the computed margin an upper
bound on ``lmin(sym(I - W))`` (Rayleigh quotients). They are returned with ``exact=False``: a solver
may use them to choose a step (PR and DR converge for every step), a certificate never.
:func:`lanczos_extremes` estimates an extreme eigenvalue of explicit symmetric matrices; the
verified bounds use it only to place a shift that a factorization then proves or rejects.
"""

from __future__ import annotations

import math

import torch

from monquant.operators.base import MonotoneOperator
from monquant.operators.matrix import SpectralStats

__all__ = ["estimate_margin", "estimate_stats", "lanczos_extremes", "step_constants"]


def _power(
    matvec, shape: tuple[int, ...], dtype, device, iters: int, v: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """``iters`` power iterations of ``matvec`` from the unit ``v``: the last Rayleigh quotient and
    the unit vector reached. The default start is a fixed pseudo-random vector. (All ones, used
    before, lies in the zero-frequency subspace of a circular convolution, which the convolution
    maps to itself: the iteration never left it and estimated that block's constants only.)"""
    if v is None:
        g = torch.Generator().manual_seed(0)
        v = torch.randn((1, *shape), generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
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
    with torch.no_grad():
        L, _ = _lipschitz_power(op, iters)
        nW2, _ = _power(lambda v: op.apply_T(op.apply(v)), op.state_shape, op.dtype, op.device, iters)
    return SpectralStats(m=estimate_margin(op, L, iters), L=L, norm_W=math.sqrt(max(nW2, 0.0)),
                         exact=False)  # fmt: skip


def _lipschitz_power(
    op: MonotoneOperator, iters: int, v: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """``L`` from below by power iteration on ``(I - W)^T (I - W)``, and its vector."""

    def gram(u):
        r = u - op.apply(u)
        return r - op.apply_T(r)

    L2, v = _power(gram, op.state_shape, op.dtype, op.device, iters, v)
    return math.sqrt(max(L2, 0.0)), v


def _margin_power(
    op: MonotoneOperator, L: float, iters: int, v: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """``margin(W)`` from above by power iteration on ``L I - S``, and its vector."""

    def shifted(u):
        s = u - 0.5 * (op.apply(u) + op.apply_T(u))
        return L * u - s

    top, v = _power(shifted, op.state_shape, op.dtype, op.device, iters, v)
    return L - top, v


def estimate_margin(op: MonotoneOperator, L: float, iters: int = 50) -> float:
    """An estimate of ``margin(W) = lmin(S)``, ``S = sym(I - W)``, by power iteration on
    ``L I - S`` (positive semidefinite when ``L >= ||I - W|| >= ||S||``): a Rayleigh quotient, so
    an upper estimate of the margin, never a bound to decide on."""
    with torch.no_grad():
        return _margin_power(op, L, iters)[0]


def step_constants(
    op: MonotoneOperator, iters: int = 50, start: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
    """``(L, m, vectors)``: the estimates of :func:`estimate_stats` that a step needs (``L`` from
    below, ``m`` from above; no ``||W||``) and the two power-iteration vectors reached, continuing
    from ``start`` (vectors of an earlier call) when given. Nothing is certified by them."""
    with torch.no_grad():
        L, vL = _lipschitz_power(op, iters, None if start is None else start[0])
        m, vm = _margin_power(op, L, iters, None if start is None else start[1])
    return L, m, (vL, vm)


#: Steps after which :func:`lanczos_extremes` looks at its Ritz values (each look is one small
#: tridiagonal eigenproblem per matrix and one synchronization).
_LANCZOS_CHECKS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def lanczos_extremes(
    A: torch.Tensor, largest: list[bool], tol: list[float], max_steps: int = 256
) -> tuple[list[float], list[bool]]:
    """Estimates of ``lmax(A_i)`` (``largest[i]``) or ``lmin(A_i)`` for a batch ``(b, n, n)`` of
    symmetric matrices by the Lanczos process with full reorthogonalization, and whether each
    estimate settled: ``(estimates, converged)``.

    From a fixed random start ``q_1``, step ``j`` forms ``w = A q_j`` (as the row ``q_j^T A``: the
    matrix is symmetric), orthogonalizes it twice against ``q_1 .. q_j`` (classical Gram-Schmidt
    twice), and appends ``q_{j+1} = w / beta_j``; ``alpha_j = q_j^T A q_j`` and the ``beta_j``
    form the tridiagonal ``T_j = Q_j^T A Q_j``. An extreme Ritz value ``theta`` of ``T_j`` with
    Ritz vector ``s`` has residual ``rho = beta_j |s_j|``; with ``delta`` the gap to the next Ritz
    value, ``min(rho, rho^2 / delta)`` estimates ``|lambda - theta|`` (the ``rho^2 / delta`` is
    Kato-Temple's, with the Ritz gap standing in for the true one). Matrix ``i`` has settled when
    that is ``<= tol[i]``, or when ``beta_j`` vanishes (the Krylov space is invariant: its Ritz
    values are eigenvalues). Nothing here is proved: the extreme eigenvalue can be missed (a start
    with no component along its eigenvector), so a caller must verify what it builds on this.
    Device and dtype follow ``A``.
    """
    b, n = int(A.shape[0]), int(A.shape[-1])
    steps = max(1, min(int(max_steps), n))
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, 1, n, generator=g, dtype=torch.float64).to(device=A.device, dtype=A.dtype)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    Q = torch.empty(b, steps + 1, n, dtype=A.dtype, device=A.device)
    Q[:, :1] = q
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    est = [math.nan] * b  # every matrix is looked at by the last step at the latest
    settled = [False] * b
    size = torch.zeros(b, dtype=A.dtype, device=A.device)
    for j in range(steps):
        w = torch.bmm(q, A)  # (b, 1, n): q^T A = (A q)^T
        Qj = Q[:, : j + 1]
        h = torch.bmm(w, Qj.mT)
        w = w - torch.bmm(h, Qj)
        h2 = torch.bmm(w, Qj.mT)
        w = w - torch.bmm(h2, Qj)
        alphas.append(h[:, 0, j] + h2[:, 0, j])
        beta = torch.linalg.vector_norm(w, dim=-1)  # (b, 1)
        betas.append(beta[:, 0])
        size = torch.maximum(size, torch.maximum(alphas[-1].abs(), beta[:, 0]))  # <= ||A||
        k = j + 1
        beta_l, size_l = torch.stack([beta[:, 0], size]).tolist()  # the step's one synchronization
        # beta_j vanishing (relative to ||A||): the Krylov space is invariant
        gone = [i for i in range(b) if not settled[i] and not beta_l[i] > 1e-13 * size_l[i]]
        look = (
            [i for i in range(b) if not settled[i]]
            if (k in _LANCZOS_CHECKS or k == steps)
            else gone
        )
        if look:
            ritz, resid = _ritz(alphas, betas, look, [largest[i] for i in look])
            for i, th, (rho, gap) in zip(look, ritz, resid, strict=True):
                err = rho if not gap > 0 else min(rho, rho * rho / gap)
                if i in gone or err <= tol[i]:
                    settled[i] = True
                est[i] = th
        if all(settled) or k == steps:
            break
        q = w / torch.where(beta > 0, beta, torch.ones_like(beta)).unsqueeze(-1)
        Q[:, k : k + 1] = q
    return est, settled


def _ritz(
    alphas: list[torch.Tensor], betas: list[torch.Tensor], rows: list[int], largest: list[bool]
) -> tuple[list[float], list[tuple[float, float]]]:
    """For matrices ``rows`` of a Lanczos batch: the extreme Ritz value (largest or smallest) of
    the tridiagonal ``T_k`` and ``(rho, delta)``: its residual ``beta_k |s_k|`` and its gap to
    the next Ritz value."""
    idx = torch.tensor(rows, device=alphas[0].device)
    a = torch.stack(alphas, dim=-1)[idx]
    bt = torch.stack(betas, dim=-1)[idx]
    k = int(a.shape[-1])
    T = torch.diag_embed(a)
    if k > 1:
        off = torch.diag_embed(bt[:, :-1], offset=1)
        T = T + off + off.mT
    vals, vecs = torch.linalg.eigh(T)
    out_th, out_r = [], []
    rows_v = vals.tolist()
    last = (vecs[:, -1, :].abs() * bt[:, -1:]).tolist()  # rho of every Ritz pair
    for r, big in enumerate(largest):
        e = -1 if big else 0
        th = rows_v[r][e]
        gap = abs(th - rows_v[r][-2 if big else 1]) if k > 1 else math.inf
        out_th.append(th)
        out_r.append((last[r][e], gap))
    return out_th, out_r
