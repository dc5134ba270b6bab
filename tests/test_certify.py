import json
import math

import pytest
import torch
from conftest import random_monotone_W
from hypothesis import given
from hypothesis import strategies as st

from monquant.certify import (
    JSON_KEYS,
    Certificate,
    a_priori_min_bits,
    certify,
    iterate_error_bound,
    iterate_error_radius,
    lipschitz_perturbation_bounds,
    min_certified_bits,
    quantized_contraction_modulus,
    relative_displacement_bound,
    rigorous_displacement_check,
    weyl_margin_bound,
)
from monquant.operators import margin, spectral_norm, spectral_stats, wk_weight
from monquant.solvers import SolverConfig, solve
from monquant.storage.jsonio import to_jsonable

F64 = SolverConfig(method="pr", tol=1e-12, max_iter=200_000)


def _perturbation(n, size, seed):
    g = torch.Generator().manual_seed(seed + 99)
    E = torch.randn(n, n, generator=g, dtype=torch.float64)
    return E * size / spectral_norm(E)


@given(
    n=st.integers(2, 20),
    m=st.floats(0.05, 1.5),
    rank=st.integers(1, 20),
    skew=st.floats(0.0, 3.0),
    size=st.floats(0.0, 3.0),
    seed=st.integers(0, 5000),
)
def test_theorem2_both_inequalities(n, m, rank, skew, size, seed):
    W = random_monotone_W(n, m, rank=min(rank, n), skew=skew, seed=seed)
    dW = _perturbation(n, size, seed)
    s, sq = spectral_stats(W), spectral_stats(W + dW)
    d = spectral_norm(dW)
    assert sq.m >= weyl_margin_bound(s.m, d) - 1e-9
    lo, hi = lipschitz_perturbation_bounds(s.L, d)
    assert lo - 1e-9 <= sq.L <= hi + 1e-9


@given(
    n=st.integers(2, 14),
    m=st.floats(0.1, 1.0),
    frac=st.floats(0.0, 0.95),
    seed=st.integers(0, 5000),
)
def test_theorem3_and_corollary3_hold_on_float64_equilibria(n, m, frac, seed):
    W = random_monotone_W(n, m, seed=seed)
    s = spectral_stats(W)
    dW = _perturbation(n, frac * s.m, seed)
    q = torch.randn(6, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r, rt = solve(W, q, F64), solve(W + dW, q, F64)
    assert r.all_converged and rt.all_converged
    d = spectral_norm(dW)
    emp = (r.z - rt.z).norm(dim=1)
    _, holds = rigorous_displacement_check(
        emp, d, rt.z.norm(dim=1), s.m, r.error_bound, rt.error_bound
    )
    assert bool(holds.all())
    rel = emp / r.z.norm(dim=1).clamp_min(1e-300)
    bound = relative_displacement_bound(d, s.m)
    nz = r.z.norm(dim=1) > 1e-8
    assert bool(
        (rel[nz] <= bound + (r.error_bound + rt.error_bound)[nz] / r.z.norm(dim=1)[nz] + 1e-9).all()
    )


@given(
    n=st.integers(2, 12), m=st.floats(0.2, 1.0), e=st.floats(1e-4, 1e-1), seed=st.integers(0, 5000)
)
def test_corollary2_with_injected_errors(n, m, e, seed):
    W = random_monotone_W(n, m, seed=seed)
    s = spectral_stats(W)
    a = s.m / s.L**2
    rho = math.sqrt(1 - 2 * a * s.m + a**2 * s.L**2)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, generator=g, dtype=torch.float64)
    z_star = solve(W, q, F64).z[0]
    z = torch.zeros(n, dtype=torch.float64)
    e0 = float((z - z_star).norm())
    errs = []
    for k in range(1, 60):
        step = torch.relu((1 - a) * z + a * (W @ z + q[0]))
        err = torch.randn(n, generator=g, dtype=torch.float64)
        err = err * (e * float(torch.rand(1, generator=g))) / err.norm()
        errs.append(float(err.norm()))
        z = step + err
        assert float((z - z_star).norm()) <= iterate_error_bound(rho, k, e0, errs) + 1e-10
    assert iterate_error_radius(e, rho) == pytest.approx(e / (1 - rho))


@given(
    n=st.integers(2, 12), m=st.floats(0.1, 1.0), frac=st.floats(0.0, 0.9), seed=st.integers(0, 5000)
)
def test_corollary1_modulus_bounds_the_quantized_fb_map(n, m, frac, seed):
    W = random_monotone_W(n, m, seed=seed)
    s = spectral_stats(W)
    dW = _perturbation(n, frac * s.m, seed)
    d = spectral_norm(dW)
    a = (s.m - d) / (s.L + d) ** 2
    rho = quantized_contraction_modulus("fb", a, s.m, s.L, d)
    assert rho is not None
    cfg = SolverConfig(method="fb", step=a, max_iter=1)
    q = torch.randn(1, n, dtype=torch.float64)
    u, v = torch.randn(1, n, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)
    tu = solve(W + dW, q, cfg, init=u).state
    tv = solve(W + dW, q, cfg, init=v).state
    assert float((tu - tv).norm()) <= rho * float((u - v).norm()) + 1e-12


