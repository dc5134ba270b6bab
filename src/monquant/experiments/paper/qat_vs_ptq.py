"""Figure 3: quantization-aware training (STE) against post-training quantization.

PTQ quantizes the float model; QAT trains from random initialisation with the forward solve on
``Q_b(W)`` and straight-through gradients (same setup otherwise). Both are deployed as
``W~ = Q_b(W)`` and compared on accuracy, the float margin ``m`` of the weights they quantize,
``margin(W~)``, ``||dW||/m`` and whether every test solve converged.
"""

from __future__ import annotations

from typing import Any

import torch

from monquant.certify import certify
from monquant.model import MonDEQClassifier
from monquant.storage.checkpoints import quantize_model
from monquant.training.loop import evaluate, install_qat

__all__ = ["compare_row"]


def compare_row(
    method: str,
    model: MonDEQClassifier,
    bits: int,
    x: torch.Tensor,
    y: torch.Tensor,
    granularity: str = "per-tensor",
    extra: dict[str, Any] | None = None,
    parts: tuple[str, ...] = ("W",),
) -> dict[str, Any]:
    """Deploy ``model`` at ``bits`` (``W~ = Q_b(W)``, and ``U``, ``b`` when ``parts`` names them),
    certify it and evaluate it."""
    install_qat(model, None)  # evaluation passes W~ (U~, b~) explicitly
    model.layer.factor_transform = None
    model.eval()
    W = model.layer.weight().detach()
    cert = certify(W, bits, granularity)
    ev = evaluate(model, x, y, **quantize_model(model, bits, granularity, parts).overrides())
    row = {
        "method": method,
        "bits": bits,
        "quantized": list(parts),
        "accuracy": ev.accuracy,
        "m": cert.margin,
        "margin_quantized": cert.margin_quantized,
        "dW_over_m": cert.dW_over_m,
        "tier": cert.tier,
        "certified_exact": cert.certified_exact,
        "converged_fraction": ev.converged_fraction,
        "all_converged": ev.unconverged == 0,
        "mean_iterations": ev.mean_iterations,
        "max_iterations": ev.max_iterations,
    }
    if extra:
        row.update(extra)
    return row
