"""Quantized-training methods (monquant.training.methods) on tiny synthetic MonDEQs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import random_monotone_W

from monquant.certify import certify
from monquant.errors import ConfigError
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.operators import margin, wk_weight
from monquant.quant.uniform import quantize
from monquant.training.loop import TrainConfig, evaluate, train
from monquant.training.methods import (
    KINDS,
    QuantMethod,
    apply_lift,
    deployed_weights,
    free_copy,
    layer_storage_bits,
    margin_lift,
    prepare_method,
    products_per_iteration,
    weyl_penalty,
)

D, N, CLASSES = 12, 8, 4


def _data(seed: int = 0, k: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, D, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


@pytest.fixture(scope="module")
def float_model() -> MonDEQClassifier:
    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(in_features=D, hidden=N, out_features=CLASSES))
    x, y = _data()
    train(model, x, y, x, y, TrainConfig(epochs=2, batch_size=32), progress=False)
    return model


def _copy(model: MonDEQClassifier, method: QuantMethod) -> MonDEQClassifier:
    out = MonDEQClassifier(model.config)
    out.load_state_dict(model.state_dict())
    return free_copy(out) if method.kind == "proxquant-w" else out


class _Counting:
    """Wrap a hook and count its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args) if self.fn is not None else None


def _run(float_model, method: QuantMethod, epochs: int = 2, batch: int = 64):
    model = _copy(float_model, method)
    x, y = _data(1)
    nb = math.ceil(x.shape[0] / batch)
    prep = prepare_method(model, method, nb, epochs, lr=1e-2)
    counters = {}
    for name in ("after_step", "on_epoch_start", "on_epoch_end", "penalty"):
        fn = getattr(prep.hooks, name)
        if fn is not None:
            counters[name] = _Counting(fn)
    prep.hooks = dataclasses.replace(prep.hooks, **counters)
    if method.kind != "ptq":
        cfg = prep.train_config(TrainConfig(epochs=epochs, batch_size=batch, lr=1e-2))
        hist = train(model, x, y, x, y, cfg, hooks=prep.hooks, progress=False)
        assert all(math.isfinite(h["loss"]) for h in hist)
    return model, prep, counters, nb * epochs


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_prepares_trains_and_fires_hooks(float_model, kind):
    method = QuantMethod.default(kind, 3)
    if kind.startswith("prox"):
        method = dataclasses.replace(method, freeze_epoch=1)
    model, prep, counters, steps = _run(float_model, method)
    if kind == "ptq":
        assert not counters
    if kind.startswith("prox"):
        assert counters["after_step"].calls == steps
        assert counters["on_epoch_start"].calls == 2 and counters["on_epoch_end"].calls == 2
        assert prep.quantizer is not None and prep.quantizer.frozen
        assert any("froze" in e for e in prep.events)
    if kind in ("margin", "proxquant-w"):
        assert counters["penalty"].calls == steps
    dep = deployed_weights(model, method, prep)
    assert dep.W_tilde.shape == (N, N)
    assert dep.summary()["form"] == ("factored" if kind == "proxquant-factors" else "assembled")


def test_proxquant_factors_certified_by_construction_at_two_bits(float_model):
    method = QuantMethod("proxquant-factors", 2, "per-tensor", freeze_epoch=1)
    model, prep, _, _ = _run(float_model, method)
    dep = deployed_weights(model, method, prep)
    m = float(model.layer.margin().detach())
    A, B = model.layer.A.detach().double(), model.layer.B.detach().double()
    # the deployed W~ is the construction rounded to the model's dtype (what the model runs)
    dtype = model.layer.U.weight.dtype
    assert torch.equal(dep.W_tilde, wk_weight(A, B, m).to(dtype).double())
    assert margin(dep.W_tilde) >= m - 1e-5
    assert dep.certificate.certified_exact
    assert certify(dep.W_ref, W_tilde=dep.W_tilde).margin_quantized == dep.margin_quantized
    assert dep.summary()["tier"] == "construction"
    assert dep.requantized is not None and dep.requantized.bits == 2


def test_factored_form_is_monotone_for_any_low_bit_factors():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3):
        A = quantize(torch.randn(20, 20, generator=g, dtype=torch.float64), bits).dequantized()
        B = quantize(torch.randn(20, 20, generator=g, dtype=torch.float64), bits).dequantized()
        assert margin(wk_weight(A, B, 0.05)) >= 0.05 - 1e-12


