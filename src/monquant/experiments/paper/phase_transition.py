"""Figure 1: margin certificate and phase transition of post-training quantization of ``W``.

For every bit-width: the certificate (``||dW||``, ``||dW||/m``, a-priori and Weyl bounds, exact
``margin(W~)``, the three verdicts) and, on the test set, what the quantized network's solver
actually does (fraction of converged solves at the iteration cap, iterations, accuracy).
"""

from __future__ import annotations

from typing import Any

import torch

from monquant.certify import certify, certify_operator, quantized_operator
from monquant.model import MonDEQClassifier
from monquant.solvers import SolverConfig
from monquant.training.loop import evaluate
from monquant.verified import spectral_bounds

__all__ = ["PAPER_BITS", "PAPER_FB", "paper_fb_config", "run_phase_transition"]

PAPER_BITS: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 10, 12, 16, 32)
#: Figure 1's solver as the paper's script runs it (experiments/margin_stability_certificate.py):
#: FB at ``m~/L~^2`` when ``margin(W~) > 0``, else at 0.01; tol 1e-5; cap 2000; 64 test images.
PAPER_FB: dict[str, float] = {"fallback_step": 0.01, "tol": 1e-5, "max_iter": 2000}


def paper_fb_config(m_q: float, L_q: float) -> SolverConfig:
    """The paper's Figure 1 FB settings for an operator with (computed) ``m~``, ``L~``."""
    step = m_q / L_q**2 if m_q > 0 else PAPER_FB["fallback_step"]
    return SolverConfig(method="fb", step=step, tol=PAPER_FB["tol"], max_iter=int(PAPER_FB["max_iter"]),
                        check_every=1)  # fmt: skip


def _solve_columns(prefix: str, ev: Any) -> dict[str, Any]:
    """The columns ``<prefix>_*`` of one evaluation with another solver (an ``EvalResult``)."""
    cols = {
        "samples": ev.samples,
        "converged_fraction": ev.converged_fraction,
        "mean_iterations": ev.mean_iterations,
        "max_iterations": ev.max_iterations,
        "final_residual": ev.max_residual,
        "accuracy": ev.accuracy,
        "all_converged": ev.unconverged == 0,
    }
    return {f"{prefix}_{k}": v for k, v in cols.items()}


def run_phase_transition(
    model: MonDEQClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    bits: tuple[int, ...] = PAPER_BITS,
    granularity: str = "per-tensor",
    batch_size: int = 2000,
    progress: Any = None,
    fb_samples: int = 1000,
    paper_fb_samples: int = 64,
) -> dict[str, Any]:
    """PTQ sweep over ``bits``; returns ``{"float": {...}, "rows": [...]}`` (plain numbers).

    The model's own solver (PR by default) runs on all of ``x``. Because the paper used
    forward-backward splitting, FB is also run on the first ``fb_samples`` inputs with the same
    tolerance and cap, at the step of the operator actually used (``m~/L~^2``; for a
    non-monotone ``W~`` no certified step exists and ``1/L~^2`` is used), columns ``fb_*``.
    Figure 1's solver as the paper ran it (:data:`PAPER_FB`) runs on the first
    ``paper_fb_samples`` test images, columns ``paper_fb_*`` (monquant's per-sample residual test
    is stricter than the paper's batch Frobenius one). ``narrow_rows`` repeats the certificates
    under the narrow step rule ``w_max/(2^(b-1) - 1)`` (no solves).
    """
    model.eval()
    W = model.layer.weight().detach()
    fl = evaluate(model, x, y, batch_size)
    base = model.solver.forward_config
    fb_cfg = SolverConfig(method="fb", tol=base.tol, max_iter=base.max_iter)
    xf, yf = x[:fb_samples], y[:fb_samples]
    xp, yp = x[:paper_fb_samples], y[:paper_fb_samples]
    rows, narrow_rows = [], []
    st = spectral_bounds(W)  # the float operator's proved bounds, once for every certificate
    for b in bits:
        Wq, meta = quantized_operator(W, b, granularity)  # the W~ certified is the W~ solved
        cert = certify_operator(W, Wq, float_bounds=st, **meta)
        ev = evaluate(model, x, y, batch_size, W=Wq)
        with model.solver.configured(fb_cfg):
            fb = evaluate(model, xf, yf, batch_size, W=Wq) if fb_samples > 0 else None
        row = cert.to_dict()
        row.update(
            tier=cert.tier,
            accuracy=ev.accuracy,
            converged_fraction=ev.converged_fraction,
            unconverged=ev.unconverged,
            diverged=ev.diverged,
            mean_iterations=ev.mean_iterations,
            max_iterations=ev.max_iterations,
            all_converged=ev.unconverged == 0,
        )
        if paper_fb_samples > 0:
            pcfg = paper_fb_config(cert.margin_quantized, cert.L_quantized)
            with model.solver.configured(pcfg):
                pfb = evaluate(model, xp, yp, batch_size, W=Wq)
            row.update(paper_fb_step=pcfg.step, **_solve_columns("paper_fb", pfb))
        nc = certify(W, b, granularity, step_rule="narrow", float_bounds=st)
        narrow_rows.append({"bits": b, "step": nc.step, "dW_over_m": nc.dW_over_m,
                            "margin_quantized": nc.margin_quantized, "tier": nc.tier,
                            "verdict": nc.verdict})  # fmt: skip
        if fb is not None:
            row.update(_solve_columns("fb", fb))
        rows.append(row)
        if progress is not None:
            progress(b, row)
    solver = model.solver.forward_config.as_dict()
    return {
        "granularity": granularity,
        "solver": solver,
        "samples": int(x.shape[0]),
        "float": {**fl.as_dict(), **certify(W, 32, float_bounds=st).to_dict()},
        "rows": rows,
        "narrow_rows": narrow_rows,
        "paper_fb": dict(PAPER_FB, samples=int(min(paper_fb_samples, x.shape[0]))),
    }
