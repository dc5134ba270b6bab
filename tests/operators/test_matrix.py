import math

import pytest
import torch
from conftest import random_monotone_W
from hypothesis import given
from hypothesis import strategies as st

from monquant.operators import OperatorError, check_weight, lipschitz, margin, spectral_stats


@given(
    n=st.integers(2, 20),
    m=st.floats(0.01, 2.0),
    rank=st.integers(1, 20),
    seed=st.integers(0, 10_000),
)
def test_wk_margin_is_at_least_m(n, m, rank, seed):
    W = random_monotone_W(n, m, rank=min(rank, n), seed=seed)
    assert margin(W) >= m - 1e-10
    # rank-deficient A: the bound is attained exactly
    if min(rank, n) < n:
        assert margin(W) == pytest.approx(m, abs=1e-9)


def test_lipschitz_and_kappa():
    W = random_monotone_W(10, 0.3, seed=1)
    st_ = spectral_stats(W)
    assert st_.L == pytest.approx(float(torch.linalg.svdvals(torch.eye(10, dtype=W.dtype) - W)[0]))
    assert st_.kappa == pytest.approx(st_.L / st_.m)
    assert lipschitz(W) >= st_.m  # ||M|| >= lmin(sym(M))


def test_non_monotone_has_infinite_kappa():
    W = 2.0 * torch.eye(4, dtype=torch.float64)  # I - W = -I
    s = spectral_stats(W)
    assert s.m == pytest.approx(-1.0) and not s.monotone and math.isinf(s.kappa)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 4),
        torch.zeros(3),
        torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]),
        torch.tensor([[float("inf"), 0.0], [0.0, 0.0]]),
        torch.zeros(2, 2, dtype=torch.int64),
    ],
)
def test_bad_weights_are_refused(bad):
    with pytest.raises(OperatorError):
        check_weight(bad)