@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@given(
    n=st.integers(3, 30), m=st.floats(0.05, 2.0), seed=st.integers(0, 5000), bits=st.integers(2, 16)
)
def test_tiers_are_nested_and_consistent(gran, n, m, seed, bits):
    W = random_monotone_W(n, m, seed=seed)
    c = certify(W, bits, gran)
    assert c.dW_norm <= c.a_priori_bound * (1 + 1e-12)
    if c.certified_a_priori:
        assert c.certified_weyl
    if c.certified_weyl:
        assert c.certified_exact and c.rho_fb_cor1 is not None and c.rho_pr_cor1 is not None
        assert c.margin_quantized >= c.weyl_bound - 1e-9
        assert c.relative_displacement_bound < math.inf
    assert c.certified_exact == (margin(W + 0) > -1 and c.margin_quantized > 0)
    if c.certified_exact:
        assert c.backward_certified and c.backward_modulus == c.rho_pr_exact
    if gran == "per-tensor":
        ap = a_priori_min_bits(n, c.w_max, c.margin)
        assert (ap is not None and bits >= ap) == c.certified_a_priori


def test_certificate_json_round_trip():
    W = random_monotone_W(10, 0.3, seed=4)
    c = certify(W, 3)
    text = json.dumps(to_jsonable(c.to_dict()))
    back = Certificate.from_dict(json.loads(text))
    assert back == c
    assert set(JSON_KEYS) <= set(json.loads(text))
    # the contract other tools parse (issue 3): exactly these keys are promised
    promised = {
        "bits",
        "step",
        "dW_norm",
        "margin",
        "L",
        "margin_quantized",
        "weyl_bound",
        "a_priori_bound",
        "certified_a_priori",
        "certified_weyl",
        "certified_exact",
    }
    assert set(JSON_KEYS) == promised


def test_non_monotone_weight_is_not_certified():
    W = 1.2 * torch.eye(5, dtype=torch.float64)
    c = certify(W, 16)
    assert not c.monotone and c.margin < 0
    assert not (c.certified_a_priori or c.certified_weyl)
    assert c.tier in ("none", "exact") and not c.certified_exact


def test_explicit_w_tilde_and_min_bits():
    W = random_monotone_W(20, 0.5, seed=5)
    Wt = W + _perturbation(20, 0.1, 0)
    c = certify(W, W_tilde=Wt)
    assert c.dW_norm == pytest.approx(0.1) and c.certified_weyl
    mb = min_certified_bits(W)
    assert mb["exact"] <= mb["weyl"] <= mb["a_priori"]
    assert mb["a_priori"] == a_priori_min_bits(20, float(W.abs().max()), margin(W))
    with pytest.raises(ValueError):
        certify(W, W_tilde=Wt[:5, :5])


@pytest.mark.parametrize("rule", ["paper", "narrow"])
def test_step_rule_is_recorded_and_the_a_priori_bits_follow_its_formula(rule: str) -> None:
    import math as _m

    W = wk_weight(torch.randn(20, 20, dtype=torch.float64) / 5, torch.randn(20, 20,
                  dtype=torch.float64) / 5, 0.3)  # fmt: skip
    c = certify(W, 6, step_rule=rule)
    assert c.step_rule == rule and Certificate.from_dict(c.to_dict()).step_rule == rule
    qmax = 2**5 - 1
    expected = c.w_max / qmax if rule == "narrow" else 2 * c.w_max / (2**6 - 1)
    assert c.step == pytest.approx(expected, rel=1e-15)
    n, w, m = 20, c.w_max, c.margin
    b = a_priori_min_bits(n, w, m, step_rule=rule)
    exact = _m.log2(1 + n * w / m) if rule == "paper" else 1 + _m.log2(1 + n * w / (2 * m))
    assert b == _m.floor(exact) + 1  # the smallest integer above the closed form (no tie here)
    assert certify(W, b, step_rule=rule).certified_a_priori
    assert not certify(W, b - 1, step_rule=rule).certified_a_priori


@given(n=st.integers(2, 12), m=st.floats(0.01, 1.0), bits=st.integers(2, 12), seed=st.integers(0, 500))
def test_certificates_speak_the_shared_vocabulary(n, m, bits, seed):
    from monquant.names import TIER_VALUES, VERDICTS

    c = certify(random_monotone_W(n, m, seed=seed), bits)
    assert c.tier in TIER_VALUES and c.verdict in VERDICTS
