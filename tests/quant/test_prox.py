"""Tests of monquant.quant.prox: grids, exact proxes of the W-shaped regularizers, schedules and
the trainer-agnostic ProxQuantizer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monquant.errors import MonquantError
from monquant.quant.prox import (
    Grid,
    ProxQuantError,
    ProxQuantizer,
    lambda_schedule,
    prox,
    prox_l1,
    prox_l2,
)
from monquant.quant.ste import binary_sign

GRIDS = [
    Grid("binary"),
    Grid("ternary"),
    Grid("uniform", 2),
    Grid("uniform", 3),
    Grid("uniform", 4),
]
ALL_GRIDS = GRIDS + [Grid(g.kind, g.bits, "per-channel") for g in GRIDS]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
lams = st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 0.5, 1.0, 10.0]), st.floats(0.0, 3.0))
matrices = st.lists(finite, min_size=6, max_size=6).map(
    lambda v: torch.tensor(v, dtype=torch.float64).reshape(2, 3)
)


def _regularizer(xs: np.ndarray, levels: np.ndarray, kind: str) -> np.ndarray:
    """R(x) = dist(x, L) (l1) or 1/2 dist(x, L)^2 (l2), for xs[..., N] and levels[..., K]."""
    d = np.abs(xs[..., :, None] - levels[..., None, :]).min(axis=-1)
    return d if kind == "l1" else 0.5 * d * d


def _objective(x: np.ndarray, w: np.ndarray, lam: float, levels: np.ndarray, kind: str):
    return 0.5 * (x - w) ** 2 + lam * _regularizer(x[..., None], levels, kind)[..., 0]


def _brute_force(w: np.ndarray, lam: float, levels: np.ndarray, kind: str, n: int = 20001):
    """Minimize 1/2 (x - w)^2 + lam R(x) over a uniform grid of n points per entry."""
    lo = np.minimum(w, levels.min(axis=-1)) - 0.5
    hi = np.maximum(w, levels.max(axis=-1)) + 0.5
    t = np.linspace(0.0, 1.0, n)
    xs = lo[:, None] + (hi - lo)[:, None] * t[None, :]
    g = 0.5 * (xs - w[:, None]) ** 2 + lam * _regularizer(xs, levels, kind)
    i = g.argmin(axis=1)
    rows = np.arange(len(w))
    return xs[rows, i], g[rows, i], (hi - lo) / (n - 1)


def _flat_levels(grid: Grid, w: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    lv = grid.levels(scale)  # scale.shape + (K,)
    return lv.expand(*w.shape, lv.shape[-1]).reshape(-1, lv.shape[-1]).numpy()


# --------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "quaternary"}, "kind"),
        ({"kind": "uniform", "bits": None}, "bit-width"),
        ({"kind": "uniform", "bits": 1}, "bit-width"),
        ({"kind": "uniform", "bits": 33}, "bit-width"),
        ({"kind": "uniform", "bits": 4.0}, "bit-width"),
        ({"kind": "uniform", "bits": True}, "bit-width"),
        ({"kind": "binary", "bits": 1}, "no bit-width"),
        ({"kind": "ternary", "bits": 2}, "no bit-width"),
        ({"kind": "uniform", "bits": 4, "granularity": "per-column"}, "granularity"),
    ],
)
def test_grid_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ProxQuantError, match=match):
        Grid(**kwargs)


def test_errors_are_value_errors_and_monquant_errors():
    assert issubclass(ProxQuantError, ValueError)
    assert issubclass(ProxQuantError, MonquantError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_rejected(bad):
    w = torch.tensor([0.5, bad, -1.0])
    g = Grid("uniform", 4)
    for call in (g.scale, g.nearest, lambda x: prox_l1(x, 0.1, g), lambda x: prox_l2(x, 0.1, g)):
        with pytest.raises(ProxQuantError, match="NaN or inf"):
            call(w)
    ok = torch.tensor([0.5, -1.0])
    with pytest.raises(ProxQuantError, match="scale"):
        g.nearest(ok, torch.tensor(bad))
    for lam in (-0.1, math.nan, "1", True, None):
        with pytest.raises(ProxQuantError, match="lam"):
            prox_l1(ok, lam, g)  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="scale"):
        g.nearest(ok, -1.0)
    with pytest.raises(ProxQuantError, match="does not fit"):
        g.nearest(ok, torch.ones(3))
    with pytest.raises(ProxQuantError, match="regularizer"):
        prox(ok, 0.1, g, regularizer="l0")  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="empty"):
        g.scale(torch.zeros(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_grid_levels_and_spec_quantizer(bits):
    g = Grid("uniform", bits)
    a = torch.tensor(1.7, dtype=torch.float64)
    lv = g.levels(a)
    step = 2 * 1.7 / (2**bits - 1)
    assert lv.numel() == 2**bits - 1 == g.num_levels
    assert torch.allclose(lv[1:] - lv[:-1], torch.full((lv.numel() - 1,), step, dtype=lv.dtype))
    assert float(lv.max()) == pytest.approx((2 ** (bits - 1) - 1) * step)
    w = torch.linspace(-1.7, 1.7, 1001, dtype=torch.float64)
    assert g.scale(w) == pytest.approx(1.7)
    q = g.nearest(w)
    kmax = 2 ** (bits - 1) - 1
    expected = step * torch.clamp(torch.round(w / step), -kmax, kmax)
    assert torch.equal(q, expected)
    assert float((q - w).abs().max()) <= step / 2 + 1e-12
    assert torch.equal(g.nearest(q, a), q)  # idempotent with the scale held fixed


def test_uniform_grid_matches_monquant_quantize():
    from monquant.quant.uniform import quantize

    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 8):
        for gran, alias in (("per-tensor", "per-tensor"), ("per-row", "per-channel")):
            ours = Grid("uniform", bits, gran).nearest(w)
            theirs = quantize(w, bits, alias).dequantized()
            assert torch.equal(ours, theirs)  # the same rounding rule (quant.uniform.grid_codes)
    # one vocabulary: per-channel (the old ProxQuant name per-row is accepted as an alias)
    assert Grid("uniform", 4, "per-row").granularity == "per-channel"
    assert quantize(w, 4, "per-row").granularity == "per-channel"


def test_binary_and_ternary_scales_and_ties():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.25], dtype=torch.float64)
    a = float(w.abs().mean())
    b, t = Grid("binary"), Grid("ternary")
    assert float(b.scale(w)) == pytest.approx(a) and float(t.scale(w)) == pytest.approx(a)
    assert torch.equal(b.nearest(w), a * binary_sign(w))
    assert float(b.nearest(torch.zeros(1), 1.0)) == 1.0  # sign(0) = +1
    ties = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)
    assert t.nearest(ties, 1.0).tolist() == [-1.0, 0.0, 0.0, 1.0]
    # uniform: D = 1 when a = (2^b - 1) / 2; half-to-even, odd-symmetric
    assert Grid("uniform", 3).nearest(ties, 3.5).tolist() == [-2.0, 0.0, 0.0, 2.0]


def test_per_row_scale_is_the_per_tensor_scale_of_each_row():
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for g in GRIDS:
        row = Grid(g.kind, g.bits, "per-row")
        s = row.scale(w)
        assert s.shape == (4, 1)
        q = row.nearest(w)
        for i in range(4):
            assert torch.equal(q[i], g.nearest(w[i]))
        conv = w.reshape(4, 2, 3)
        assert torch.equal(row.nearest(conv).reshape(4, 6), q)
    vec = torch.tensor([1.0, -0.3])  # fewer than 2 dims: one scale, as monquant.quantize
    assert torch.equal(Grid("uniform", 3, "per-row").nearest(vec), Grid("uniform", 3).nearest(vec))


def test_zero_tensor_and_zero_row():
    w = torch.tensor([[0.0, 0.0], [1.0, -0.2]])
    for g in ALL_GRIDS:
        q = g.nearest(w)
        assert torch.isfinite(q).all()
        if g.granularity == "per-channel":
            assert torch.equal(q[0], torch.zeros(2))


def test_recomputing_the_scale_shrinks_the_grid():
    """The documented caveat: hard quantization with a re-derived scale is not idempotent."""
    g = Grid("uniform", 2)
    w = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64)
    q = g.nearest(w)
    assert float(q.abs().max()) == pytest.approx(2 / 3)
    assert not torch.equal(g.nearest(q), q)
    assert torch.equal(g.nearest(q, g.scale(w)), q)


# ------------------------------------------------------------------------------ exact proxes


@settings(FAST, max_examples=150)
@given(w=matrices, lam=lams, grid=st.sampled_from(ALL_GRIDS), kind=st.sampled_from(["l1", "l2"]))
def test_prox_is_the_global_minimizer(w, lam, grid, kind):
    """prox(w) minimizes 1/2 (x - w)^2 + lam R(x) (checked against a fine 1-D grid search)."""
    scale = grid.scale(w)
    x = prox(w, lam, grid, scale, kind).reshape(-1).numpy()
    levels = _flat_levels(grid, w, scale)
    wf = w.reshape(-1).numpy()
    xb, gb, h = _brute_force(wf, lam, levels, kind)
    gx = _objective(x, wf, lam, levels, kind)
    assert np.all(gx <= gb + 1e-12)  # at least as good as every point of the search grid
    lip = (np.abs(levels).max(axis=1) + np.abs(wf) + 1.0) * (1.0 + lam)
    assert np.all(gx >= gb - lip * h)  # and the search is fine enough to mean something
    # where the nearest level is unique by a margin, the minimizer is unique: locations agree
    d = np.sort(np.abs(wf[:, None] - levels), axis=1)
    unique = (d[:, 1] - d[:, 0]) > 1e-2 if levels.shape[1] > 1 else np.ones_like(wf, bool)
    assert np.all(np.abs(x - xb)[unique] <= 1e-3 + 2 * h[unique])


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_prox_at_exact_ties_is_a_minimizer(kind):
    """w halfway between two levels: both candidates are minimizers; ours follows nearest()."""
    grid = Grid("uniform", 3)  # scale 3.5 -> D = 1, midpoints k + 1/2 exact
    w = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, 3.25], dtype=torch.float64)
    for lam in (0.0, 0.2, 0.5, 0.7, 3.0):
        x = prox(w, lam, grid, 3.5, kind).numpy()
        levels = np.tile(grid.levels(torch.tensor(3.5, dtype=torch.float64)).numpy(), (6, 1))
        _, gb, _ = _brute_force(w.numpy(), lam, levels, kind)
        assert np.all(_objective(x, w.numpy(), lam, levels, kind) <= gb + 1e-12)
        assert torch.equal(grid.nearest(torch.from_numpy(x), 3.5), grid.nearest(w, 3.5))


@FAST
@given(w=matrices, grid=st.sampled_from(ALL_GRIDS))
def test_lam_zero_is_identity_and_large_lam_is_projection(w, grid):
    s = grid.scale(w)
    q = grid.nearest(w, s)
    for f in (prox_l1, prox_l2):
        assert torch.equal(f(w, 0.0, grid, s), w)
        assert torch.equal(f(w, math.inf, grid, s), q)
    assert torch.equal(prox_l1(w, float((w - q).abs().max()), grid, s), q)
    assert torch.allclose(prox_l2(w, 1e9, grid, s), q, rtol=0, atol=1e-8)


@settings(FAST, max_examples=100)
@given(
    w=matrices,
    lam=lams,
    grid=st.sampled_from(ALL_GRIDS),
    kind=st.sampled_from(["l1", "l2"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_prox_stays_between_w_and_its_level(w, lam, grid, kind, dtype):
    """For every lam: prox(w) is in [w, q], so it never crosses zero and keeps nearest(w)."""
    w = w.to(dtype)
    s = grid.scale(w)
    q = grid.nearest(w, s)
    x = prox(w, lam, grid, s, kind)
    assert torch.all(x >= torch.minimum(w, q)) and torch.all(x <= torch.maximum(w, q))
    assert torch.all(x * w >= 0)  # no sign flip; 0 is reachable only when q = 0
    assert torch.all((x == 0) <= ((q == 0) | (w == 0)))
    assert torch.equal(grid.nearest(x, s), q)  # the prox never changes the hard assignment
    if grid.kind == "binary" and bool((s > 0).all()):
        assert torch.equal(binary_sign(x), binary_sign(w))
    if kind == "l1":
        moved = (x - w).abs()
        tol = 8 * torch.finfo(dtype).eps * (1 + float(w.abs().max()))
        assert torch.allclose(moved, torch.clamp((w - q).abs(), max=lam), rtol=0, atol=tol)


# ---------------------------------------------------------------------------------- schedules


def test_schedules():
    lin = lambda_schedule(lam_max=2.0, total_steps=10)
    assert [lin(t) for t in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    const = lambda_schedule("constant", lam_max=0.3, total_steps=10)
    assert const(0) == const(7) == 0.3
    exp = lambda_schedule("exponential", lam_max=1.0, total_steps=4, lam_min=1e-4)
    vals = [exp(t) for t in range(5)]
    assert vals[0] == pytest.approx(1e-4) and vals[-1] == pytest.approx(1.0)
    assert vals[2] == pytest.approx(1e-2)
    assert all(b > a for a, b in itertools.pairwise(vals))
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ProxQuantError, match="step"):
            lin(bad)  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="schedule"):
        lambda_schedule("cosine", lam_max=1.0, total_steps=3)  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="total_steps"):
        lambda_schedule(lam_max=1.0, total_steps=0)
    with pytest.raises(ProxQuantError, match="lam"):
        lambda_schedule(lam_max=-1.0, total_steps=3)
    with pytest.raises(ProxQuantError, match="lam_min"):
        lambda_schedule("exponential", lam_max=0.0, total_steps=3)


# ------------------------------------------------------------------------------ ProxQuantizer


def _regression(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 4, generator=gen)
    lin = torch.nn.Linear(8, 4)
    torch.nn.init.normal_(lin.weight, generator=gen)
    return lin, x, y


def _train(quant: ProxQuantizer, lin, x, y, opt, steps: int, start: int = 0, lr: float = 1.0):
    for t in range(start, start + steps):
        opt.zero_grad()
        w = quant.forward_weight(lin.weight)
        loss = ((x @ w.T + lin.bias - y) ** 2).mean()
        loss.backward()
        opt.step()
        quant.after_step(t + 1, lr)


@pytest.mark.parametrize("regularizer", ["l1", "l2"])
def test_prox_mode_drives_weights_to_the_grid_then_freeze_keeps_them(regularizer):
    torch.manual_seed(0)
    lin, x, y = _regression()
    grids = [(lin.weight, Grid("uniform", 3, "per-row")), (lin.bias, Grid("ternary"))]
    sched = lambda_schedule(lam_max=100.0, total_steps=150)
    quant = ProxQuantizer(grids, sched, regularizer=regularizer)
    scales = [quant.scale_of(p).clone() for p in quant.params]
    dist0 = quant.on_grid()
    opt = torch.optim.SGD(lin.parameters(), lr=0.02)
    _train(quant, lin, x, y, opt, 150, lr=0.02)
    dist = quant.on_grid()
    assert all(d < d0 for d, d0 in zip(dist, dist0, strict=True))
    if regularizer == "l1":
        assert dist == [0.0, 0.0]  # soft-thresholding lands exactly on the levels
    assert all(torch.equal(quant.scale_of(p), s) for p, s in zip(quant.params, scales, strict=True))
    quant.freeze()
    assert quant.frozen and quant.on_grid() == [0.0, 0.0]
    frozen = [p.detach().clone() for p in quant.params]
    for opt2 in (
        torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3),
        torch.optim.Adam(lin.parameters(), lr=1e-3, weight_decay=1e-2),
    ):
        _train(quant, lin, x, y, opt2, 10, start=150)
        assert quant.on_grid() == [0.0, 0.0]
        assert all(torch.equal(p, f) for p, f in zip(quant.params, frozen, strict=True))
        assert all(float(p.grad.abs().max()) == 0.0 for p in quant.params)  # gradient hook


def test_frozen_params_are_reprojected_even_if_an_optimizer_moves_them():
    lin, _, _ = _regression(1)
    quant = ProxQuantizer([(lin.weight, Grid("binary"))], lambda_schedule(lam_max=1, total_steps=1))
    quant.freeze()
    frozen = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1e-3)  # e.g. a momentum or weight-decay step
    assert quant.on_grid()[0] > 0
    quant.after_step(5)
    assert torch.equal(lin.weight, frozen)
    lin.weight.grad = torch.ones_like(lin.weight)
    quant.zero_frozen_grads()
    assert float(lin.weight.grad.abs().max()) == 0.0


def test_lazy_mode_is_a_straight_through_estimator():
    lin, x, y = _regression(2)
    quant = ProxQuantizer([(lin.weight, Grid("binary"))], mode="lazy")
    latent = lin.weight.detach().clone()
    qw = quant.quantized(lin.weight)
    assert torch.equal(qw, Grid("binary").nearest(latent))
    upstream = torch.randn_like(qw)
    (qw * upstream).sum().backward()
    assert torch.equal(lin.weight.grad, upstream)  # identity backward
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    _train(quant, lin, x, y, opt, 5)
    assert quant.on_grid()[0] > 0  # latent weights are left as they are
    assert torch.equal(quant.forward_weight(lin.weight), quant.quantized(lin.weight))
    quant.freeze()
    assert quant.on_grid() == [0.0]
    clipped = ProxQuantizer([(lin.bias, Grid("uniform", 4))], mode="lazy", ste_clip=True)
    lin.bias.grad = None
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([1.0, -0.5, 0.2, -1.0]))
    clipped.calibrate()
    clipped.dynamic_scale = False
    with torch.no_grad():
        lin.bias.mul_(torch.tensor([2.0, 1.0, 1.0, 1.0]))  # entry 0 now outside [-a, a]
    clipped.quantized(lin.bias).sum().backward()
    assert lin.bias.grad.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_proxquantizer_rejects_bad_use():
    lin = torch.nn.Linear(3, 2)
    sched = lambda_schedule(lam_max=1.0, total_steps=3)
    with pytest.raises(ProxQuantError, match="schedule"):
        ProxQuantizer([(lin.weight, Grid("binary"))])
    with pytest.raises(ProxQuantError, match="mode"):
        ProxQuantizer([(lin.weight, Grid("binary"))], sched, mode="eager")  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="regularizer"):
        ProxQuantizer([(lin.weight, Grid("binary"))], sched, regularizer="l0")  # type: ignore[arg-type]
    with pytest.raises(ProxQuantError, match="twice"):
        ProxQuantizer([(lin.weight, Grid("binary")), (lin.weight, Grid("ternary"))], sched)
    with pytest.raises(ProxQuantError, match="no parameters"):
        ProxQuantizer([], sched)
    quant = ProxQuantizer([(lin.weight, Grid("binary"))], sched)
    with pytest.raises(ProxQuantError, match="not managed"):
        quant.quantized(lin.bias)
    assert quant.penalty() > 0
