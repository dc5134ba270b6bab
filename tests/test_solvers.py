import math
import time
from dataclasses import replace

import pytest
import torch
from conftest import random_monotone_W
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.operators import spectral_stats
from monquant.solvers import (
    SolverConfig,
    SolverError,
    certified_step_range,
    contraction_modulus,
    default_step,
    solve,
)

TIGHT = dict(tol=1e-12, max_iter=200_000)


def _q(n, batch=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=g, dtype=dtype)


@given(n=st.integers(2, 24), m=st.floats(0.2, 1.5), seed=st.integers(0, 1000))
def test_methods_agree_and_solve_the_fixed_point(n, m, seed):
    W = random_monotone_W(n, m, seed=seed)
    q = _q(n, seed=seed)
    zs = {}
    for method in ("fb", "pr", "dr"):
        r = solve(W, q, SolverConfig(method=method, **TIGHT))
        assert r.all_converged, (method, r.summary())
        fixed = torch.relu(r.z @ W.T + q)
        assert float((fixed - r.z).norm(dim=1).max()) <= 1e-9 * (1 + float(r.z.norm()))
        zs[method] = r.z
    assert float((zs["fb"] - zs["pr"]).abs().max()) <= 1e-8
    assert float((zs["dr"] - zs["pr"]).abs().max()) <= 1e-8


@given(n=st.integers(2, 16), m=st.floats(0.1, 1.0), seed=st.integers(0, 1000))
def test_a_posteriori_bound_covers_true_error(n, m, seed):
    W = random_monotone_W(n, m, seed=seed)
    q = _q(n, seed=seed)
    ref = solve(W, q, SolverConfig(method="pr", tol=1e-14, max_iter=100_000)).z
    for method in ("fb", "pr", "dr"):
        r = solve(W, q, SolverConfig(method=method, tol=1e-4))
        err = (r.z - ref).norm(dim=1)
        assert r.modulus is not None and r.modulus < 1
        assert bool((err <= r.error_bound + 1e-10).all()), method


@given(
    n=st.integers(2, 16),
    m=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
    method=st.sampled_from(["fb", "pr", "dr"]),
    frac=st.floats(0.05, 1.0),
)
def test_one_iteration_contracts_with_the_stated_modulus(n, m, seed, method, frac):
    W = random_monotone_W(n, m, seed=seed)
    s = spectral_stats(W)
    hi = 2 * s.m / s.L**2 if method == "fb" else 4.0 / s.L
    step = frac * hi * 0.999
    rho = contraction_modulus(method, step, s.m, s.L)
    assert rho is not None and rho < 1
    q = _q(n, batch=1, seed=seed)
    cfg = SolverConfig(method=method, step=step, max_iter=1)
    a, b = _q(n, 1, seed + 1), _q(n, 1, seed + 2)
    ta = solve(W, q, cfg, init=a).state
    tb = solve(W, q, cfg, init=b).state
    assert float((ta - tb).norm()) <= rho * float((a - b).norm()) * (1 + 1e-9) + 1e-12


