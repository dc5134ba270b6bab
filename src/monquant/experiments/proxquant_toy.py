"""The ProxQuant paper's one-dimensional example: BinaryConnect against ProxQuant (its Figure 1).

``f_c(x) = |x + c/2|`` on ``x in R`` with the binary grid ``{-1, 1}``: for each ``c`` one binary point
is a minimizer of ``f_c`` over the grid. BinaryConnect's lazy iteration keeps oscillating and lands
on a level chosen by the parity of the step count; ProxQuant's prox path converges to the binary
minimizer. Returns data only (:class:`ToyResult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from monquant.quant.prox import Grid, ProxQuantError, ScheduleKind, lambda_schedule, prox_l1

__all__ = ["ToyResult", "toy_binaryconnect_vs_proxquant", "toy_grad", "toy_objective"]



def toy_objective(x: float, c: int) -> float:
    """``f_c(x) = |x + c/2| - 1/2`` for ``c in {1, -1}``: ``f_1(-1) = f_-1(+1) = 0``, else 1."""
    _check_toy_c(c)
    return abs(x + c / 2) - 0.5


def toy_grad(x: float, c: int) -> float:
    """A subgradient of ``f_c``: ``sign(x + c/2)`` (0 at the kink)."""
    _check_toy_c(c)
    return float(math.copysign(1.0, x + c / 2)) if x + c / 2 != 0 else 0.0


def _check_toy_c(c: int) -> None:
    if c not in (1, -1):
        raise ProxQuantError(f"toy index c must be 1 or -1, got {c!r}")


@dataclass(frozen=True)
class ToyResult:
    """Final points and paths ``x_0..x_T`` of both methods on ``f_1`` and ``f_-1`` (keys 1, -1).

    ``binaryconnect`` holds the final latent iterate and ``binaryconnect_quantized`` its sign (the
    weight BinaryConnect would deploy); ``proxquant`` the final ProxQuant iterate.
    """

    binaryconnect: dict[int, float]
    binaryconnect_quantized: dict[int, float]
    proxquant: dict[int, float]
    binaryconnect_paths: dict[int, tuple[float, ...]]
    proxquant_paths: dict[int, tuple[float, ...]]


def _run_binaryconnect(c: int, x0: float, steps: int, lr: float) -> tuple[float, ...]:
    """Lazy iteration ``x_{t+1} = x_t - lr f_c'(sign(x_t))`` with ``sign(0) = +1``."""
    path = [x0]
    for _ in range(steps):
        x = path[-1]
        path.append(x - lr * toy_grad(1.0 if x >= 0 else -1.0, c))
    return tuple(path)


def _run_proxquant(
    c: int, x0: float, steps: int, lr: float, schedule: Callable[[int], float]
) -> tuple[float, ...]:
    """ProxQuant: ``x_{t+1} = prox_{lr lam_{t+1} R}(x_t - lr f_c'(x_t))``, R = dist(., {+-1})."""
    grid = Grid("binary")
    one = torch.ones((), dtype=torch.float64)
    path = [x0]
    for t in range(steps):
        y = torch.tensor(path[-1] - lr * toy_grad(path[-1], c), dtype=torch.float64)
        path.append(float(prox_l1(y, lr * schedule(t + 1), grid, one)))
    return tuple(path)


def toy_binaryconnect_vs_proxquant(
    steps: int = 1000,
    lr: float = 0.01,
    lam_max: float = 4.0,
    x0: float = 0.0,
    schedule: ScheduleKind = "linear",
) -> ToyResult:
    """The paper's 1-D example: binary levels ``{-1, +1}``, ``f_1 = |x + 1/2| - 1/2`` (binary
    minimizer ``-1``) and ``f_-1 = |x - 1/2| - 1/2`` (binary minimizer ``+1``).

    Both functions have the same gradients at the binary points (``f_c'(+1) = +1``,
    ``f_c'(-1) = -1``), so BinaryConnect, which only queries gradients there, runs the *same*
    iterates on both: it cannot be right for both, and from ``x0`` it just oscillates around 0
    (``x0 -> x0 - lr -> x0 -> ...``), its sign flipping every step. ProxQuant queries the gradient
    at the float iterate; it first settles at the continuous minimizer ``-c/2`` and, once
    ``lam_t > 1``, the prox wins and the iterate lands on ``-c`` (the correct binary minimizer).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProxQuantError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ProxQuantError(f"lr must be a finite number > 0, got {lr!r}")
    if not math.isfinite(x0):
        raise ProxQuantError("x0 must be finite")
    sched = lambda_schedule(schedule, lam_max=lam_max, total_steps=steps)
    bc = {c: _run_binaryconnect(c, float(x0), steps, float(lr)) for c in (1, -1)}
    pq = {c: _run_proxquant(c, float(x0), steps, float(lr), sched) for c in (1, -1)}
    return ToyResult(
        binaryconnect={c: p[-1] for c, p in bc.items()},
        binaryconnect_quantized={c: 1.0 if p[-1] >= 0 else -1.0 for c, p in bc.items()},
        proxquant={c: p[-1] for c, p in pq.items()},
        binaryconnect_paths=bc,
        proxquant_paths=pq,
    )
