"""Iterative spectral estimates (monquant.operators.spectral): the Lanczos extremes."""

from __future__ import annotations

import pytest
import torch

from monquant.operators.spectral import lanczos_extremes


def _sym(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
    return 0.5 * (A + A.T)


def test_lanczos_settles_on_each_matrix_extreme_within_its_tolerance():
    """A batch of matrices of very different scales, some asked for lmax and some for lmin: each
    estimate settles and lies within its own tolerance of eigvalsh's value."""
    mats = [_sym(120, 1), _sym(120, 2, 1e-5), _sym(120, 3, 1e4)]
    gram = mats[0] @ mats[0]  # positive semidefinite, clustered top end
    A = torch.stack([*mats, gram])
    largest = [False, True, True, True]
    norms = torch.linalg.matrix_norm(A, 2).tolist()
    tol = [1e-12 * s for s in norms]
    est, ok = lanczos_extremes(A, largest, tol)
    exact = torch.linalg.eigvalsh(A)
    assert all(ok)
    for i, big in enumerate(largest):
        target = float(exact[i, -1] if big else exact[i, 0])
        assert est[i] == pytest.approx(target, abs=10 * tol[i])
        # Ritz values lie inside the spectrum (up to rounding)
        assert (est[i] <= target + 1e-13 * norms[i]) if big else (est[i] >= target - 1e-13 * norms[i])


def test_lanczos_invariant_subspace_and_unsettled_cap():
    """A start whose Krylov space is invariant at once (a multiple of I) settles with the exact
    eigenvalue; a step cap too small to converge reports the matrix as not settled."""
    A = torch.stack([3.5 * torch.eye(50, dtype=torch.float64), _sym(50, 4)])
    est, ok = lanczos_extremes(A, [True, False], [0.0, 1e-12])
    assert ok == [True, True] and est[0] == pytest.approx(3.5, rel=1e-14)
    est2, ok2 = lanczos_extremes(_sym(200, 5)[None], [False], [1e-12], max_steps=5)
    assert ok2 == [False] and est2[0] > float(torch.linalg.eigvalsh(_sym(200, 5))[0])


def test_lanczos_follows_dtype():
    A = _sym(64, 6).to(torch.float32)[None]
    est, ok = lanczos_extremes(A, [True], [1e-4])
    assert ok[0] and est[0] == pytest.approx(float(torch.linalg.eigvalsh(A)[0, -1]), rel=1e-4)
