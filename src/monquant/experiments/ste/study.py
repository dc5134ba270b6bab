r"""Finite-sample STE recovery of a planted binary two-layer network (Jeong, Xin, Yin).

Model
-----
Each trial draws inputs ``Z_i in R^{m x n}`` (i = 1..N) with i.i.d. N(0, 1) entries, a fixed, known
second layer ``v ~ N(0, I_m)`` and a binary teacher ``w* ~ Unif{+-1}^n``. With the step activation
``s(t) = 1[t > 0]`` (elementwise, so ``s(0) = 0``) the network output and the labels are

    y(Z; w) = v^T s(Z w),        y_i = v^T s(Z_i w*) + xi_i,   xi_i ~ N(0, sigma^2),

and the training loss at a binary ``w`` is ``L(w) = (1/2N) sum_i r_i^2`` with the residual
``r_i(w) = v^T s(Z_i w) - y_i``.

STE coarse gradient
-------------------
``L`` is piecewise constant in ``w``, so the straight-through estimator replaces ``s'`` by the
derivative of a surrogate ``mu``:

    g(w) = (1/N) sum_i r_i Z_i^T (v o mu'(Z_i w)).

* identity surrogate (``mu(t) = t``, ``mu' = 1``):  ``g(w) = (1/N) sum_i r_i Z_i^T v``;
* ReLU surrogate (``mu(t) = max(t, 0)``, ``mu'(t) = 1[t > 0] = s(t)``):
  ``g(w) = (1/N) sum_i r_i Z_i^T (v o s(Z_i w))``.

Population gradient (``E`` over Z and xi, for binary ``w``, so ``||w|| = ||w*|| = sqrt(n)``). Write
``z_j`` for the j-th row of Z. Rows are independent and centred, and ``P(z^T w > 0) = 1/2`` for
every ``w``, so only the ``j = k`` terms of ``r Z^T v = sum_{j,k} v_j v_k (s_j(w) - s_j(w*)) z_k``
survive. For unit vectors ``a, b`` at angle ``theta`` (a 2-D computation in their plane, with
``E|z| = sqrt(pi/2)`` for the 2-D radius):

    E[z 1[z^T a > 0]]                = a / sqrt(2 pi),
    E[z 1[z^T a > 0] 1[z^T b > 0]]   = (a + b) / (2 sqrt(2 pi)).

Hence, with ``c = 1`` (identity) or ``c = 1/2`` (ReLU),

    E g(w) = c ||v||^2 (w - w*) / sqrt(2 pi n).

The ReLU case uses ``E[z (s(z^T w) - s(z^T w*)) s(z^T w)] = E[z 1[z^T w > 0, z^T w* <= 0]]
= (w - w*) / (2 sqrt(2 pi n))``. Label noise is independent of Z and centred, so it adds nothing.

Algorithm
---------
Latent iteration ``u_{t+1} = u_t - eta g(w_t)``, ``w_t = sign(u_t)`` (``sign(0) = +1``), from
``u_0 ~ N(0, I)``. The default step ``eta = sqrt(2 pi n) / (2 kappa c ||v||^2)`` makes the expected
step ``-(w_t - w*) / (2 kappa)``: a wrong coordinate moves by ``1/kappa`` toward the right sign per
step. Outputs: the ergodic estimate ``sign((1/T) sum_{t=1}^T w_t)`` and the last iterate ``w_T``.

Implementation notes
--------------------
* Entries of Z are N(0, 1) clipped to ``[-8, 8]`` and rounded to the dyadic grid ``2^-f Z``,
  ``f`` chosen per ``n`` and dtype (in float32 ``f = 15`` for ``n = 10`` down to ``f = 11`` for
  ``n = 160``) so that every partial sum of ``+-z_k`` is exact. ``Z w`` is then computed
  *exactly* for binary ``w``, in any summation order; this lets the trainer update the
  pre-activations incrementally (only the flipped columns of Z are touched) and keeps results
  bit-identical across batch sizes. The distortion of the Gaussian law is at the ``1e-4`` level
  and the clipping has probability ``6e-16`` per entry.
* Residuals are evaluated as ``r_i = v^T (s(Z_i w) - s(Z_i w*)) - xi_i``, equal to the definition,
  and exactly zero when the activation patterns agree. In the noiseless case a trial whose
  residuals are all zero sits at a fixed point (``g = 0``), so the trainer stops it early and
  fills in the remaining iterates.
* Batches are independent trials: one tensor computation per step with leading dimension
  ``trials``. Z is stored column-first (``Zc`` has shape ``(trials, n, N, m)``); ``problem.Z`` is
  the ``(trials, N, m, n)`` view.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from monquant.experiments.ste.binary_ste import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_NS,
    DEFAULT_RATIOS,
    QUICK_RATIOS,
    STEProblem,
    STETrainResult,
    Surrogate,
    default_step_size,
    grid_bits,
    loss,
    population_gradient,
    preactivations,
    residuals,
    sample_problems,
    ste_gradient,
    ste_train,
    surrogate_loss,
)
from monquant.experiments.ste.scaling_fit import (
    bootstrap_slope,
    fit_scaling,
    interpolate_crossing,
    isotonic_increasing,
    local_slopes,
    t_quantile,
)
from monquant.progress import progress_bar
from monquant.runtime import torch_threads

__all__ = [
    "DEFAULT_NS",
    "STEProblem",
    "STETrainResult",
    "bootstrap_slope",
    "count_returns",
    "count_visits",
    "default_N_grid",
    "default_step_size",
    "fit_scaling",
    "grid_bits",
    "interpolate_crossing",
    "isotonic_increasing",
    "local_slopes",
    "loss",
    "population_gradient",
    "preactivations",
    "recovery_rate",
    "recurrence_experiment",
    "residuals",
    "run_ste_recovery",
    "sample_problems",
    "ste_gradient",
    "ste_train",
    "surrogate_loss",
    "t_quantile",
]


# --------------------------------------------------------------------------------------------
# Recovery rate
# --------------------------------------------------------------------------------------------


def _point_seed(seed: int, *keys: int) -> int:
    """Deterministic 63-bit seed for one experiment point (a simple multiplicative mix)."""
    h = seed & 0xFFFFFFFFFFFF
    for k in keys:
        h = (h * 0x100000001B3 + int(k) + 0x9E3779B97F4A7C15) % (1 << 63)
    return h


def _chunk_size(n: int, N: int, m: int, max_chunk_bytes: int, itemsize: int = 4) -> int:
    """Trials per chunk so that Z plus per-trial work tensors stay within ``max_chunk_bytes``."""
    per_trial = itemsize * N * (n * m + 3 * m + 2 * n) + N * m
    return max(1, int(max_chunk_bytes // per_trial))


def recovery_rate(
    n: int,
    N: int,
    *,
    trials: int = 50,
    m: int = 32,
    T: int = 2000,
    kappa: float = 10.0,
    sigma_frac: float = 0.0,
    surrogate: Surrogate = "identity",
    seed: int = 0,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Exact-recovery rate of ``w*`` by the ergodic estimate and the last iterate.

    ``trials`` independent problems are drawn (sequentially, from a generator seeded by
    ``(seed, n, N, m)``) and trained in chunks of ``chunk`` trials (default: as many as fit in
    ``max_chunk_bytes``); the chunking does not change the results. Returns the rates, their
    binomial standard errors ``sqrt(p (1-p) / trials)``, the per-trial successes, the fraction of
    trials that reached a fixed point and the mean time it took.
    """
    gen = torch.Generator().manual_seed(_point_seed(seed, n, N, m))
    size = chunk or _chunk_size(n, N, m, max_chunk_bytes, torch.finfo(dtype).bits // 8)
    erg_ok, last_ok, fixed = [], [], []
    for start in range(0, trials, size):
        prob = sample_problems(
            n, N, min(size, trials - start), m=m, sigma_frac=sigma_frac, generator=gen, dtype=dtype
        )
        res = ste_train(prob, T=T, kappa=kappa, surrogate=surrogate)
        w_star = prob.w_star.double()
        erg_ok.append((res.ergodic == w_star).all(dim=-1))
        last_ok.append((res.last == w_star).all(dim=-1))
        fixed.append(res.fixed_at)
        del prob, res
    erg, lst, fx = torch.cat(erg_ok), torch.cat(last_ok), torch.cat(fixed)
    return _rate_summary(n, N, m, trials, erg, lst, fx)


def _rate_summary(
    n: int,
    N: int,
    m: int,
    trials: int,
    erg: torch.Tensor,
    lst: torch.Tensor,
    fixed_at: torch.Tensor,
) -> dict[str, Any]:
    """Rates, standard errors and fixed-point statistics of one (n, N) point."""
    pe, pl = erg.double().mean().item(), lst.double().mean().item()
    reached = fixed_at >= 0
    return {
        "n": n,
        "N": N,
        "m": m,
        "trials": trials,
        "N_over_n": N / n,
        "N_over_n2": N / n**2,
        "rate_ergodic": pe,
        "rate_last": pl,
        "se_ergodic": math.sqrt(pe * (1 - pe) / trials),
        "se_last": math.sqrt(pl * (1 - pl) / trials),
        "successes_ergodic": int(erg.sum()),
        "successes_last": int(lst.sum()),
        "frac_fixed_point": reached.double().mean().item(),
        "mean_fixed_at": fixed_at[reached].double().mean().item() if reached.any() else None,
    }


# --------------------------------------------------------------------------------------------
# Recurrence
# --------------------------------------------------------------------------------------------


def count_visits(dist: torch.Tensor | Sequence[float]) -> int:
    """Number of separate visits to ``w*``: maximal runs of ``dist == 0`` in a 1-D trace."""
    at = torch.as_tensor(dist) == 0
    if at.numel() == 0:
        return 0
    entries = int((at[1:] & ~at[:-1]).sum())
    return entries + int(at[0])


def count_returns(dist: torch.Tensor | Sequence[float]) -> int:
    """Returns to ``w*``: entries into ``w*`` (``dist == 0``) after having been there and left.

    The first visit is not a return, so this is ``max(visits - 1, 0)``.
    """
    return max(count_visits(dist) - 1, 0)


def recurrence_experiment(
    *,
    m: int = 128,
    n: int = 25,
    N: int = 140,
    sigma_frac: float = 0.2,
    T: int = 2000,
    trials: int = 20,
    kappa: float = 10.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Noisy run(s): traces of ``||w_t - w*||`` and ``L(w_t)`` and the returns to ``w*``.

    Trial 0 is the showcased run; the other trials give the spread of the return count.
    """
    gen = torch.Generator().manual_seed(_point_seed(seed, 7, n, N, m))
    prob = sample_problems(n, N, trials, m=m, sigma_frac=sigma_frac, generator=gen)
    res = ste_train(prob, T=T, kappa=kappa, record=True)
    assert res.dist is not None and res.loss is not None
    returns = [count_returns(d) for d in res.dist]
    visits = [count_visits(d) for d in res.dist]
    w_star = prob.w_star.double()
    return {
        "m": m,
        "n": n,
        "N": N,
        "T": T,
        "trials": trials,
        "sigma_frac": sigma_frac,
        "sigma": prob.sigma.tolist(),
        "kappa": kappa,
        "returns": returns,
        "visits": visits,
        "frac_time_at_optimum": (res.dist == 0).double().mean(dim=-1).tolist(),
        "first_hit": [int(torch.nonzero(d == 0)[0]) if (d == 0).any() else None for d in res.dist],
        "loss_at_optimum": loss(prob, prob.w_star).tolist(),
        "ergodic_recovered": (res.ergodic == w_star).all(dim=-1).tolist(),
        "last_recovered": (res.last == w_star).all(dim=-1).tolist(),
        "dist_trace": res.dist[0].tolist(),
        "loss_trace": res.loss[0].tolist(),
    }


# --------------------------------------------------------------------------------------------
# The full experiment
# --------------------------------------------------------------------------------------------


def default_N_grid(n: int, ratios: Sequence[float] = DEFAULT_RATIOS) -> list[int]:
    """Geometric grid ``N = round(r n)`` over ``ratios`` (distinct, at least 2)."""
    return sorted({max(2, round(r * n)) for r in ratios})


def _low(point: dict[str, Any]) -> bool:
    """Both estimators below 50%: the point brackets N50 from below."""
    return max(point["rate_ergodic"], point["rate_last"]) < 0.5


def _high(point: dict[str, Any]) -> bool:
    """Both estimators at 90% or more: the point brackets N90 from above."""
    return min(point["rate_ergodic"], point["rate_last"]) >= 0.9


def _curve(
    n: int, grid: Sequence[int], cfg: dict[str, Any], bar: Any, adaptive: bool
) -> list[dict[str, Any]]:
    """Rates on the ascending ``grid`` of one ``n``, sorted by ``N``.

    Adaptive rule (``adaptive=True``): the grid is walked from the largest ``N`` down and the walk
    stops after the first point where both rates are 0 (the rate is non-decreasing in ``N``, so
    smaller ``N`` carry no information and are the slowest points: no trial converges early).
    Then, while the largest point is not at 90% for both estimators, or the smallest is not below
    50% for both, the grid is extended by its end ratio (at most ``cfg["max_extend"]`` points
    each way), so that N50 and N90 are bracketed.
    """

    def rate(N: int) -> dict[str, Any]:
        keys = ("trials", "m", "T", "kappa", "seed", "max_chunk_bytes")
        point = recovery_rate(n, N, **{k: cfg[k] for k in keys})
        bar.update()
        return point

    pts: list[dict[str, Any]] = []
    for j, N in enumerate(reversed(grid)):
        pts.append(rate(N))
        if adaptive and pts[-1]["rate_ergodic"] == 0 and pts[-1]["rate_last"] == 0:
            bar.total -= len(grid) - j - 1
            bar.refresh()
            break
    if not adaptive or len(grid) < 2:
        return sorted(pts, key=lambda p: p["N"])
    up, down = grid[-1] / grid[-2], grid[0] / grid[1]
    for factor, done, end in ((up, _high, max), (down, _low, min)):
        for _ in range(cfg["max_extend"]):
            edge = end(pts, key=lambda p: p["N"])
            N = round(edge["N"] * factor)
            if done(edge) or N < 2 or N == edge["N"]:
                break
            bar.total += 1
            pts.append(rate(N))
    return sorted(pts, key=lambda p: p["N"])


def _stage_recovery(
    ns: Sequence[int],
    ratios: Sequence[float],
    cfg: dict[str, Any],
    progress: bool,
    adaptive: bool = True,
) -> list[list[dict[str, Any]]]:
    """Stage 1: recovery-rate curves, a list (one per ``n``) of per-``N`` summaries."""
    grids = {n: default_N_grid(n, ratios) for n in ns}
    total = sum(map(len, grids.values()))
    bar = progress_bar(desc="stage 1: recovery rate", enabled=progress, total=total, leave=True)
    with bar:
        return [_curve(n, grids[n], cfg, bar, adaptive) for n in ns]


def _stage_scaling(curves: list[list[dict[str, Any]]], seed: int, n_boot: int) -> dict[str, Any]:
    """Stage 2: N50 / N90 per ``n`` and the slope of ``log N50`` (and ``log N90``) on ``log n``."""
    ns = [pts[0]["n"] for pts in curves]
    table, fits = [], {}
    for est in ("ergodic", "last"):
        key = f"rate_{est}"
        for level in (0.5, 0.9):
            name = f"N{round(100 * level)}_{est}"
            vals = [
                interpolate_crossing([p["N"] for p in pts], [p[key] for p in pts], level)
                for pts in curves
            ]
            fit = fit_scaling(ns, vals)
            fit["local_slopes"] = local_slopes(ns, vals)
            fit["bootstrap"] = bootstrap_slope(curves, key, level, n_boot=n_boot, seed=seed)
            fits[name] = {"values": vals, **fit}
    for j, n in enumerate(ns):
        table.append({"n": n, **{k: f["values"][j] for k, f in fits.items()}})
    return {"table": table, "fits": fits}


def _resolve_config(
    quick: bool, trials: int, ns: Sequence[int], T: int, ratios: Sequence[float] | None
) -> tuple[int, tuple[int, ...], int, tuple[float, ...]]:
    """Apply the quick-mode caps (20 trials, first two ``n``, T <= 500, 5 grid points)."""
    if not quick:
        return trials, tuple(ns), T, tuple(ratios or DEFAULT_RATIOS)
    return min(trials, 20), tuple(ns)[:2], min(T, 500), tuple(ratios or QUICK_RATIOS)


def _run_stages(
    ns: Sequence[int],
    ratios: Sequence[float],
    cfg: dict[str, Any],
    rec_cfg: dict[str, Any],
    progress: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Stages 1-3, timed; returns the results (without figures) and the wall time per stage."""
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    curves = _stage_recovery(ns, ratios, cfg, progress, cfg["adaptive"])
    timing["1_recovery"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    scaling = _stage_scaling(curves, cfg["seed"], cfg["n_boot"])
    timing["2_scaling"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in progress_bar(range(1), desc="stage 3: recurrence", enabled=progress, leave=True):
        rec = recurrence_experiment(**rec_cfg, kappa=cfg["kappa"], seed=cfg["seed"])
    timing["3_recurrence"] = time.perf_counter() - t2
    return {"recovery": curves, "scaling": scaling, "recurrence": rec}, timing


def run_ste_recovery(
    *,
    quick: bool = False,
    seed: int = 0,
    trials: int = 50,
    ns: Sequence[int] = DEFAULT_NS,
    m: int = 32,
    T: int = 2000,
    progress: bool = True,
    kappa: float = 10.0,
    ratios: Sequence[float] | None = None,
    adaptive: bool = True,
    max_extend: int = 4,
    recurrence_m: int = 128,
    recurrence_n: int = 25,
    recurrence_N: int = 140,
    sigma_frac: float = 0.2,
    recurrence_T: int = 2000,
    recurrence_trials: int = 20,
    n_boot: int = 1000,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run experiments 1-3 and return their results (plain data; nothing is written).

    :func:`monquant.experiments.ste.report.write_report` renders them: ``report.md``,
    ``results.json`` and the figures.

    The ``N`` grid of each ``n`` is ``round(r n)`` for ``r`` in ``ratios`` (default
    ``2^(k/2)``, k = -2..8), walked adaptively (see :func:`_curve`; ``adaptive=False`` evaluates
    the plain grid). ``quick=True`` caps the work (the first two of ``ns``, ratios 0.5..8,
    20 trials, T <= 500, 200 bootstrap replicates, 5 recurrence trials) for a smoke run of a
    few seconds.
    ``threads`` sets torch's intra-op threads during the run (restored afterwards; ``None``
    leaves them): the per-step tensors are small, so one thread loses little on an idle machine
    and avoids the large slow-down of OpenMP spin-waiting when the cores are shared.
    """
    trials, ns, T, ratios = _resolve_config(quick, trials, ns, T, ratios)
    if quick:
        n_boot, recurrence_trials = min(n_boot, 200), min(recurrence_trials, 5)
    cfg = {
        "trials": trials,
        "m": m,
        "T": T,
        "kappa": kappa,
        "seed": seed,
        "n_boot": n_boot,
        "max_chunk_bytes": max_chunk_bytes,
        "adaptive": adaptive,
        "max_extend": max_extend,
    }
    rec_cfg = {
        "m": recurrence_m,
        "n": recurrence_n,
        "N": recurrence_N,
        "sigma_frac": sigma_frac,
        "T": recurrence_T,
        "trials": recurrence_trials,
    }
    t0 = time.perf_counter()
    with torch_threads(threads):
        params = {
            "quick": quick,
            "ns": list(ns),
            **cfg,
            "recurrence": rec_cfg,
            "N_over_n_grid": [round(r, 4) for r in ratios],
            "torch_threads": torch.get_num_threads(),
        }
        results, timing = _run_stages(ns, ratios, cfg, rec_cfg, progress)
    timing["total"] = time.perf_counter() - t0
    return {"params": params, "timing": timing, **results}