def test_default_steps_and_ranges():
    assert default_step("fb", 0.5, 2.0) == pytest.approx(0.125)
    assert default_step("pr", 0.5, 2.0) == pytest.approx(0.5)
    assert certified_step_range("fb", 0.5, 2.0) == (0.0, 0.25)
    assert certified_step_range("dr", 0.5, 2.0) == (0.0, math.inf)
    assert certified_step_range("pr", -0.1, 2.0) is None
    assert contraction_modulus("fb", 0.3, 0.5, 2.0) is None  # out of the certified range
    # best FB step gives sqrt(1 - 1/kappa^2), best PR step sqrt(1 - 1/kappa)
    assert contraction_modulus("fb", 0.125, 0.5, 2.0) == pytest.approx(math.sqrt(1 - 1 / 16))
    assert contraction_modulus("pr", 0.5, 0.5, 2.0) == pytest.approx(math.sqrt(1 - 1 / 4))


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_iteration_cap_is_reported_not_hidden(method):
    W = random_monotone_W(20, 0.05, seed=3)
    q = _q(20)
    r = solve(W, q, SolverConfig(method=method, tol=1e-12, max_iter=3))
    assert r.iterations == 3
    assert not r.converged.any()
    assert bool((r.sample_iterations == 3).all())
    assert r.summary()["unconverged"] == 5


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
@pytest.mark.parametrize("kind", ["expanding", "singular", "indefinite"])
def test_non_monotone_weight_never_passes_for_a_solution(method, kind):
    n = 12
    g = torch.Generator().manual_seed(0)
    S = torch.randn(n, n, generator=g, dtype=torch.float64)
    if kind == "expanding":  # sym(I - W) = -0.5 I
        W = 1.5 * torch.eye(n, dtype=torch.float64) + 0.3 * (S - S.T)
    elif kind == "singular":  # I + a (I - W) singular at the default PR step a = 1/L = 1
        W = 2.0 * torch.eye(n, dtype=torch.float64)
    else:
        W = random_monotone_W(n, -0.8, rank=2, seed=1) + 0.5 * torch.eye(n, dtype=torch.float64)
    q = torch.rand(4, n, generator=g, dtype=torch.float64) + 0.5
    t0 = time.perf_counter()
    r = solve(W, q, SolverConfig(method=method, tol=1e-8, max_iter=500))
    assert time.perf_counter() - t0 < 30
    assert r.modulus is None
    assert not r.converged.any(), r.summary()
    assert math.isinf(float(r.error_bound.max()))


def test_dtype_follows_inputs_and_float32_works():
    W = random_monotone_W(30, 0.5, seed=2).float()
    q = _q(30, dtype=torch.float32)
    r = solve(W, q, SolverConfig(method="pr", tol=1e-5))
    assert r.z.dtype == torch.float32 and r.all_converged


def test_bad_solver_inputs():
    W = random_monotone_W(4, 0.5)
    with pytest.raises(SolverError):
        solve(W, torch.zeros(2, 5, dtype=torch.float64))
    # below float32 the rounding floor of the stopping test would pass a bfloat16 FB solve after
    # one iteration with a relative residual of 1, and PR has no resolvent: refused, by name
    for dtype in (torch.bfloat16, torch.float16, torch.int64):
        for method in ("fb", "pr"):
            with pytest.raises(SolverError, match="float32 or float64"):
                solve(W.to(torch.float32), torch.ones(2, 4).to(dtype), SolverConfig(method=method))
    with pytest.raises(SolverError):
        SolverConfig(method="newton")
    with pytest.raises(SolverError):
        SolverConfig(step=-1.0)
    with pytest.raises(SolverError):
        SolverConfig(max_iter=0)


def test_zero_solution_is_converged():
    W = random_monotone_W(6, 0.5)
    q = -torch.ones(3, 6, dtype=torch.float64) * 100  # relu kills everything: z* = 0
    r = solve(W, q, SolverConfig(method="fb", tol=1e-10))
    assert r.all_converged and float(r.z.abs().max()) == 0.0


def test_solver_config_round_trips_every_setting():
    cfg = SolverConfig(method="dr", step=0.5, tol=1e-7, max_iter=77, check_every=3, diverge_at=1e5)
    d = cfg.as_dict()
    assert d["diverge_at"] == 1e5
    assert SolverConfig.from_dict(d) == cfg
    assert SolverConfig.from_dict({"method": "fb"}) == SolverConfig(method="fb")
    with pytest.raises(SolverError, match="unknown solver settings"):
        SolverConfig.from_dict({"method": "pr", "bogus": 1})