@pytest.mark.parametrize("kind", ["proxquant-w", "proxquant-factors"])
@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("mode", ["prox", "lazy"])
def test_after_freeze_every_quantized_parameter_is_on_its_grid(
    float_model, kind, granularity, mode
):
    method = QuantMethod(kind, 2, granularity, u_bits=3, freeze_epoch=1, mode=mode)
    _, prep, _, _ = _run(float_model, method)
    pq = prep.quantizer
    assert pq is not None and pq.frozen
    assert pq.on_grid() == [0.0] * len(pq.params)
    for p, bits in zip(pq.params, [2] * (len(pq.params) - 1) + [3], strict=True):
        step = 2 * pq.scale_of(p) / (2**bits - 1)
        k = p.detach() / step
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert int(k.round().abs().max()) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("kind", ["ste", "margin", "proxquant-w", "proxquant-factors"])
def test_deployed_weights_are_what_the_solver_sees(float_model, kind):
    method = QuantMethod.default(kind, 3, "per-channel", u_bits=4)
    if kind.startswith("prox"):
        method = dataclasses.replace(method, freeze_epoch=1)
    model, prep, _, _ = _run(float_model, method)
    model.eval()
    dep = deployed_weights(model, method, prep)
    seen = []
    real = model.layer.solver

    class Spy:
        def __call__(self, W, q, **kw):
            seen.append(W.detach().clone())
            return real(W, q, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    x, y = _data(2, 64)
    model.layer.solver = Spy()
    try:
        ev_deployed = evaluate(model, x, y, **dep.overrides())
        ev_training_path = evaluate(model, x, y)  # what train() evaluates each epoch
    finally:
        model.layer.solver = real
    assert torch.equal(seen[0], dep.W_tilde.to(seen[0].dtype))
    assert torch.allclose(seen[1].double(), dep.W_tilde, atol=1e-6)
    assert ev_deployed.accuracy == ev_training_path.accuracy
    U = model.layer.factor("U").detach()
    assert torch.allclose(U.double(), dep.U.double(), atol=1e-6)


def test_ptq_deploys_paper_quantizer(float_model):
    method = QuantMethod("ptq", 4, "per-channel")
    model = _copy(float_model, method)
    dep = deployed_weights(model, method)
    W = model.layer.weight().detach()  # the model's dtype: W~ is formed as the forward forms it
    assert torch.equal(dep.W_tilde, quantize(W, 4, "per-channel").dequantized().double())
    assert dep.certificate.bits == 4 and dep.certificate.granularity == "per-channel"
    assert torch.equal(dep.U, model.layer.U.weight.detach())  # float U by default


def test_mixed_precision_storage_arithmetic():
    n, d = 100, 784
    w4u8 = layer_storage_bits(QuantMethod("ptq", 4, "per-tensor", u_bits=8), n, d)
    assert w4u8 == {
        "W": n * n * 4 + 32,
        "U": n * d * 8 + 32,
        "total": n * n * 4 + 32 + n * d * 8 + 32,
        "float32_total": 32 * (n * n + n * d),
    }
    w8u4 = layer_storage_bits(QuantMethod("margin", 8, "per-channel", u_bits=4), n, d)
    assert w8u4["W"] == n * n * 8 + n * 32 and w8u4["U"] == n * d * 4 + n * 32
    w_only = layer_storage_bits(QuantMethod("ste", 3), n, d)
    assert w_only["U"] == 32 * n * d
    fac = layer_storage_bits(QuantMethod("proxquant-factors", 2, "per-channel"), n, d, rank=50)
    assert fac["W"] == (50 * n * 2 + 50 * 32) + (n * n * 2 + n * 32) + 32
    assert products_per_iteration(QuantMethod("proxquant-factors", 2), n) == 4 * n * n
    assert (
        products_per_iteration(QuantMethod("proxquant-factors", 2), n, 50) == 2 * 50 * n + 2 * n * n
    )
    assert products_per_iteration(QuantMethod("proxquant-w", 2), n) == n * n


def test_margin_lift_certifies_the_quantized_operator(float_model):
    W = random_monotone_W(30, 0.02, seed=4)
    assert margin(quantize(W, 2).dequantized()) < 0.1
    delta = margin_lift(W, 2, "per-tensor", 0.1)
    eye = torch.eye(30, dtype=torch.float64)
    assert delta > 0
    assert margin(quantize(W - delta * eye, 2).dequantized()) >= 0.1
    model = _copy(float_model, QuantMethod("margin", 2))
    m0 = float(model.layer.margin().detach())
    W0 = model.layer.weight().detach()
    apply_lift(model, 0.25)
    assert float(model.layer.margin().detach()) == pytest.approx(m0 + 0.25, abs=1e-5)
    assert torch.allclose(model.layer.weight().detach(), W0 - 0.25 * torch.eye(N), atol=1e-5)


def test_weyl_penalty_vanishes_exactly_below_its_target():
    W = random_monotone_W(20, 0.5, seed=1).requires_grad_(True)
    dW = quantize(W.detach(), 3).dequantized() - W.detach()
    ratio = float(torch.linalg.matrix_norm(dW) / margin(W.detach()))
    assert float(weyl_penalty(W, 3, "per-tensor", ratio + 0.01).detach()) == 0.0
    p = weyl_penalty(W, 3, "per-tensor", ratio / 2)
    assert float(p.detach()) == pytest.approx(ratio / 2, rel=1e-6)
    p.backward()
    assert W.grad is not None and float(W.grad.abs().sum()) > 0


def test_free_copy_computes_the_same_network(float_model):
    free = free_copy(float_model)
    x, _ = _data(5, 32)
    assert free.layer.free
    with torch.no_grad():
        assert torch.allclose(free(x), float_model(x), atol=1e-5)


def test_invalid_requests_are_refused(float_model):
    with pytest.raises(ConfigError):
        QuantMethod("binaryconnect", 2)
    with pytest.raises(ValueError):
        QuantMethod("ste", 1)
    with pytest.raises(ConfigError):
        prepare_method(
            _copy(float_model, QuantMethod("ste", 2)), QuantMethod("proxquant-w", 2), 1, 1
        )
    method = QuantMethod("proxquant-factors", 2)
    model = _copy(float_model, method)
    prepare_method(model, method, 1, 1)
    with pytest.raises(ConfigError):
        deployed_weights(model, method)  # the grids live in the PreparedMethod
