"""PGD through the implicit layer (monquant.attacks): certified <= PGD robust <= clean accuracy."""

from __future__ import annotations

import torch

from monquant.attacks import pgd_l2
from monquant.behaviour import ModelWeights, agreement
from monquant.quant.uniform import quantize


def test_certified_accuracy_le_pgd_accuracy_le_clean_accuracy(classifier) -> None:
    model = classifier(7, 0.5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:10] = (y[:10] + 1) % 4  # some wrong labels: clean accuracy below 1
    f = ModelWeights.of(model)
    for W in (None, quantize(f.W, 6).dequantized()):
        rep = agreement(f, ModelWeights.of(model, W=W), x)
        with torch.no_grad():
            clean = model(x, W=W).argmax(dim=1) == y
        radius, ok = ((rep.radius_float, rep.float_certified) if W is None
                      else (rep.radius_quantized, rep.certified_agreement))  # fmt: skip
        pred_ok = rep.float_prediction == y
        for eps in (0.05, 0.2, 0.5, 1.0):
            robust = pgd_l2(model, x, y, eps, steps=15, restarts=2, W=W)
            certified = pred_ok & ok & (radius > eps)
            assert bool((certified <= robust).all())  # a certified input is never broken
            assert bool((robust <= clean).all())
        assert int(pgd_l2(model, x, y, 5.0, steps=15, W=W).sum()) < int(clean.sum())  # it attacks


def test_pgd_at_radius_zero_is_clean_accuracy(classifier) -> None:
    model = classifier(3)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    assert torch.equal(pgd_l2(model, x, y, 0.0), clean)