# --- safeguarded Anderson acceleration -------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 20),
    m=st.floats(0.1, 1.5),
    seed=st.integers(0, 1000),
    memory=st.sampled_from([1, 3, 6]),
)
def test_anderson_reaches_the_same_equilibrium_with_a_valid_bound(n, m, seed, memory):
    W = random_monotone_W(n, m, seed=seed)
    q = _q(n, seed=seed)
    ref = solve(W, q, SolverConfig(method="pr", tol=1e-14, max_iter=100_000)).z
    for method in ("fb", "pr", "dr"):
        r = solve(W, q, SolverConfig(method=method, anderson=memory, **TIGHT))
        assert r.all_converged, (method, r.summary())
        assert float((r.z - ref).abs().max()) <= 1e-8 * (1 + float(ref.abs().max()))
        loose = solve(W, q, SolverConfig(method=method, tol=1e-4, anderson=memory))
        err = (loose.z - ref).norm(dim=1)
        assert loose.modulus is not None
        assert bool((err <= loose.error_bound + 1e-10).all()), method


def test_anderson_cuts_iterations_on_an_ill_conditioned_operator():
    W = random_monotone_W(60, 0.05, seed=4)
    q = _q(60, batch=16, seed=4)
    for method in ("fb", "pr", "dr"):
        plain = solve(W, q, SolverConfig(method=method, tol=1e-8, max_iter=50_000))
        fast = solve(W, q, SolverConfig(method=method, tol=1e-8, max_iter=50_000, anderson=5))
        assert plain.all_converged and fast.all_converged
        assert fast.iterations < plain.iterations, (method, fast.iterations, plain.iterations)


