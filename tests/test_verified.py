"""Verified floating-point bounds (monquant.verified) and certificates that are proofs (issue 10)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import random_monotone_W
from hypothesis import given
from hypothesis import strategies as st

from monquant.certify import certify, min_certified_bits
from monquant.operators import spectral_stats
from monquant.testing import (
    exact_boundary_case,
    exact_margin_sign,
    shifted_singular_case,
    transform_case,
    weyl_boundary_case,
)
from monquant.verified import (
    cholesky_lower_bound,
    difference_norm_bounds,
    down,
    frobenius_upper_bound,
    gamma,
    lmin_lower_bound,
    lmin_upper_bound,
    margin_bounds,
    modulus_upper_bound,
    norm2_bounds,
    spectral_bounds,
    up,
)

# ----------------------------------------------------------------------------------------------
# Scalar pieces
# ----------------------------------------------------------------------------------------------


def test_directed_rounding_brackets_the_exact_result():
    a, b = 0.1, 0.2
    exact = Fraction(a) + Fraction(b)
    assert Fraction(down(a + b)) <= exact <= Fraction(up(a + b))
    assert gamma(10) > 10 * 2.0**-53


def test_gamma_refuses_problems_beyond_the_analysis():
    with pytest.raises(ValueError, match="too large"):
        gamma(2**52)


def test_modulus_upper_bound_is_above_the_formula_and_below_one():
    for m, L in ((0.5, 2.0), (0.01, 3.0), (1.0, 1.5)):
        a = m / L**2
        rho = modulus_upper_bound("fb", a, m, L)
        assert rho is not None and math.sqrt(1 - 2 * a * m + a**2 * L**2) <= rho < 1
        rho_pr = modulus_upper_bound("pr", 1 / L, m, L)
        assert rho_pr is not None and math.sqrt(1 - 4 * m / L / 4) <= rho_pr < 1
        rho_dr = modulus_upper_bound("dr", 1 / L, m, L)
        assert rho_dr is not None and rho_dr >= 0.5 * (1 + rho_pr) - 1e-16
    assert modulus_upper_bound("fb", 2 * 0.5 / 4.0, 0.5, 2.0) is None  # a = 2 m / L^2: rho = 1
    assert modulus_upper_bound("pr", 1.0, 0.0, 2.0) is None
    assert modulus_upper_bound("pr", 1.0, 1e-300, 1.0) is None  # rho rounds to 1: not certified


# ----------------------------------------------------------------------------------------------
# Matrix bounds against exact or independent values
# ----------------------------------------------------------------------------------------------


@given(n=st.integers(1, 12), shift=st.floats(-2.0, 2.0), seed=st.integers(0, 10_000))
def test_lmin_bounds_bracket_the_eigenvalue(n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T + shift * torch.eye(n, dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(A)[0])
    lo, hi = lmin_lower_bound(A), lmin_upper_bound(A)
    assert lo <= lam + 1e-12 and hi >= lam - 1e-12
    assert lam - lo < 1e-10 and hi - lam < 1e-10  # tight: only rounding is given away


def test_cholesky_lower_bound_fails_rather_than_guesses():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert cholesky_lower_bound(A, 0.0) is None
    assert lmin_lower_bound(A) <= -1.0


@given(rows=st.integers(1, 10), cols=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_norm2_upper_bound_is_above_the_svd_and_tight(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    hi, computed = norm2_bounds(M)
    sv = float(torch.linalg.matrix_norm(M, ord=2))
    assert hi >= sv and hi <= sv * (1 + 1e-10) + 1e-300
    assert computed == pytest.approx(sv, rel=1e-12)
    assert frobenius_upper_bound(M) >= float(M.norm())


def test_norm_bounds_of_zero_and_exact_cases():
    assert norm2_bounds(torch.zeros(3, 3, dtype=torch.float64))[0] == 0.0
    eye = torch.eye(4, dtype=torch.float64)
    hi, _ = norm2_bounds(3.0 * eye)
    assert 3.0 <= hi < 3.0 + 1e-12
    hi, computed = difference_norm_bounds(eye, 0.5 * eye)
    assert 0.5 <= hi < 0.5 + 1e-12 and computed == pytest.approx(0.5)


def test_float32_operator_is_bounded_as_stored():
    W = random_monotone_W(20, 0.3, seed=3).float()
    b = spectral_bounds(W)
    exact = spectral_stats(W.double())
    assert b.m_lo <= exact.m <= b.m_hi and b.L_hi >= exact.L and b.norm_hi >= exact.norm_W


def test_radius_widens_the_bounds():
    W = random_monotone_W(10, 0.3, seed=1)
    plain, wide = spectral_bounds(W), spectral_bounds(W, radius=1e-6)
    assert wide.m_lo < plain.m_lo - 5e-6 and wide.L_hi > plain.L_hi + 5e-6


# ----------------------------------------------------------------------------------------------
# The exact-boundary constructions: nothing is certified (issue 10's adversarial families)
# ----------------------------------------------------------------------------------------------

SIZES = (2, 3, 4, 5, 6, 8, 11, 16, 32, 64, 100, 128, 256)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("family", [exact_boundary_case, weyl_boundary_case])
def test_boundary_constructions_are_never_certified(n, family):
    certified = 0
    for seed in range(3 if n <= 64 else 1):
        base = family(n, seed=seed)
        for case in (base, transform_case(base, seed + 11)):
            cert = certify(case.W, case.bits)
            certified += cert.certified_exact or cert.certified_weyl or cert.certified_a_priori
            assert cert.verdict == "undecided"  # margin(W~) is exactly 0
            assert cert.margin_quantized_lower <= 0.0 <= cert.margin_quantized_upper
            if case.kind.startswith("weyl"):
                # m = ||dW|| exactly: the bounds bracket the common value and Weyl fails
                assert cert.margin_lower <= cert.dW_norm_upper
            for g in ("per-tensor",):
                assert certify(case.W, W_tilde=case.W_tilde).verdict == "undecided", g
    assert certified == 0


def test_boundary_cases_sit_exactly_on_the_boundary():
    for n in (2, 3, 5):
        for family in (exact_boundary_case, weyl_boundary_case):
            c = family(n, seed=n)
            assert exact_margin_sign(c.W_tilde) == 0
    c = weyl_boundary_case(4, seed=1)
    dW = c.W_tilde - c.W
    # ||dW|| = n D / 4 = margin(W): the block part is (D/4) 1 1^T, the padding D/2 <= n D / 4
    assert float(torch.linalg.matrix_norm(dW, ord=2)) == pytest.approx(spectral_stats(c.W).m)


def test_issue_examples_are_not_certified(tmp_path):
    w3 = torch.tensor([[0.325, 0.325, 0.0], [0.325, 0.325, 0.0], [0.0, 0.0, -3.75]])
    c3 = certify(w3.double(), 4)
    assert not c3.certified_weyl and not c3.certified_exact and c3.verdict == "undecided"
    W5 = torch.zeros(5, 5, dtype=torch.float64)
    W5[:4, :4] = 0.25
    W5[4, 4] = -1.875
    c5 = certify(W5, 4)
    assert c5.tier == "none" and c5.verdict == "undecided" and c5.rho_pr_exact is None
    # at 2 bits the block rounds to 0 and W~ is genuinely monotone; Weyl never (margin(W) = 0)
    mb = min_certified_bits(W5)
    assert mb["exact"] == 2 and mb["weyl"] is None and mb["a_priori"] is None


# ----------------------------------------------------------------------------------------------
# The exact rational oracle on small dyadic instances near the boundary
# ----------------------------------------------------------------------------------------------


def _oracle_instances(count: int):
    """Dyadic W (n <= 6) whose margin is exactly 0 or +-2^-j, j in [1, 60], plus generic ones."""
    g = torch.Generator().manual_seed(2026)
    for i in range(count):
        n = 1 + i % 6
        r = int(torch.randint(0, 10, (1,), generator=g))
        if r < 7:
            j = None if r == 0 else int(torch.randint(1, 61, (1,), generator=g))
            yield shifted_singular_case(n, j, 1 if r % 2 else -1, seed=i)
        else:  # generic dyadic entries k / 64
            yield torch.randint(-80, 81, (n, n), generator=g).to(torch.float64) / 64.0


def test_margin_verdicts_agree_with_the_exact_oracle():
    counts = {"certified": 0, "refuted": 0, "undecided": 0, "oracle_zero": 0}
    for W in _oracle_instances(10_000):
        lo, hi, _ = margin_bounds(W)
        truth = exact_margin_sign(W)
        counts["oracle_zero"] += truth == 0
        if lo > 0:
            counts["certified"] += 1
            assert truth == 1, W
        elif hi < 0:
            counts["refuted"] += 1
            assert truth == -1, W
        else:
            counts["undecided"] += 1
    # every exactly-singular instance is undecided, and most others are decided
    assert counts["undecided"] >= counts["oracle_zero"] > 500
    assert counts["certified"] > 2500 and counts["refuted"] > 2500
    assert counts["undecided"] < 0.25 * 10_000


def test_full_certificates_agree_with_the_oracle_on_small_operators():
    for k, W in enumerate(_oracle_instances(600)):
        cert = certify(W, W_tilde=W)
        truth = exact_margin_sign(W)
        if cert.verdict == "certified":
            assert truth == 1 and cert.rho_pr_exact is not None and cert.rho_pr_exact < 1, k
        elif cert.verdict == "refuted":
            assert truth == -1, k


# ----------------------------------------------------------------------------------------------
# Away from the boundary nothing changes
# ----------------------------------------------------------------------------------------------


@given(
    n=st.integers(2, 30),
    m=st.floats(0.01, 1.0),
    bits=st.integers(2, 12),
    seed=st.integers(0, 10_000),
)
def test_random_operators_keep_their_plain_float_verdicts(n, m, bits, seed):
    W = random_monotone_W(n, m, seed=seed)
    cert = certify(W, bits)
    plain_m, plain_mq = spectral_stats(W).m, cert.margin_quantized
    if abs(plain_mq) > 1e-8:
        assert cert.certified_exact == (plain_mq > 0)
        assert cert.verdict == ("certified" if plain_mq > 0 else "refuted")
    if abs(plain_m - cert.dW_norm) > 1e-8:
        assert cert.certified_weyl == (plain_m - cert.dW_norm > 0)
    assert plain_m - cert.margin_lower < 1e-10 * max(1.0, n)  # loss of margin: rounding only
    assert cert.dW_norm_upper >= cert.dW_norm and cert.L_upper >= cert.L


@given(n=st.integers(2, 20), m=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_tiers_imply_each_other_by_construction(n, m, seed):
    W = random_monotone_W(n, m, seed=seed)
    for bits in (2, 4, 6, 8, 12):
        for gran in ("per-tensor", "per-channel"):
            c = certify(W, bits, gran)
            assert not c.certified_a_priori or c.certified_weyl
            assert not c.certified_weyl or c.certified_exact
            assert c.certified_exact == (c.verdict == "certified")
            if c.certified_weyl:
                assert c.margin_quantized_lower >= c.weyl_bound > 0
            for rho in (c.rho_fb_exact, c.rho_pr_exact, c.rho_fb_cor1, c.rho_pr_cor1):
                assert rho is None or rho < 1


def test_all_finite_by_one_reduction_and_its_overflow_fallback() -> None:
    from monquant.verified import all_finite

    assert all_finite(torch.ones(3, 3, dtype=torch.float64))
    assert all_finite(torch.full((4,), 1e308, dtype=torch.float64))  # the sum overflows; entries fine
    for bad in (math.inf, -math.inf, math.nan):
        t = torch.ones(5, dtype=torch.float64)
        t[2] = bad
        assert not all_finite(t)
    t = torch.tensor([math.inf, -math.inf], dtype=torch.float64)  # sum NaN
    assert not all_finite(t)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_entries_are_named_by_the_reductions_that_find_them(bad) -> None:
    """The bounds find a NaN or inf entry through reductions they compute anyway (the rounding
    error of sym(I - W), ||W - versus||_F, ||M||_F) and name the matrix that holds it."""
    from monquant.verified import VerificationError, quantized_bounds, sym_part_bounds

    W = torch.eye(4, dtype=torch.float64) * 0.5
    B = W.clone()
    B[1, 2] = bad
    cases = [(lambda: spectral_bounds(B), "W"), (lambda: quantized_bounds(B, W), "W"),
             (lambda: quantized_bounds(W, B), "versus"), (lambda: norm2_bounds(B), "M"),
             (lambda: sym_part_bounds(B), "W"), (lambda: margin_bounds(B), "W")]  # fmt: skip
    for call, name in cases:
        with pytest.raises(VerificationError, match=f"^{name} has non-finite entries"):
            call()
    huge = torch.full((3, 3), 1e308, dtype=torch.float64)  # finite, but ||huge||_F overflows
    assert norm2_bounds(huge)[0] == math.inf


def test_cholesky_lower_bounds_refuse_a_non_finite_factor(monkeypatch) -> None:
    """A factorization that reports success with a non-finite factor proves nothing."""
    from monquant import verified as v

    real = torch.linalg.cholesky_ex

    def poisoned(A):
        R, info = real(A)
        R[1, -1, -1] = math.inf  # the second matrix's factor, reported as a success
        return R, info

    A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()
    monkeypatch.setattr(v.torch.linalg, "cholesky_ex", poisoned)
    lo = v.cholesky_lower_bounds(A, [0.5, 0.5])
    assert lo[0] is not None and lo[0] <= 0.5 and lo[1] is None


def test_extreme_eigenvalue_bounds_bracket_every_matrix_of_the_batch(monkeypatch):
    """One batched verification gives, per matrix, a proved bound on the side asked for, tight to
    rounding; a matrix whose first shift fails is verified alone up the ladder."""
    import monquant.verified as v

    g = torch.Generator().manual_seed(3)
    mats = []
    for scale in (1.0, 1e-6, 1e3):  # very different scales: the error terms are per matrix
        A = torch.randn(30, 30, generator=g, dtype=torch.float64) * scale
        mats.append(0.5 * (A + A.T))
    largest = [False, True, True]
    exact = [torch.linalg.eigvalsh(M) for M in mats]
    out = v.extreme_eigenvalue_bounds(mats, largest)
    for (bound, est), ev, big, M in zip(out, exact, largest, mats, strict=True):
        target = float(ev[-1] if big else ev[0])
        assert bound is not None and est == pytest.approx(target, rel=1e-12)
        gap = abs(bound - target)
        assert (bound >= target) if big else (bound <= target)
        assert gap <= 1e-9 * float(torch.linalg.matrix_norm(M, 2))
    calls = []
    real = v.cholesky_lower_bounds

    def first_fails(A, tau, **kw):
        calls.append(len(tau))
        res = real(A, tau, **kw)
        return [None, *res[1:]] if len(calls) == 1 else res

    monkeypatch.setattr(v, "cholesky_lower_bounds", first_fails)
    again = v.extreme_eigenvalue_bounds(mats, largest)
    assert calls[0] == 3 and calls[1:] and all(c == 1 for c in calls[1:])
    assert again[0][0] is not None and again[0][0] <= float(exact[0][0])
    assert again[1:] == out[1:]


def test_lmin_upper_bound_by_inverse_iteration_is_as_tight_as_by_eigh():
    """From an estimate of lmin, two LU solves give a vector whose Rayleigh bound is as tight as
    the full eigendecomposition's; a breakdown falls back to eigh (the bound never depends on v)."""
    from monquant.verified import lmin_upper_bound

    g = torch.Generator().manual_seed(5)
    for n in (2, 17, 120):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        A = 0.5 * (A + A.T)
        lam = float(torch.linalg.eigvalsh(A)[0])
        by_eigh = lmin_upper_bound(A)
        by_inv = lmin_upper_bound(A, estimate=lam)
        assert lam <= by_inv <= lam + 1e-10 * float(torch.linalg.matrix_norm(A, 2))
        assert by_inv == pytest.approx(by_eigh, abs=1e-11 * float(torch.linalg.matrix_norm(A, 2)))
    eye = torch.eye(4, dtype=torch.float64)  # a multiple eigenvalue, an exactly singular shift
    assert 1.0 <= lmin_upper_bound(eye, estimate=1.0) <= 1.0 + 1e-12
    assert lmin_upper_bound(eye, estimate=float("nan")) >= 1.0  # breakdown: eigh decides


