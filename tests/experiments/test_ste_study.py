"""Tests of the finite-sample STE recovery experiment (monquant.experiments.ste.study)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monquant.experiments.ste import binary_ste
from monquant.experiments.ste import study as sr
from monquant.quant.ste import binary_sign


def _problem(
    n: int = 12,
    N: int = 60,
    trials: int = 4,
    *,
    m: int = 8,
    sigma_frac: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> sr.STEProblem:
    gen = torch.Generator().manual_seed(seed)
    return sr.sample_problems(n, N, trials, m=m, sigma_frac=sigma_frac, generator=gen, dtype=dtype)


def _flip(w: torch.Tensor, coords: list[int]) -> torch.Tensor:
    out = w.clone()
    out[..., coords] *= -1
    return out


# ------------------------------------------------------------------------------------------
# Problem construction and exactness
# ------------------------------------------------------------------------------------------


def test_sample_shapes_and_labels() -> None:
    p = _problem(n=7, N=30, trials=3, m=5)
    assert p.Z.shape == (3, 30, 5, 7)
    assert set(p.w_star.unique().tolist()) <= {-1.0, 1.0}
    # the labels are v^T s(Z w*) computed straight from the (B, N, m, n) view
    direct = ((torch.einsum("bimk,bk->bim", p.Z, p.w_star) > 0).float() * p.v[:, None]).sum(-1)
    assert torch.allclose(p.y, direct, atol=1e-5)
    assert torch.equal(p.xi, torch.zeros_like(p.xi))


def test_incremental_preactivations_are_exact() -> None:
    p = _problem(n=40, N=50, trials=5)
    gen = torch.Generator().manual_seed(1)
    w = binary_sign(torch.randn(5, 40, generator=gen, dtype=torch.float64))
    h = sr.preactivations(p, w)
    for _ in range(5):
        w_new = torch.where(torch.rand(5, 40, generator=gen) < 0.3, -w, w)
        binary_ste._apply_flips(p.Zc, torch.arange(5), h, w, w_new)
        w = w_new
        assert torch.equal(h, sr.preactivations(p, w))


# ------------------------------------------------------------------------------------------
# Loss and gradient
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("surrogate", ["identity", "relu"])
def test_noiseless_optimum_is_a_fixed_point(surrogate: str) -> None:
    p = _problem()
    assert torch.equal(sr.loss(p, p.w_star), torch.zeros(p.trials, dtype=torch.float64))
    assert torch.equal(sr.ste_gradient(p, p.w_star, surrogate), torch.zeros(p.trials, p.n))
    wrong = _flip(p.w_star, [0])
    assert (sr.loss(p, wrong) > 0).all()
    u0 = p.w_star.double() * torch.linspace(0.01, 2.0, p.n, dtype=torch.float64)
    res = sr.ste_train(
        p, T=50, u0=u0, surrogate=surrogate, record=True, keep_iterates=True, early_stop=False
    )
    assert torch.equal(res.last, p.w_star.double())
    assert torch.equal(res.ergodic, p.w_star.double())
    assert res.dist is not None and res.loss is not None and res.iterates is not None
    assert torch.equal(res.dist, torch.zeros_like(res.dist))
    assert torch.equal(res.loss, torch.zeros_like(res.loss))
    assert (res.iterates == p.w_star.to(torch.int8).unsqueeze(1)).all()
    assert int(res.flips.sum()) == 0
    stopped = sr.ste_train(p, T=50, u0=u0, surrogate=surrogate)
    assert (stopped.fixed_at == 0).all()


@pytest.mark.parametrize("surrogate", ["identity", "relu"])
def test_monte_carlo_gradient_matches_population_formula(surrogate: str) -> None:
    """E g(w) = c ||v||^2 (w - w*) / sqrt(2 pi n), c = 1 (identity) or 1/2 (ReLU)."""
    n, m, N = 10, 8, 200_000
    p = _problem(n=n, N=N, trials=1, m=m, seed=3)
    w = _flip(p.w_star, [0, 3, 7])
    h = sr.preactivations(p, w)
    r = sr.residuals(p, w).double()[0]
    if surrogate == "identity":
        per_sample = r[:, None] * p.A[0].T.double()
    else:
        mask = (h[0] > 0).double() * p.v[0].double()
        per_sample = r[:, None] * torch.einsum("im,imk->ik", mask, p.Z[0].double())
    g = sr.ste_gradient(p, w, surrogate)[0].double()
    assert torch.allclose(g, per_sample.mean(0), rtol=1e-4, atol=1e-5)
    se = per_sample.std(0) / math.sqrt(N)
    pop = sr.population_gradient(p.v, w, p.w_star, surrogate)[0]
    assert ((g - pop).abs() <= 3 * se).all(), ((g - pop) / se).tolist()
    # the test has power: a constant off by a factor 2 either way is rejected
    for wrong in (2.0 * pop, 0.5 * pop):
        assert ((g - wrong).abs() > 3 * se).any()


@pytest.mark.parametrize("surrogate", ["identity", "relu"])
def test_closed_form_gradient_equals_autograd_through_ste_sign(surrogate: str) -> None:
    p = _problem(n=9, N=40, trials=3, m=6, sigma_frac=0.3, dtype=torch.float64)
    u = torch.randn(3, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u.requires_grad_(True)
    L = sr.surrogate_loss(p, u, surrogate)
    assert torch.allclose(L.detach(), sr.loss(p, binary_sign(u.detach())))
    L.sum().backward()
    assert u.grad is not None
    g = sr.ste_gradient(p, binary_sign(u.detach()), surrogate)
    assert torch.allclose(u.grad, g, rtol=1e-10, atol=1e-12)
    assert g.abs().max() > 0


def test_default_step_size_gives_unit_over_kappa_drift() -> None:
    """eta E g = (w - w*) / (2 kappa) for both surrogates."""
    p = _problem(n=16, trials=2)
    w = _flip(p.w_star, [1, 2])
    for surrogate in ("identity", "relu"):
        eta = sr.default_step_size(p.v, p.n, kappa=10.0, surrogate=surrogate)
        drift = eta[:, None] * sr.population_gradient(p.v, w, p.w_star, surrogate)
        assert torch.allclose(drift, (w - p.w_star).double() / 20.0)


# ------------------------------------------------------------------------------------------
# Recovery
# ------------------------------------------------------------------------------------------


def test_recovery_rate_increases_with_N() -> None:
    Ns = [5, 10, 20, 40, 80]
    pts = [sr.recovery_rate(10, N, trials=60, m=16, T=400, seed=1) for N in Ns]
    for est in ("ergodic", "last"):
        rates = [q[f"rate_{est}"] for q in pts]
        ses = [q[f"se_{est}"] for q in pts]
        for k in range(len(Ns) - 1):
            slack = 3 * math.hypot(ses[k], ses[k + 1]) + 1e-9
            assert rates[k + 1] >= rates[k] - slack, (est, rates)
        assert rates[0] < 0.8 and rates[-1] == 1.0, (est, rates)


@pytest.mark.parametrize("n", [10, 20, 40])
@pytest.mark.parametrize("factor", [10, 20])
def test_recovery_at_ten_n_samples(n: int, factor: int) -> None:
    res = sr.recovery_rate(n, factor * n, trials=50, seed=2)
    assert res["rate_ergodic"] >= 0.95, res
    assert res["rate_last"] >= 0.95, res


def test_early_stop_changes_no_output() -> None:
    p = _problem(n=20, N=25, trials=8, m=32, seed=11)
    a = sr.ste_train(p, T=300, record=True, keep_iterates=True, early_stop=True)
    b = sr.ste_train(p, T=300, record=True, keep_iterates=True, early_stop=False)
    assert (a.fixed_at >= 0).any() and (a.fixed_at < 0).any()
    for name in ("ergodic", "ergodic_mean", "last", "dist", "loss", "iterates"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_noisy_run_leaves_and_returns_to_optimum() -> None:
    rec = sr.recurrence_experiment(m=128, n=25, N=140, sigma_frac=0.2, T=2000, trials=1, seed=0)
    dist = torch.tensor(rec["dist_trace"])
    at = (dist == 0).nonzero().flatten()
    assert at.numel() > 0
    first = int(at[0])
    left = (dist[first:] > 0).nonzero().flatten()
    assert left.numel() > 0
    leave = first + int(left[0])
    assert (dist[leave:] == 0).any()
    assert rec["returns"][0] >= 1
    assert rec["loss_at_optimum"][0] > 0


def test_count_returns_and_visits() -> None:
    assert sr.count_visits([2, 0, 0, 2, 0, 2, 2, 0]) == 3
    assert sr.count_returns([2, 0, 0, 2, 0, 2, 2, 0]) == 2
    assert sr.count_returns([0, 2, 0]) == 1
    assert sr.count_returns([0, 0, 0]) == 0
    assert sr.count_returns([2, 2, 4]) == 0
    assert sr.count_returns([]) == 0


def test_deterministic_and_independent_of_chunking() -> None:
    a = sr.recovery_rate(20, 30, trials=12, T=300, seed=4)
    b = sr.recovery_rate(20, 30, trials=12, T=300, seed=4, chunk=5)
    assert a == b
    p1, p2 = _problem(seed=9), _problem(seed=9)
    r1, r2 = sr.ste_train(p1, T=200, record=True), sr.ste_train(p2, T=200, record=True)
    assert torch.equal(r1.ergodic_mean, r2.ergodic_mean)
    assert r1.dist is not None and r2.dist is not None
    assert torch.equal(r1.dist, r2.dist)
    c = sr.recovery_rate(20, 30, trials=12, T=300, seed=5)
    assert c["successes_ergodic"] != a["successes_ergodic"] or c != a


# ------------------------------------------------------------------------------------------
# Scaling fits
# ------------------------------------------------------------------------------------------


def test_t_quantile_known_values() -> None:
    assert sr.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert sr.t_quantile(0.975, 3) == pytest.approx(3.18245, abs=1e-4)
    assert sr.t_quantile(0.975, 30) == pytest.approx(2.04227, abs=1e-4)


def test_fit_scaling_recovers_power_law() -> None:
    ns = [10, 20, 40, 80, 160]
    exact = sr.fit_scaling(ns, [3.0 * n**1.5 for n in ns])
    assert exact["slope"] == pytest.approx(1.5)
    assert exact["ci"][1] - exact["ci"][0] < 1e-6
    wiggle = [1.1, 0.9, 1.05, 1, 0.95]
    noisy = sr.fit_scaling(ns, [3.0 * n**1.5 * f for n, f in zip(ns, wiggle, strict=True)])
    assert noisy["ci"][0] < noisy["slope"] < noisy["ci"][1]
    assert noisy["ci"][0] < 1.5 < noisy["ci"][1]
    assert sr.local_slopes([10, 20, 40], [5, 20, 40]) == pytest.approx([2.0, 1.0])


def test_interpolate_crossing() -> None:
    Ns = [10, 20, 40, 80]
    assert sr.interpolate_crossing(Ns, [0.0, 0.25, 0.75, 1.0], 0.5) == pytest.approx(
        math.sqrt(20 * 40)
    )
    # a Monte-Carlo dip is smoothed away by the isotonic fit
    assert sr.interpolate_crossing(Ns, [0.0, 0.4, 0.3, 1.0], 0.5) == pytest.approx(
        40 * 2 ** (0.15 / 0.65)
    )
    assert math.isnan(sr.interpolate_crossing(Ns, [0.6, 0.7, 0.8, 0.9], 0.5))
    assert math.isnan(sr.interpolate_crossing(Ns, [0.0, 0.1, 0.2, 0.3], 0.5))
    assert sr.isotonic_increasing([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


def test_run_quick_writes_report(tmp_path) -> None:
    from monquant.experiments.ste.report import write_report

    data_only = sr.run_ste_recovery(quick=True, progress=False)
    assert not list(tmp_path.iterdir())  # the study itself writes nothing
    res = write_report(tmp_path, data_only)
    for name in ("report.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    for stem in ("recovery_vs_N", "recovery_vs_N_over_n2", "scaling", "recurrence"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0
        assert (tmp_path / f"{stem}.pdf").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["params"]["quick"] is True and data["params"]["seed"] == 0
    assert len(data["recovery"]) == 2
    for pts in data["recovery"]:  # the adaptive grid brackets 50% and 90% for both estimators
        for key in ("rate_ergodic", "rate_last"):
            rates = [q[key] for q in pts]
            assert min(rates) < 0.5 and max(rates) >= 0.9
    assert "N50_ergodic" in data["scaling"]["fits"]
    report = (tmp_path / "report.md").read_text()
    assert "recovery_vs_N.png" in report and "t-interval" in report
    assert res["timing"]["total"] > 0


def test_cli_quick_run(tmp_path, capsys):
    from monquant.cli import main

    rc = main(["ste-recovery", "--quick", "--out", str(tmp_path), "--no-progress", "--json"])
    assert rc == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert "fits" in out["scaling"] and (tmp_path / "report.md").exists()
