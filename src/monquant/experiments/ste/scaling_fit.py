"""Scaling-law fits for sample-complexity curves: crossings, monotone smoothing, log-log slopes.

``interpolate_crossing`` finds where a rate curve reaches a level (on log N), ``fit_scaling`` fits
``log N = a + s log n`` with a t confidence interval, ``bootstrap_slope`` resamples trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from monquant.errors import ConfigError

__all__ = [
    "bootstrap_slope",
    "fit_scaling",
    "interpolate_crossing",
    "isotonic_increasing",
    "local_slopes",
    "t_quantile",
]


# --------------------------------------------------------------------------------------------
# Scaling fits
# --------------------------------------------------------------------------------------------


def isotonic_increasing(y: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """Least-squares non-decreasing fit of ``y`` (pool-adjacent-violators)."""
    wts = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(np.asarray(y, dtype=float), wts, strict=True):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([np.full(int(c), mu) for mu, _, c in blocks])


def interpolate_crossing(Ns: Sequence[float], rates: Sequence[float], level: float) -> float:
    """The ``N`` where the rate first reaches ``level``, linear in ``log N``; NaN if unbracketed.

    The rates are first made monotone (isotonic regression) so Monte-Carlo wiggles do not produce
    several crossings. If the first grid point already reaches ``level`` or none does, the
    crossing is not bracketed by the grid and NaN is returned.
    """
    x = np.log(np.asarray(Ns, dtype=float))
    p = isotonic_increasing(rates)
    hit = np.nonzero(p >= level)[0]
    if hit.size == 0 or hit[0] == 0:
        return float("nan")
    k = int(hit[0])
    frac = (level - p[k - 1]) / (p[k] - p[k - 1])
    return float(math.exp(x[k - 1] + frac * (x[k] - x[k - 1])))


def _t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    """Student-t density ``Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1+x^2/df)^-((df+1)/2)``."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))


def _t_cdf(x: float, df: float, panels: int = 4000) -> float:
    """Student-t CDF: ``1/2 + int_0^x pdf`` by composite Simpson's rule (x >= 0)."""
    grid = np.linspace(0.0, x, panels + 1)
    f = _t_pdf(grid, df)
    h = x / panels
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t for ``p`` in (1/2, 1) by bisection on the Simpson CDF."""
    if not 0.5 < p < 1.0:
        raise ConfigError("t_quantile needs 1/2 < p < 1")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def fit_scaling(ns: Sequence[float], Ns: Sequence[float], conf: float = 0.95) -> dict[str, Any]:
    """Least-squares fit ``log N = a + b log n`` with a ``conf`` t-interval for the slope ``b``.

    ``se(b) = sqrt(RSS / (k - 2) / sum (x - xbar)^2)`` over the ``k`` finite points and the
    interval is ``b +- t_{(1+conf)/2, k-2} se(b)``; with ``k = 2`` only the slope is returned.
    """
    x, y = np.log(np.asarray(ns, dtype=float)), np.log(np.asarray(Ns, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    k = int(x.size)
    out: dict[str, Any] = {
        "points": k,
        "conf": conf,
        "slope": float("nan"),
        "intercept": float("nan"),
        "se": float("nan"),
        "ci": [float("nan"), float("nan")],
        "df": max(k - 2, 0),
    }
    if k < 2:
        return out
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    out.update(slope=slope, intercept=float(y.mean() - slope * x.mean()))
    if k > 2:
        resid = y - out["intercept"] - slope * x
        se = math.sqrt(float((resid**2).sum()) / (k - 2) / float((xc * xc).sum()))
        tq = t_quantile((1 + conf) / 2, k - 2)
        out.update(se=se, t=tq, ci=[slope - tq * se, slope + tq * se])
    return out


def local_slopes(ns: Sequence[float], Ns: Sequence[float]) -> list[float]:
    """Slopes between consecutive points: ``log(N_{j+1} / N_j) / log(n_{j+1} / n_j)``."""
    pts = list(zip(ns, Ns, strict=True))
    return [
        math.log(N1 / N0) / math.log(n1 / n0) if N0 > 0 and N1 > 0 else math.nan
        for (n0, N0), (n1, N1) in pairwise(pts)
    ]


def bootstrap_slope(
    points: Sequence[Sequence[dict[str, Any]]],
    key: str,
    level: float,
    *,
    n_boot: int = 1000,
    conf: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap over trials for the slope of ``log N_level`` against ``log n``.

    ``points[j]`` is the list of rate summaries (from :func:`recovery_rate`) of the j-th ``n``.
    Resampling the trials of a grid point with replacement draws its success count from
    ``Binomial(trials, p_hat)``; each replicate recomputes every crossing and the slope.
    Replicates with fewer than two finite crossings are dropped (their count is reported).
    """
    rng = np.random.default_rng(seed)
    ns = [pts[0]["n"] for pts in points]
    slopes = []
    for _ in range(n_boot):
        cross = []
        for pts in points:
            sims = [rng.binomial(p["trials"], p[key]) / p["trials"] for p in pts]
            cross.append(interpolate_crossing([p["N"] for p in pts], sims, level))
        s = fit_scaling(ns, cross)["slope"]
        if math.isfinite(s):
            slopes.append(s)
    lo, hi = (
        np.quantile(slopes, [(1 - conf) / 2, (1 + conf) / 2])
        if slopes
        else (float("nan"), float("nan"))
    )
    return {"ci": [float(lo), float(hi)], "n_boot": n_boot, "valid": len(slopes), "conf": conf}
