"""Adversarial operators and an exact oracle, for testing certificates (like ``torch.testing``).

A certificate that rests on rounded arithmetic can be fooled by operators whose margin is exactly
zero. These families put ``margin(W~)`` (and, for the Weyl family, ``m - ||dW||``) exactly on the
boundary, with every entry a dyadic rational that float64 stores exactly:

- :func:`exact_boundary_case`: ``W~ = I - D L + D K`` with ``L`` the Laplacian of a connected graph
  (null vector ``1``), ``K`` skew and ``D`` a power of two equal to the quantizer's step (one padding
  entry fixes ``w_max``), so ``sym(I - W~) = D L`` is exactly singular: every ``z = t (1,..,1, 0)``,
  ``t >= 0``, is an equilibrium of ``z = relu(W~ z)``. ``W`` is ``W~`` plus an off-grid perturbation
  that quantizes back to ``W~``.
- :func:`weyl_boundary_case`: ``W = W~ - (D / 4) 1 1^T`` on the block, so that ``margin(W) =
  ||W~ - W|| = n D / 4`` exactly (and ``margin(W~) = 0``).
- :func:`shifted_singular_case`: a small dyadic ``W`` with ``sym(I - W)`` singular PSD, shifted by
  ``+-2^-j I``: ``margin(W) = +-2^-j`` exactly.

:func:`exact_margin_sign` decides the sign of ``margin(W)`` in exact rational arithmetic (Fractions:
symmetric elimination with zero-pivot handling), the oracle for small ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from monquant.errors import ConfigError

__all__ = [
    "BoundaryCase",
    "exact_boundary_case",
    "exact_margin_sign",
    "shifted_singular_case",
    "transform_case",
    "weyl_boundary_case",
]


@dataclass(frozen=True)
class BoundaryCase:
    """A float ``W`` whose ``bits``-bit per-tensor quantization ``W~`` sits on a boundary."""

    W: torch.Tensor
    W_tilde: torch.Tensor
    bits: int
    kind: str


def _laplacian(n: int, g: torch.Generator) -> torch.Tensor:
    """Laplacian of the complete graph on ``n`` nodes with integer weights in ``{1, 2, 3}``."""
    w = torch.randint(1, 4, (n, n), generator=g).to(torch.float64)
    w = torch.triu(w, 1)
    w = w + w.T
    return torch.diag(w.sum(dim=1)) - w


def _grid_block(n: int, bits: int, g: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """``W~ = I - D L + D K`` on an ``n``-block; returns it, ``D`` and the padding ``w_max``."""
    qmax = 2 ** (bits - 1) - 1
    L = _laplacian(n, g)
    deg = float(L.diagonal().max())
    p = max(0, int(deg).bit_length())  # 2^p > max degree: diagonal codes 2^p - L_ii in (0, 2^p]
    if 2**p + 8 > qmax:
        raise ConfigError(f"n = {n} needs more than {bits} bits")
    D = 2.0**-p
    K = torch.randint(-2, 3, (n, n), generator=g).to(torch.float64)
    K = torch.triu(K, 1)
    K = K - K.T
    Wt = torch.eye(n, dtype=torch.float64) - D * L + D * K
    w_max = D * (2**bits - 1) / 2.0  # the quantizer's step 2 w_max / (2^b - 1) is then exactly D
    return Wt, D, w_max


def _pad(block: torch.Tensor, corner: float) -> torch.Tensor:
    n = block.shape[0]
    W = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    W[:n, :n] = block
    W[n, n] = corner
    return W


def exact_boundary_case(n: int, seed: int = 0, bits: int = 12) -> BoundaryCase:
    """``margin(Q_b(W)) = 0`` exactly (``n + 1`` units; see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    Wt, D, w_max = _grid_block(n, bits, g)
    R = torch.randint(-3, 4, (n, n), generator=g).to(torch.float64) * (D / 8.0)  # |R| < D / 2
    qmax = 2 ** (bits - 1) - 1
    return BoundaryCase(_pad(Wt + R, -w_max), _pad(Wt, -qmax * D), bits, "exact")


def weyl_boundary_case(n: int, seed: int = 0, bits: int = 12) -> BoundaryCase:
    """``margin(W) = ||Q_b(W) - W|| = n D / 4`` and ``margin(Q_b(W)) = 0``, exactly."""
    if n < 2:
        raise ConfigError("the Weyl boundary needs n >= 2")
    g = torch.Generator().manual_seed(seed)
    Wt, D, w_max = _grid_block(n, bits, g)
    qmax = 2 ** (bits - 1) - 1
    W = Wt - (D / 4.0) * torch.ones(n, n, dtype=torch.float64)
    return BoundaryCase(_pad(W, -w_max), _pad(Wt, -qmax * D), bits, "weyl")


def transform_case(case: BoundaryCase, seed: int) -> BoundaryCase:
    """The same case under a random permutation ``P`` and sign flip ``S``: ``S P W P^T S``.

    Both preserve ``sym(I - W)``'s spectrum, every norm and the quantizer (symmetric rounding).
    """
    g = torch.Generator().manual_seed(seed)
    n = case.W.shape[0]
    perm = torch.randperm(n, generator=g)
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)

    def t(M: torch.Tensor) -> torch.Tensor:
        return s[:, None] * M[perm][:, perm] * s[None, :]

    return BoundaryCase(t(case.W), t(case.W_tilde), case.bits, case.kind + "+perm+sign")


