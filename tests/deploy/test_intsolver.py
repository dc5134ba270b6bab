"""Integer FB solver: formats, dyadic scales, the power-of-two step, overflow checks, Corollary 2."""

from __future__ import annotations

import math

import pytest
import torch

from monquant.deploy.fixedpoint import (
    INT32_MAX,
    FixedPointFormat,
    IntegerOverflowError,
    calibrate_format,
    choose_accumulator,
    dyadic_scale,
    int_matmul,
    matmul_bound,
    quantize_weights,
)
from monquant.deploy.intsolver import (
    Injection,
    IntFBSolver,
    UncertifiedOperatorError,
    bias_codes,
    deployed_bounds,
    injection_from_codes,
    injection_from_float,
    power_of_two_step,
    reference_equilibrium,
)
from monquant.operators import spectral_stats, wk_weight
from monquant.quant.uniform import quantize
from monquant.verified import modulus_upper_bound


def random_mondeq(n: int, d: int, m: float, seed: int) -> tuple[torch.Tensor, ...]:
    """A random certified MonDEQ ``(W, U, b, x)`` with ``W = (1-m) I - A^T A + B - B^T``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    U = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.randn(24, d, generator=g, dtype=torch.float64)
    return wk_weight(A, B, m), U, b, x


def integer_problem(W, U, b, x, bits: int, act_bits: int, granularity: str = "per-tensor"):
    """Quantized operator, integer injection, float64 reference and integer solver."""
    Wi = quantize_weights(W, bits, granularity)
    Ui = quantize_weights(U, 8, granularity)
    xf = calibrate_format(float(x.abs().max()), 8, signed=True)
    inj, _ = injection_from_codes(
        Ui, xf.encode(x), xf, bias_codes(b, Ui.scale.shift + xf.frac_bits)
    )
    ref = reference_equilibrium(Wi, inj)
    act = calibrate_format(float(ref.z.max()), act_bits, headroom=1.5)
    return IntFBSolver.build(Wi, act, max_iter=4000), inj, ref


# ----------------------------------------------------------------------------------------------
# Formats and scales
# ----------------------------------------------------------------------------------------------


def test_fixed_point_format_encode_decode_and_saturation():
    f = FixedPointFormat(8, 4, signed=True)
    assert (f.code_min, f.code_max, f.scale) == (-127, 127, 1 / 16)
    x = torch.tensor([0.0, 1.03, -2.5, 100.0, -100.0], dtype=torch.float64)
    c = f.encode(x)
    assert c.tolist() == [0, 16, -40, 127, -127]
    assert f.saturated(x).tolist() == [False, False, False, True, True]
    assert torch.equal(f.decode(c), c.double() / 16)
    u = FixedPointFormat(4, 0, signed=False)
    assert u.encode(torch.tensor([-3.0, 20.0])).tolist() == [0, 15]
    assert FixedPointFormat.from_dict(f.to_dict()) == f


@pytest.mark.parametrize("max_abs", [1e-3, 0.7, 1.0, 3.9, 250.0])
@pytest.mark.parametrize("signed", [True, False])
def test_calibrate_format_is_finest_covering_grid(max_abs, signed):
    f = calibrate_format(max_abs, 8, signed=signed, headroom=1.5)
    assert f.code_max * f.scale >= 1.5 * max_abs
    assert f.code_max * f.scale / 2 < 1.5 * max_abs  # one more fractional bit would not cover


def test_dyadic_scale_relative_error():
    s = torch.tensor([0.013, 0.4, 3.7e-5, 0.0], dtype=torch.float64)
    d = dyadic_scale(s, mult_bits=24)
    assert d.multiplier.dtype == torch.int64
    assert 2**23 <= d.max_multiplier <= 2**24
    assert float((d.value() - s).abs().max()) <= 2.0 ** -(d.shift + 1)
    assert abs(float(d.value()[1]) / 0.4 - 1) <= 2.0**-23
    assert float(d.value()[3]) == 0.0


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_quantize_weights_matches_paper_quantizer(granularity):
    W = random_mondeq(10, 4, 0.5, 1)[0]
    wi = quantize_weights(W, 6, granularity)
    q = quantize(W, 6, granularity)
    assert torch.equal(wi.codes, q.codes)
    rel = (wi.dequantized() - q.dequantized()).abs().max() / q.dequantized().abs().max()
    assert float(rel) <= 2.0**-23


# ----------------------------------------------------------------------------------------------
# Power-of-two step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "L"), [(0.5, 4.4), (1.0, 1.0), (0.01, 3.0), (0.3, 0.6), (0.25, 2.0)])
def test_power_of_two_step_is_certified_and_best(m, L):
    p = power_of_two_step(m, L)
    assert p is not None
    assert p.step == 2.0**-p.shift and p.step < 2 * m / L**2 and p.rho < 1
    exact = math.sqrt(1 - 2 * p.step * m + p.step**2 * L**2)
    assert exact <= p.rho and p.rho**2 <= exact**2 + 1e-14  # proved upper bound, rounded outward
    others = [modulus_upper_bound("fb", 2.0**-k, m, L) for k in range(0, 40)]
    assert p.rho == min(r for r in others if r is not None)


def test_power_of_two_step_none_without_margin():
    assert power_of_two_step(0.0, 2.0) is None
    assert power_of_two_step(-0.1, 2.0) is None


# ----------------------------------------------------------------------------------------------
# Integer matmuls and overflow detection
# ----------------------------------------------------------------------------------------------


def test_int_matmul_exact():
    W = random_mondeq(16, 4, 0.5, 2)[0]
    wi = quantize_weights(W, 8)
    c = torch.randint(0, 2**12, (5, 16))
    acc = choose_accumulator(matmul_bound(wi, 2**12 - 1))
    assert acc.dtype == torch.int32 and not acc.int32_would_overflow
    exact = c.double() @ wi.codes.double().T
    assert torch.equal(int_matmul(c, wi, acc).double(), exact)


def test_int32_overflow_is_detected_and_reported():
    """16-bit codes of magnitude 32767 times 16-bit activations over 8 terms exceed 2^31 - 1."""
    n = 8
    W = -0.5 * torch.ones(n, n, dtype=torch.float64)  # sym(I - W) = I + 0.5 * 11^T: certified
    wi = quantize_weights(W, 16)
    act = FixedPointFormat(16, 12, signed=False)
    solver = IntFBSolver.build(wi, act)
    bound = n * 32767 * (2**16 - 1)
    assert solver.accumulator.bound == bound > INT32_MAX
    assert solver.accumulator.int32_would_overflow and solver.accumulator.dtype == torch.int64
    assert solver.report()["accumulator"]["int32_would_overflow"] is True
    with pytest.raises(IntegerOverflowError, match="int32 accumulator would overflow"):
        IntFBSolver.build(wi, act, accumulator="int32")
    # the case is real: a plain int32 matmul wraps silently where int64 does not
    c = torch.full((1, n), 2**16 - 1, dtype=torch.int64)
    wrapped = c.to(torch.int32) @ wi.codes.to(torch.int32).T
    exact = int_matmul(c, wi, solver.accumulator)
    assert int(exact[0, 0]) == -bound and int(wrapped[0, 0]) != -bound
    # and the int64 solve still lands inside the predicted ball
    inj = injection_from_float(torch.full((3, n), 2.0, dtype=torch.float64), 20)
    res = solver.solve(inj)
    ref = reference_equilibrium(wi, inj)
    dist = (res.z - ref.z).norm(dim=1)
    assert bool((dist <= res.predicted_radius + ref.error_bound).all())


def test_requantization_overflow_is_detected():
    W = random_mondeq(6, 3, 0.5, 3)[0]
    solver = IntFBSolver.build(quantize_weights(W, 8), FixedPointFormat(16, 10))
    with pytest.raises(IntegerOverflowError, match="int64"):
        solver.solve(injection_from_float(torch.ones(2, 6, dtype=torch.float64), 61))
    with pytest.raises(IntegerOverflowError):
        injection_from_float(torch.ones(1, 6, dtype=torch.float64), 70)


def test_injection_from_codes_is_exact():
    _, U, b, x = random_mondeq(12, 7, 0.5, 4)
    ui = quantize_weights(U, 5, "per-channel")
    xf = calibrate_format(float(x.abs().max()), 8, signed=True)
    G = ui.scale.shift + xf.frac_bits
    inj, acc = injection_from_codes(ui, xf.encode(x), xf, bias_codes(b, G))
    assert inj.frac_bits == G and acc.dtype == torch.int32
    expected = (
        xf.decode(xf.encode(x)) @ ui.dequantized().T
        + Injection(bias_codes(b, G).reshape(1, -1), G).value()
    )
    assert torch.allclose(inj.value(), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The solver against Corollary 2
# ----------------------------------------------------------------------------------------------


def test_integer_step_error_is_exact():
    """``||e||`` reported by one integer step equals ``||z+ - T~(z)||`` recomputed in float64."""
    W, U, b, x = random_mondeq(14, 5, 0.4, 5)
    solver, inj, _ = integer_problem(W, U, b, x, 6, 10)
    plan = solver.plan(inj)
    c = torch.randint(0, solver.act.code_max // 4, inj.Q.shape)
    new, enorm, _ = solver.step_codes(c, inj.Q << plan.shift_q, plan)
    a, z = solver.step.step, solver.act.decode(c)
    T = torch.relu((1 - a) * z + a * (z @ solver.W.dequantized().T + inj.value()))
    assert torch.allclose(enorm, (solver.act.decode(new) - T).norm(dim=1), rtol=1e-9, atol=1e-15)
    assert float((solver.act.decode(new) - T).abs().max()) <= solver.act.scale / 2


@pytest.mark.parametrize(
    ("seed", "bits", "act_bits", "granularity"),
    [
        (0, 8, 8, "per-tensor"),
        (1, 6, 12, "per-tensor"),
        (2, 4, 16, "per-channel"),
        (3, 8, 16, "per-channel"),
    ],
)
def test_integer_and_float_agree_within_predicted_radius(seed, bits, act_bits, granularity):
    W, U, b, x = random_mondeq(20, 6, 0.5, seed)
    solver, inj, ref = integer_problem(W, U, b, x, bits, act_bits, granularity)
    assert solver.certified and ref.all_converged
    res = solver.solve(inj, initial_distance=ref.z.norm(dim=1) + ref.error_bound)
    dist = (res.z - ref.z).norm(dim=1)
    eps = ref.error_bound
    assert bool(res.settled.all())
    assert float((dist <= res.predicted_radius + eps).double().mean()) == 1.0
    assert bool((dist <= res.cor2_bound + eps).all())
    assert bool((dist <= res.certified_radius + eps).all())  # settled: ||e|| / (1 - rho)
    assert float(res.e_max.max()) <= math.sqrt(20) * solver.act.scale / 2 + 1e-15


def test_saturation_is_counted_and_bound_still_holds():
    W, U, b, x = random_mondeq(12, 5, 0.5, 6)
    solver, inj, ref = integer_problem(W, U, b, x, 8, 10)
    tight = FixedPointFormat(10, solver.act.frac_bits + 3)  # range 8x too small
    small = IntFBSolver.build(solver.W, tight, max_iter=3000, stats=solver.stats)
    res = small.solve(inj, initial_distance=ref.z.norm(dim=1) + ref.error_bound)
    assert int(res.saturated.sum()) > 0
    dist = (res.z - ref.z).norm(dim=1)
    assert bool((dist <= res.cor2_bound + ref.error_bound).all())


def test_uncertified_operator_is_refused_or_flagged():
    W = 2.0 * torch.eye(6, dtype=torch.float64)  # sym(I - W) = -I: margin -1
    wi = quantize_weights(W, 8)
    act = FixedPointFormat(12, 8)
    with pytest.raises(UncertifiedOperatorError, match="not certified"):
        IntFBSolver.build(wi, act)
    flagged = IntFBSolver.build(wi, act, allow_uncertified=True, max_iter=5)
    assert not flagged.certified and flagged.rho is None
    res = flagged.solve(injection_from_float(torch.ones(2, 6, dtype=torch.float64), 8))
    assert bool(torch.isinf(res.predicted_radius).all())
    good = quantize_weights(random_mondeq(6, 2, 0.5, 7)[0], 8)
    st = spectral_stats(good.dequantized())
    too_big = max(0, math.floor(-math.log2(2 * st.m / st.L**2)))  # 2^-k >= 2 m / L^2
    with pytest.raises(UncertifiedOperatorError, match="not below"):
        IntFBSolver.build(good, act, step_shift=too_big)


def test_per_sample_report_and_summary():
    W, U, b, x = random_mondeq(10, 4, 0.5, 8)
    solver, inj, _ = integer_problem(W, U, b, x, 8, 12)
    res = solver.solve(inj)
    rows = res.per_sample()
    assert len(rows) == x.shape[0]
    assert set(rows[0]) >= {"iterations", "settled", "e_max", "certified_radius"}
    s = res.summary()
    assert s["settled_fraction"] == 1.0 and s["saturated_entries"] == 0


def test_random_certified_mondeqs_all_inside():
    """Several random certified MonDEQs, weight and activation widths: every sample is inside."""
    for seed, m, bits, act_bits in [
        (10, 0.2, 5, 8),
        (11, 1.0, 3, 12),
        (12, 0.3, 7, 14),
        (13, 0.8, 4, 6),
    ]:
        W, U, b, x = random_mondeq(16, 5, m, seed)
        solver, inj, ref = integer_problem(W, U, b, x, bits, act_bits)
        res = solver.solve(inj, initial_distance=ref.z.norm(dim=1) + ref.error_bound)
        dist = (res.z - ref.z).norm(dim=1)
        assert float((dist <= res.predicted_radius + ref.error_bound).double().mean()) == 1.0
        assert bool((dist <= res.cor2_bound + ref.error_bound).all())


def test_undecided_operator_is_refused_by_the_integer_solver():
    # sym(I - W~) = 2^-2 L (4-cycle... complete-graph block): margin exactly 0, on the codes' grid
    W = torch.zeros(5, 5, dtype=torch.float64)
    W[:4, :4] = 0.25
    W[4, 4] = -1.875
    Wi = quantize_weights(W, 4)
    st = deployed_bounds(Wi)
    assert st.verdict == "undecided" and st.m_lo <= 0.0 <= st.m_hi
    act = FixedPointFormat(12, 6, signed=False)
    with pytest.raises(UncertifiedOperatorError, match="undecided"):
        IntFBSolver.build(Wi, act)
    assert power_of_two_step(st.m_lo, st.L_hi) is None
