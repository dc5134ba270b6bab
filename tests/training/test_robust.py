"""Tests of Lipschitz-margin training (monquant.training.robust)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from monquant.behaviour import FloatReference, ModelWeights
from monquant.errors import ConfigError
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.operators import margin
from monquant.training.loop import TrainConfig, install_qat, train
from monquant.training.methods import QuantMethod
from monquant.training.robust import MARGIN_FLOOR, lipschitz_margin_loss, logit_lipschitz


def blobs(n: int, d: int, seed: int, spread: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, d, generator=g)
    return centers[y] + spread * torch.randn(n, d, generator=g), y


def test_logit_lipschitz_is_the_product_of_the_three_norms(classifier) -> None:
    model = classifier(0, margin=0.4)
    L = logit_lipschitz(model).detach()
    C = model.head.weight.detach()
    U_norm = float(torch.linalg.matrix_norm(model.layer.U.weight.detach(), ord=2))
    m = margin(model.layer.weight().detach())
    for k in range(C.shape[0]):
        for j in range(C.shape[0]):
            want = float(torch.linalg.vector_norm(C[k] - C[j])) * U_norm / m
            assert float(L[k, j]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert torch.equal(L.diagonal(), torch.zeros(C.shape[0], dtype=L.dtype))


def test_logit_lipschitz_gradients_are_finite_and_the_floor_holds(classifier) -> None:
    model = classifier(1, margin=0.4)
    logit_lipschitz(model).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    # a non-monotone W_used (margin < 0) is divided by the floor, not by a negative number
    install_qat(model, 2)
    model.layer.weight_transform = lambda W: W + 3.0 * torch.eye(W.shape[0], dtype=W.dtype)
    L = logit_lipschitz(model).detach()
    assert bool((L >= 0).all()) and float(L.max()) > 0
    C = model.head.weight.detach()
    U_norm = float(torch.linalg.matrix_norm(model.layer.U.weight.detach(), ord=2))
    want = float(torch.linalg.vector_norm(C[0] - C[1])) * U_norm / MARGIN_FLOOR
    assert float(L[0, 1]) == pytest.approx(want, rel=1e-9)


def test_loss_is_cross_entropy_at_zero_and_grows_with_eps(classifier) -> None:
    model = classifier(2)
    x, y = blobs(32, 8, 0)
    x = x.double()
    logits = model(x)

    def loss(eps: float) -> float:
        return float(lipschitz_margin_loss(model, logits, y, eps).detach())

    assert loss(0.0) == float(F.cross_entropy(logits, y).detach())
    losses = [loss(e) for e in (0.0, 0.1, 0.5, 1.0)]
    assert losses == sorted(losses) and losses[-1] > losses[0]


def test_adjusted_prediction_right_means_certified_radius_above_eps(classifier) -> None:
    """The loss's meaning: where ``z_y - z_j > eps L_yj`` for every j, the proved radius > eps."""
    model = classifier(3, margin=0.6)
    x, _ = blobs(64, 8, 1)
    x = x.double()
    ref = FloatReference.solve(ModelWeights.of(model), x)
    with torch.no_grad():
        logits = model(x)
        k = logits.argmax(dim=1)
        L = logit_lipschitz(model)
    eps = 0.05
    adjusted = logits + eps * 1.001 * L[k]  # a 0.1% cushion for the proved constants' rounding
    robust = adjusted.argmax(dim=1) == k
    assert int(robust.sum()) > 0
    assert bool((ref.radius[robust] > eps).all())


def test_robust_training_raises_the_certified_radius() -> None:
    x, y = blobs(600, 20, 2)
    radii = {}
    for eps in (None, 0.3):
        torch.manual_seed(0)
        model = MonDEQClassifier(
            MonDEQConfig(in_features=20, hidden=16, out_features=4, margin_init=0.5)
        )
        cfg = TrainConfig(epochs=6, lr=5e-3, batch_size=64, decay_epoch=5, robust_eps=eps)
        train(model, x[:400], y[:400], x[400:], y[400:], cfg, progress=False)
        ref = FloatReference.solve(ModelWeights.of(model.eval()), x[400:])
        right = ref.k == y[400:]
        assert float(right.double().mean()) > 0.9  # still accurate
        radii[eps] = float(torch.where(right, ref.radius, torch.zeros_like(ref.radius)).median())
    assert radii[0.3] > 1.2 * radii[None]


def test_robust_eps_validation() -> None:
    with pytest.raises(ConfigError, match="robust_eps"):
        TrainConfig(robust_eps=-0.1)
    with pytest.raises(ConfigError, match="robust_eps"):
        TrainConfig(robust_eps=float("nan"))
    with pytest.raises(ConfigError, match="PTQ"):
        QuantMethod("ptq", 4, robust_eps=0.1)
    m = QuantMethod("margin", 4, "per-channel", robust_eps=0.1)
    assert m.label == "margin+lm0.1/per-channel/W4"