@pytest.mark.parametrize("bad", ["nan", "huge"])
def test_anderson_safeguard_falls_back_to_the_plain_step(monkeypatch, bad):
    """Candidates that always fail the safeguard leave the plain iteration, at most 2x its count."""
    from monquant import solvers

    def broken(self):
        point, x = original(self)
        spoil = (lambda t: torch.full_like(t, math.nan)) if bad == "nan" else (lambda t: 1e6 * t + 1e6)
        return spoil(point), None if x is None else spoil(x)

    original = solvers._AndersonHistory.mix
    monkeypatch.setattr(solvers._AndersonHistory, "mix", broken)
    W = random_monotone_W(30, 0.3, seed=5)
    q = _q(30, batch=8, seed=5)
    for method in ("fb", "pr"):
        plain = solve(W, q, SolverConfig(method=method, tol=1e-9, max_iter=50_000))
        r = solve(W, q, SolverConfig(method=method, tol=1e-9, max_iter=50_000, anderson=4))
        assert r.all_converged and not r.diverged.any()
        assert float((r.z - plain.z).abs().max()) <= 1e-6
        assert r.iterations <= 2 * plain.iterations + 2
        assert bool(torch.isfinite(r.error_bound).all())


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_anderson_reports_the_cap_and_never_passes_a_non_monotone_operator(method):
    W = random_monotone_W(20, 0.05, seed=3)
    r = solve(W, _q(20), SolverConfig(method=method, tol=1e-14, max_iter=3, anderson=3))
    assert r.iterations == 3 and not r.converged.any()
    assert bool((r.sample_iterations == 3).all())
    n = 12
    S = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bad = 1.5 * torch.eye(n, dtype=torch.float64) + 0.3 * (S - S.T)
    q = torch.rand(4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    r = solve(bad, q, SolverConfig(method=method, tol=1e-8, max_iter=500, anderson=3))
    assert not r.converged.any() and r.modulus is None
    assert math.isinf(float(r.error_bound.max()))
    q[1] = math.inf  # a non-finite iterate is divergence, never convergence, in both loops
    for memory in (0, 3):
        r = solve(random_monotone_W(n, 0.5), q, SolverConfig(method=method, anderson=memory))
        assert bool(r.diverged[1]) and not bool(r.converged[1]) and bool(r.converged[[0, 2, 3]].all())


def test_anderson_settings_are_checked_and_round_trip():
    for bad in (-1, 1.5, True, 51):
        with pytest.raises(SolverError, match="anderson"):
            SolverConfig(anderson=bad)
    cfg = SolverConfig(method="fb", anderson=4)
    assert SolverConfig.from_dict(cfg.as_dict()) == cfg


@pytest.mark.parametrize("n", [1, 7, 100])
def test_estimate_lipschitz_is_close_from_below(n):
    """The squaring estimate of ||I - W|| lies below the exact value and within 1% of it (the
    top eigenvalue of (I - W)^T (I - W) is well separated for random W), and is 0 for W = I."""
    from monquant.solvers import estimate_lipschitz

    W = random_monotone_W(n, m=0.2, seed=n)
    exact = float(torch.linalg.matrix_norm(torch.eye(n, dtype=W.dtype) - W, ord=2))
    est = estimate_lipschitz(W)
    assert est <= exact * (1 + 1e-12)
    assert est >= 0.99 * exact
    assert estimate_lipschitz(torch.eye(n)) == 0.0


@pytest.mark.parametrize("method", ["pr", "dr"])
def test_cold_start_skips_the_product_and_matches_start(method):
    """``start_zero`` (y = R_F(0) = 2c, no product) equals ``start`` at zero, for the dense path
    (the reflection folded into R = 2J - I) and for an operator without a dense matrix."""
    from monquant.operators import WKOperator, wk_weight
    from monquant.solvers import SplittingMap

    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 9, generator=g, dtype=torch.float64) / 3
    B = torch.randn(9, 9, generator=g, dtype=torch.float64) / 3
    q = _q(9, batch=6, seed=2)
    for op in (wk_weight(A, B, 0.3), WKOperator(A, B, 0.3)):
        it = SplittingMap(method, op, q, 0.7, torch.relu)
        assert torch.allclose(it.start_zero(), it.start(torch.zeros_like(q)), rtol=0, atol=1e-14)
        u = _q(9, batch=6, seed=5)
        J = torch.linalg.inv(torch.eye(9, dtype=torch.float64) + 0.7 * (torch.eye(9) - wk_weight(A, B, 0.3)))
        y = 2 * (u @ J.T + 0.7 * q @ J.T) - u  # R_F(u) = 2 J_F(u) - u, written out
        assert torch.allclose(it.start(u), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_every", [1, 3])
def test_stopping_iteration_is_the_exact_residual_test(check_every):
    """The fused residual test of dense states, (1 - t^2) <z - zp/(1 - t), z - zp/(1 + t)>, stops
    a solve at the first checked iteration at which every sample passes the two-norm test
    ||z - zp||^2 <= t^2 ||z||^2 + floor, replayed here with the same iteration map."""
    from monquant.solvers import SplittingMap

    W = random_monotone_W(30, 0.2, seed=11)
    q = _q(30, batch=16, seed=4)
    cfg = SolverConfig(method="pr", tol=1e-7, max_iter=5000, check_every=check_every)
    r = solve(W, q, cfg)
    assert r.all_converged
    it = SplittingMap("pr", W, q, r.step, torch.relu)
    s = torch.zeros_like(q)
    aux = it.start(s)
    z, y = it.read(s, aux)
    floor = (8 * torch.finfo(q.dtype).eps) ** 2 * q.square().sum(1)
    k = 0
    while True:
        k += 1
        zp = z
        s, aux = it.advance(s, aux, z, y)
        z, y = it.read(s, aux)
        if k % check_every:
            continue
        if bool(((z - zp).square().sum(1) <= 1e-14 * z.square().sum(1) + floor).all()):
            break
    assert r.iterations == k
    assert float(r.residual.max()) <= 1e-7


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_a_non_finite_sample_diverges_alone(method):
    """A NaN or an infinite entry in one sample's injection makes that sample diverge; the other
    samples of the batch converge as if it were not there (the divergence limit comes from the
    finite entries)."""
    W = random_monotone_W(12, 0.5, seed=2)
    q = _q(12, batch=4, seed=3)
    bad = q.clone()
    bad[1, 3], bad[2, 5] = math.nan, math.inf
    cfg = SolverConfig(method=method, tol=1e-9, max_iter=5000)
    ref, r = solve(W, q, cfg), solve(W, bad, cfg)
    assert r.converged.tolist() == [True, False, False, True]
    assert r.diverged.tolist() == [False, True, True, False]
    assert torch.allclose(r.z[[0, 3]], ref.z[[0, 3]], atol=1e-8)


def test_sample_iterations_count_failed_checks_past_the_table_growth():
    """Per-sample iterations are the checks a sample failed (plus one), through more checks than
    the verdict table first holds (it doubles from 64 rows): replayed with FB's own map."""
    from monquant.solvers import SplittingMap

    W = random_monotone_W(16, 0.1, seed=5)
    q = _q(16, batch=6, seed=6)
    cfg = SolverConfig(method="fb", tol=1e-8, max_iter=20_000, check_every=1)
    r = solve(W, q, cfg)
    assert r.all_converged and r.iterations > 200
    it = SplittingMap("fb", W, q, r.step, torch.relu)
    z = torch.zeros_like(q)
    floor = (8 * torch.finfo(q.dtype).eps) ** 2 * q.square().sum(1)
    failed = torch.zeros(6, dtype=torch.long)
    for _ in range(r.iterations):
        zp = z
        z, _ = it.advance(z, None, z, None)
        failed += ~((z - zp).square().sum(1) <= 1e-16 * z.square().sum(1) + floor)
    assert r.sample_iterations.tolist() == (failed + 1).tolist()
    assert len(set(r.sample_iterations.tolist())) > 1  # the samples stop at different checks


# --- step policies and scheduled checks ---------------------------------------------------------


def test_step_policy_and_check_schedule_settings_are_checked_and_round_trip():
    cfg = SolverConfig(step_policy="geometric", check_every="auto")
    assert SolverConfig.from_dict(cfg.as_dict()) == cfg
    assert SolverConfig.from_dict({"method": "pr"}).step_policy == "bound"  # older configs
    for bad in (dict(step_policy="fastest"), dict(check_every="sometimes"), dict(check_every=0),
                dict(check_every=True), dict(check_every=2.5)):  # fmt: skip
        with pytest.raises(SolverError):
            SolverConfig(**bad)


def test_geometric_step_is_one_over_sqrt_m_l_for_resolvent_methods_only():
    from monquant.solvers import get_solver, solver_step

    m, L = 0.25, 4.0
    assert solver_step(get_solver("pr"), "geometric", m, L) == pytest.approx(1.0)
    assert solver_step(get_solver("dr"), "geometric", m, L) == pytest.approx(1.0)
    assert solver_step(get_solver("pr"), "bound", m, L) == default_step("pr", m, L)
    assert solver_step(get_solver("fb"), "geometric", m, L) == default_step("fb", m, L)
    for unknown in (math.nan, 0.0, -0.1):  # no positive margin: the method's own step
        assert solver_step(get_solver("pr"), "geometric", unknown, L) == default_step("pr", unknown, L)


@pytest.mark.parametrize("n", [2, 30, 100])
def test_estimate_margin_dense_is_close_from_above(n):
    from monquant.solvers import estimate_lipschitz, estimate_margin_dense

    for m in (0.05, 0.5):
        W = random_monotone_W(n, m, seed=n)
        st = spectral_stats(W)
        est = estimate_margin_dense(W, estimate_lipschitz(W))
        assert st.m - 1e-9 <= est <= st.m + 0.25 * (st.L - st.m), (st, est)


def test_estimated_geometric_solve_certifies_nothing_and_converges():
    """Under ``spectral="estimate"`` the geometric step comes from estimates of m and L: the
    result carries no modulus, no certified range, and reaches the exact solve's equilibrium."""
    from monquant.solvers import estimate_lipschitz, estimate_margin_dense

    W = random_monotone_W(40, 0.1, seed=3)
    q = _q(40, batch=8, seed=2)
    r = solve(W, q, SolverConfig(spectral="estimate", step_policy="geometric", **TIGHT))
    L = estimate_lipschitz(W)
    assert r.step == pytest.approx(1.0 / math.sqrt(estimate_margin_dense(W, L) * L))
    assert r.modulus is None and r.certified_range is None and not r.stats.exact
    assert math.isinf(float(r.error_bound.max()))
    exact = solve(W, q, SolverConfig(**TIGHT))
    assert r.all_converged and torch.allclose(r.z, exact.z, atol=1e-9)
    assert exact.certified_range is not None  # exact constants still certify a range


def test_geometric_step_needs_fewer_iterations_on_an_ill_conditioned_operator():
    """An operator whose symmetric part dominates (the case the geometric step is made for; with
    a dominant skew part it can need more iterations than 1/L, docs/theory.md)."""
    W = random_monotone_W(60, 0.05, skew=0.3, seed=8)
    q = _q(60, batch=32, seed=1)
    bound = solve(W, q, SolverConfig(tol=1e-8))
    geometric = solve(W, q, SolverConfig(tol=1e-8, step_policy="geometric"))
    assert bound.all_converged and geometric.all_converged
    assert geometric.iterations < 0.5 * bound.iterations
    assert geometric.modulus is not None and geometric.modulus > bound.modulus  # a weaker bound


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_scheduled_checks_stop_where_the_exact_test_passes(method):
    """With ``check_every="auto"`` the solve stops at a checked iteration at which the two-norm
    test, replayed with the same map, passes for every sample; not before the first iteration at
    which it passes, and at most the schedule's largest gap after it. Each sample's iteration is
    one of the checked ones."""
    from monquant.solvers import AUTO_CHECK_MAX_GAP, SplittingMap

    W = random_monotone_W(30, 0.2, seed=11)
    q = _q(30, batch=16, seed=4)
    tol = 1e-7
    r = solve(W, q, SolverConfig(method=method, tol=tol, max_iter=20_000, check_every="auto"))
    assert r.all_converged and float(r.residual.max()) <= tol
    it = SplittingMap(method, W, q, r.step, torch.relu)
    s = torch.zeros_like(q)
    aux = it.start(s)
    z, y = it.read(s, aux)
    floor = (8 * torch.finfo(q.dtype).eps) ** 2 * q.square().sum(1)
    passes = []
    for _ in range(r.iterations):
        zp = z
        s, aux = it.advance(s, aux, z, y)
        z, y = it.read(s, aux)
        passes.append(bool(((z - zp).square().sum(1) <= tol**2 * z.square().sum(1) + floor).all()))
    first = passes.index(True) + 1
    assert passes[-1] and first <= r.iterations <= first + AUTO_CHECK_MAX_GAP
    every = solve(W, q, SolverConfig(method=method, tol=tol, max_iter=20_000))
    assert every.iterations == first
    assert int(r.sample_iterations.max()) == r.iterations
    assert bool((r.sample_iterations >= every.sample_iterations).all())


def test_scheduled_checks_report_the_cap_and_divergence():
    W = random_monotone_W(20, 0.01, seed=1)
    q = _q(20, batch=4, seed=2)
    r = solve(W, q, SolverConfig(method="fb", tol=1e-12, max_iter=37, check_every="auto"))
    assert r.iterations == 37 and r.n_unconverged == 4
    assert r.sample_iterations.tolist() == [37] * 4
    bad = q.clone()
    bad[2, 0] = math.nan
    r = solve(W, bad, SolverConfig(tol=1e-9, check_every="auto"))
    assert r.diverged.tolist() == [False, False, True, False]
    assert r.converged.tolist() == [True, True, False, True]


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_a_first_check_moves_the_schedule_and_keeps_the_verdicts(method):
    """``first_check=h`` puts the first scheduled check at ``h`` (clamped to ``1..max_iter``):
    every sample's iteration is a checked one at or after it, the verdict is the same test (every
    sample within tol), a first check past the iterations needed stops the solve right there,
    and a fixed ``check_every`` ignores it."""
    W = random_monotone_W(30, 0.2, seed=11)
    q = _q(30, batch=16, seed=4)
    cfg = SolverConfig(method=method, tol=1e-7, max_iter=20_000, check_every="auto")
    cold = solve(W, q, cfg)
    k = cold.iterations
    for h in (1, max(k // 2, 1), k - 2, k + 5):
        r = solve(W, q, cfg, first_check=h)
        assert r.all_converged and float(r.residual.max()) <= 1e-7
        assert int(r.sample_iterations.min()) >= h and r.iterations >= h
    at_once = solve(W, q, cfg, first_check=k + 5)
    assert at_once.iterations == k + 5 and at_once.checks == 1  # it passes at once
    assert cold.checks >= 3  # iterations 1, 3, then at least the one that passed
    assert solve(W, q, cfg, first_check=0).iterations == cold.iterations  # clamped to 1: cold
    capped = solve(W, q, replace(cfg, max_iter=5), first_check=50)
    assert capped.iterations == 5 and capped.n_unconverged == 16  # never past the cap, reported
    fixed = replace(cfg, check_every=3)
    r = solve(W, q, fixed, first_check=k + 5)
    assert torch.equal(r.z, solve(W, q, fixed).z) and r.checks == math.ceil(r.iterations / 3)


def test_scheduled_checks_flag_exploding_iterates():
    """Every scheduled check tests for divergence: an iterate growing by 1.5x per iteration
    (its residual ratio settles, it does not rise) passes the limit 1e8 (1 + max|q|) within
    about 50 iterations, and the solve stops soon after with every sample diverged."""
    W = 1.5 * torch.eye(10, dtype=torch.float64)  # not monotone: z <- relu(1.5 z + q) explodes
    q = _q(10, batch=3, seed=1).abs()
    r = solve(W, q, SolverConfig(method="fb", step=1.0, max_iter=5000, check_every="auto"),
              stats=spectral_stats(W))  # fmt: skip
    assert r.diverged.all() and not r.converged.any() and r.iterations < 70


def test_step_estimates_follow_a_changing_operator_and_restart_cold():
    """The first call gives the cold estimates; later calls continue the power iterations and stay
    one-sided (L from below, m from above) while W drifts; reset, another shape and a non-finite
    W start cold again."""
    from monquant.solvers import StepEstimates, estimate_lipschitz, estimate_margin_dense

    W = random_monotone_W(50, 0.2, seed=4)
    est = StepEstimates()
    first = est(W)
    L0 = estimate_lipschitz(W)
    assert first.L == pytest.approx(L0, rel=1e-12)
    assert first.m == pytest.approx(estimate_margin_dense(W, L0), rel=1e-9) and not first.exact
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        W = W + 1e-3 * torch.randn(50, 50, generator=g, dtype=W.dtype)
        st, exact = est(W), spectral_stats(W)
        assert st.L <= exact.L * (1 + 1e-12) and st.L >= 0.99 * exact.L
        assert exact.m - 1e-12 <= st.m <= exact.m + 0.25 * (exact.L - exact.m)
    est.reset()
    assert est(W).m == pytest.approx(estimate_margin_dense(W, estimate_lipschitz(W)), rel=1e-9)
    small = random_monotone_W(7, 0.3, seed=2)
    assert est(small).L == pytest.approx(estimate_lipschitz(small), rel=1e-12)
    bad = small.clone()
    bad[0, 0] = math.nan
    assert math.isnan(est(bad).L) and est._v is None


def test_step_estimates_of_a_convolution_continue_its_power_iterations():
    """For an operator that is not a matrix, the cold call is step_constants' 50 iterations; later
    calls continue them (a few applications) and stay one-sided against the operator's exact
    constants; a dense W after it starts cold again."""
    from monquant.operators import step_constants
    from monquant.operators.conv import ConvWKOperator
    from monquant.solvers import StepEstimates, estimate_lipschitz

    g = torch.Generator().manual_seed(3)
    A = 0.3 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    B = 0.3 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    op = ConvWKOperator(A, B, 0.2, (6, 6))
    est = StepEstimates()
    first = est(op)
    L0, m0, _ = step_constants(op, 50)
    assert (first.L, first.m) == pytest.approx((L0, m0), rel=1e-12) and not first.exact
    for k in range(10):
        op = ConvWKOperator(A + 1e-3 * k, B, 0.2, (6, 6))
        st, exact = est(op), op.spectral_stats()
        assert st.L <= exact.L * (1 + 1e-9) and st.L >= 0.95 * exact.L
        assert exact.m - 1e-9 <= st.m <= exact.m + 0.5 * (exact.L - exact.m)
    W = random_monotone_W(8, 0.3, seed=1)
    assert est(W).L == pytest.approx(estimate_lipschitz(W), rel=1e-12)


def test_reflected_prox_is_prs_reflection_bit_for_bit() -> None:
    """``R_G(v) = 2 prox(v) - v`` in one operation equals PR's ``lerp(v, prox(v), 2)`` exactly."""
    from monquant.solvers import mask_prox, reflected_prox

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        scale = 10.0 ** torch.randint(-30, 30, (64, 1), generator=g)
        v = torch.randn(64, 9, generator=g, dtype=dtype) * scale.to(dtype)
        v[0, :3] = torch.tensor([0.0, -0.0, 1e-45 if dtype == torch.float32 else 5e-324])
        for prox in (torch.relu, mask_prox(torch.rand(64, 9, generator=g) > 0.5)):
            reflect = reflected_prox(prox)
            assert reflect is not None and torch.equal(reflect(v), torch.lerp(v, prox(v), 2.0))
    assert reflected_prox(lambda v: torch.clamp(v, 0.0, 1.0)) is None  # unknown: the plain loop


@pytest.mark.parametrize("check_every", ["auto", 1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_pr_with_a_known_reflection_solves_exactly_as_the_plain_loop(check_every, masked) -> None:
    """The dense PR loop that forms z only where a check reads it gives every field of the plain
    loop's result, bit for bit (the same prox behind a wrapper takes the plain loop)."""
    from monquant.operators import wk_weight
    from monquant.solvers import SplittingMap, mask_prox

    g = torch.Generator().manual_seed(4)
    n = 30
    W = wk_weight(torch.randn(n // 2, n, generator=g) / n**0.5, torch.randn(n, n, generator=g) / n**0.5, 0.05)
    q = torch.randn(16, n, generator=g)
    prox = mask_prox(torch.rand(16, n, generator=g) > 0.3) if masked else torch.relu
    assert SplittingMap("pr", W, q, 0.5, prox).reflect_prox is not None  # the one-operation loop
    assert SplittingMap("pr", W, q, 0.5, lambda v: prox(v)).reflect_prox is None  # the plain loop
    for cap in (1, 2, 7, 500):
        cfg = SolverConfig(method="pr", tol=1e-6, max_iter=cap, check_every=check_every)
        fast = solve(W, q, cfg, prox=prox)
        plain = solve(W, q, cfg, prox=lambda v: prox(v))
        assert fast.iterations == plain.iterations
        for f in ("z", "sample_iterations", "residual", "converged", "error_bound", "state"):
            assert torch.equal(getattr(fast, f), getattr(plain, f)), f