def test_extreme_eigenvalue_bounds_from_lanczos_estimates(monkeypatch):
    """With Lanczos estimates (forced at every size here), the proved bounds are those of the
    eigvalsh path to rounding; an estimate that misses the extreme eigenvalue (faked) makes the
    first shift fail, and the matrix is then verified from an eigvalsh estimate, as tight."""
    import monquant.verified as v

    g = torch.Generator().manual_seed(8)
    M = torch.randn(60, 60, generator=g, dtype=torch.float64)
    S = 0.3 * torch.eye(60, dtype=torch.float64) + M.T @ M / 60
    G = M.T @ M
    G = 0.5 * (G + G.T)
    mats, largest = [S, G], [False, True]
    by_eig = v.extreme_eigenvalue_bounds(mats, largest)
    monkeypatch.setattr(v, "LANCZOS_FROM", {True: 1, False: 1})
    calls = []
    real = v.lanczos_extremes

    def spy(A, big, tol, **kw):
        calls.append(list(big))
        return real(A, big, tol, **kw)

    monkeypatch.setattr(v, "lanczos_extremes", spy)
    by_lanczos = v.extreme_eigenvalue_bounds(mats, largest)
    assert sorted(calls) == [[False], [True]]
    for (b1, e1), (b2, e2) in zip(by_eig, by_lanczos, strict=True):
        assert b1 is not None and b2 is not None
        assert b2 == pytest.approx(b1, rel=1e-12) and e2 == pytest.approx(e1, rel=1e-12)
    exact = [torch.linalg.eigvalsh(A) for A in mats]
    assert by_lanczos[0][0] <= float(exact[0][0]) and by_lanczos[1][0] >= float(exact[1][-1])

    def missed(A, big, tol, **kw):  # a settled estimate far inside the spectrum
        est, ok = real(A, big, tol, **kw)
        return [e - 0.1 if b else e + 0.1 for e, b in zip(est, big, strict=True)], ok

    monkeypatch.setattr(v, "lanczos_extremes", missed)
    again = v.extreme_eigenvalue_bounds(mats, largest)
    assert again == by_eig  # recovered from eigvalsh estimates: the same proofs


def test_quantized_bounds_at_lanczos_size_match_the_eigvalsh_path(monkeypatch):
    """At n = 320 the Gram matrices' estimates come from the Lanczos process by default; every
    proved bound of the certificate's batch equals the all-eigvalsh one to rounding."""
    import monquant.verified as v
    from monquant.quant.uniform import quantize

    W = random_monotone_W(320, m=0.3, seed=2)
    Wq = quantize(W, 5).dequantized()
    assert v.LANCZOS_FROM[True] <= 320
    st, hi, dW = v.quantized_bounds(Wq, W)
    monkeypatch.setattr(v, "LANCZOS_FROM", {True: 10**9, False: 10**9})
    st2, hi2, dW2 = v.quantized_bounds(Wq, W)
    assert hi == pytest.approx(hi2, rel=1e-12) and dW == pytest.approx(dW2, rel=1e-12)
    for a, b in zip(st.as_dict().values(), st2.as_dict().values(), strict=True):
        if isinstance(a, str) or math.isnan(a):
            assert a == b or math.isnan(b)
        else:
            assert a == pytest.approx(b, rel=1e-12)
