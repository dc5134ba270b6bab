"""Certified prediction agreement and robustness (monquant.behaviour): every certificate is checked
against precise solves of both models, and a property test hunts for a certificate that claims
agreement or robustness where the measured predictions differ."""

from __future__ import annotations

import pytest
import torch
from conftest import small_classifier as small_model
from hypothesis import given
from hypothesis import strategies as st

from monquant.behaviour import (
    ModelWeights,
    agreement,
    equilibrium_lipschitz,
    swapped_displacement_bound,
)
from monquant.quant.uniform import quantize
from monquant.solvers import SolverConfig, solve

PRECISE = SolverConfig(method="pr", tol=1e-13, max_iter=100_000)


def _predict(w: ModelWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = solve(w.W, x @ w.U.T + w.b, PRECISE).z
    return (z @ w.C.T + w.c).argmax(dim=1), z


@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4, 6, 8]),
       margin=st.sampled_from([0.05, 0.3, 1.0]))  # fmt: skip
def test_certified_agreement_and_radii_never_claim_what_solves_contradict(
    seed: int, bits: int, margin: float
) -> None:
    model = small_model(seed, margin)
    f = ModelWeights.of(model)
    g = ModelWeights.of(model, W=quantize(f.W, bits).dequantized())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    rep = agreement(f, g, x)
    pf, zf = _predict(f, x)
    pq, zq = _predict(g, x)
    assert torch.equal(rep.float_prediction[rep.float_certified], pf[rep.float_certified])
    assert bool((pq[rep.certified_agreement] == pf[rep.certified_agreement]).all())
    # the displacement bound holds wherever it is finite
    dist = torch.linalg.vector_norm(zf - zq, dim=1)
    finite = torch.isfinite(rep.displacement_bound)
    assert bool((dist[finite] <= rep.displacement_bound[finite] + 1e-9).all())
    # inside the certified radius the prediction does not change (float and quantized)
    for w, radius, ok in ((f, rep.radius_float, rep.float_certified),
                          (g, rep.radius_quantized, rep.certified_agreement)):  # fmt: skip
        idx = ok.nonzero().flatten()
        if idx.numel() == 0:
            continue
        u = torch.randn(idx.numel(), 8, generator=gen, dtype=torch.float64)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
        xp = x[idx] + 0.999 * radius[idx, None] * u
        assert torch.equal(_predict(w, xp)[0], rep.float_prediction[idx])


def test_some_agreement_is_certified_at_high_bits_and_none_when_W_tilde_is_not_monotone() -> None:
    model = small_model(1, 1.0)
    f = ModelWeights.of(model)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hi = agreement(f, ModelWeights.of(model, W=quantize(f.W, 16).dequantized()), x)
    assert hi.certified_agreement.double().mean() > 0.9
    bad = ModelWeights.of(model, W=f.W + 2.0 * torch.eye(12, dtype=torch.float64))  # margin < 0
    rep = agreement(f, bad, x)
    assert not bool(rep.certified_agreement.any()) and float(rep.radius_quantized.max()) == 0.0
    assert rep.constants["margin_quantized_lower"] < 0


def test_lipschitz_constant_bounds_the_equilibrium_map() -> None:
    model = small_model(2, 0.2)
    f = ModelWeights.of(model)
    from monquant.verified import norm2_bounds, spectral_bounds

    lip = equilibrium_lipschitz(norm2_bounds(f.U)[0], spectral_bounds(f.W).m_lo)
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    z1, z2 = _predict(f, x1)[1], _predict(f, x2)[1]
    ratio = torch.linalg.vector_norm(z1 - z2, dim=1) / torch.linalg.vector_norm(x1 - x2, dim=1)
    assert float(ratio.max()) <= lip
    assert equilibrium_lipschitz(1.0, 0.0) == float("inf")


def test_swapped_displacement_bound_needs_a_proved_margin() -> None:
    assert torch.isinf(swapped_displacement_bound(torch.tensor([1.0]), 0.0, 0.0)).all()
    assert float(swapped_displacement_bound(torch.tensor([1.0]), 0.5, 0.5)) == pytest.approx(3.0)


def test_the_quantized_solve_only_adds_certificates() -> None:
    model = small_model(4, 0.3)
    f = ModelWeights.of(model)
    g = ModelWeights.of(model, W=quantize(f.W, 6).dequantized())
    x = torch.randn(80, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    both = agreement(f, g, x)
    t3 = agreement(f, g, x, quantized_solve=False)
    assert torch.equal(both.agreement_theorem3, t3.certified_agreement)
    assert bool((t3.certified_agreement <= both.certified_agreement).all())
    assert bool((both.radius_quantized >= t3.radius_quantized).all())
    assert both.summary()["certified_agreement_rate"] >= both.summary()["certified_agreement_rate_theorem3"]


def test_a_float_reference_serves_several_quantized_models() -> None:
    from monquant.behaviour import FloatReference

    model = small_model(6, 0.4)
    f = ModelWeights.of(model)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = FloatReference.solve(f, x)
    for bits in (4, 8):
        g = ModelWeights.of(model, W=quantize(f.W, bits).dequantized())
        a, b = agreement(ref, g), agreement(f, g, x)
        for name in ("certified_agreement", "radius_float", "radius_quantized", "agreement_theorem3"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_solve_that_hits_its_cap_is_counted_and_certifies_nothing() -> None:
    model = small_model(8, 0.3)
    f = ModelWeights.of(model)
    g = ModelWeights.of(model, W=quantize(f.W, 8).dequantized())
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ok = agreement(f, g, x)
    assert ok.constants["float_solves_unconverged"] == 0
    assert ok.constants["quantized_solves_unconverged"] == 0
    capped = agreement(f, g, x, max_iter=1)
    assert capped.constants["float_solves_unconverged"] == 20
    assert not bool(capped.certified_agreement.any()) and not bool(capped.float_certified.any())
