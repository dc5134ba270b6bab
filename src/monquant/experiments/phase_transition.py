"""Figure 1: margin certificate and phase transition of post-training quantization of ``W``.

For every bit-width: the certificate (``||dW||``, ``||dW||/m``, a-priori and Weyl bounds, exact
``margin(W~)``, the three verdicts) and, on the test set, what the quantized network's solver
actually does (fraction of converged solves at the iteration cap, iterations, accuracy).
"""

from __future__ import annotations

from typing import Any

import torch

from monquant.certify import certify
from monquant.model import MonDEQClassifier
from monquant.quantize import quantize
from monquant.train import evaluate

__all__ = ["PAPER_BITS", "run_phase_transition"]

PAPER_BITS: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 10, 12, 16, 32)


def run_phase_transition(
    model: MonDEQClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    bits: tuple[int, ...] = PAPER_BITS,
    granularity: str = "per-tensor",
    batch_size: int = 2000,
    progress: Any = None,
) -> dict[str, Any]:
    """PTQ sweep over ``bits``; returns ``{"float": {...}, "rows": [...]}`` (plain numbers)."""
    model.eval()
    W = model.layer.weight().detach()
    fl = evaluate(model, x, y, batch_size)
    rows = []
    for b in bits:
        cert = certify(W, b, granularity)
        Wq = quantize(W, b, granularity).dequantized()
        ev = evaluate(model, x, y, batch_size, W=Wq)
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
        rows.append(row)
        if progress is not None:
            progress(b, row)
    solver = model.solver.forward_config.as_dict()
    return {
        "granularity": granularity,
        "solver": solver,
        "samples": int(x.shape[0]),
        "float": {**fl.as_dict(), **certify(W, 32).to_dict()},
        "rows": rows,
    }