def shifted_singular_case(n: int, shift_exp: int | None, sign: int, seed: int = 0) -> torch.Tensor:
    """Dyadic ``W`` with ``sym(I - W) = 2^-3 B B^T + sign 2^-shift_exp I`` (exactly) plus a skew part.

    ``B`` is an integer ``n x (n - 1)`` matrix, so ``B B^T`` is singular PSD and
    ``margin(W) = sign * 2^-shift_exp`` exactly (``0`` when ``shift_exp`` is ``None``).
    """
    g = torch.Generator().manual_seed(seed)
    B = torch.randint(-2, 3, (n, max(n - 1, 1)), generator=g).to(torch.float64)
    if n == 1:
        B = torch.zeros(1, 1, dtype=torch.float64)
    S = B @ B.T / 8.0
    if shift_exp is not None:
        S = S + sign * 2.0**-shift_exp * torch.eye(n, dtype=torch.float64)
    K = torch.randint(-4, 5, (n, n), generator=g).to(torch.float64) / 16.0
    K = torch.triu(K, 1)
    K = K - K.T
    return torch.eye(n, dtype=torch.float64) - S + K


def exact_margin_sign(W: torch.Tensor) -> int:
    """Sign of ``margin(W) = lmin(sym(I - W))`` in exact rational arithmetic: ``1``, ``0`` or ``-1``.

    The stored floats are converted exactly (:class:`fractions.Fraction`); symmetric elimination
    decides the inertia's sign pattern: a negative pivot (or a zero pivot with a non-zero row) means
    an indefinite matrix (``-1``), all pivots positive means positive definite (``1``), otherwise
    positive semidefinite and singular (``0``).
    """
    n = W.shape[0]
    w = [[Fraction(float(v)) for v in row] for row in W.detach().to(torch.float64).tolist()]
    S = [
        [(Fraction(int(i == j)) - (w[i][j] + w[j][i]) / 2) for j in range(n)] for i in range(n)
    ]
    singular = False
    while S:
        a = S[0][0]
        if a < 0:
            return -1
        if a == 0:
            if any(v != 0 for v in S[0][1:]):
                return -1
            singular = True
            S = [row[1:] for row in S[1:]]
            continue
        col = [S[i][0] for i in range(1, len(S))]
        S = [
            [S[i][j] - col[i - 1] * col[j - 1] / a for j in range(1, len(S))]
            for i in range(1, len(S))
        ]
    return 0 if singular else 1
