"""monquant.nn.MultiTierMonDEQ through the model-level API: it trains (gradients reach every
factor through the implicit backward), quantize_ deploys the composite kernels and the layer runs
on them, certify_model certifies the deployed operator and the config alike, the quantization
survives a reload into a fresh model, and bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_reloads_identically
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.errors import ConfigError
from monquant.nn import MultiTierMonDEQ
from monquant.operators import OperatorError


def build(seed: int = 0, output: str = "last") -> nn.Sequential:
    torch.manual_seed(seed)
    head = 4 * 5 * 5 if output == "last" else 1 * 20 * 20 + 2 * 10 * 10 + 4 * 5 * 5
    return nn.Sequential(MultiTierMonDEQ(1, (1, 2, 4), (20, 20), margin=0.5, tol=1e-6,
                                         output=output, init_scale=0.5),
                         nn.Flatten(), nn.Linear(head, 3))  # fmt: skip


def test_trains_and_every_parameter_gets_a_gradient() -> None:
    model = build()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 20, 20, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
                       for p in model.parameters())  # fmt: skip
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    layer = model[0]
    assert layer.solver.counters.summary()["forward_unconverged"] == 0
    z = build(output="all")[0](x)
    assert z.shape == (16, 400 + 200 + 100)


def test_quantize_certify_and_reload() -> None:
    model = build()
    x = torch.randn(4, 1, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_float = model(x)
    cfg = monquant.QuantConfig(bits=8, granularity="per-channel")
    before = monquant.certify_model(model, cfg)  # what quantize_ would deploy
    q = monquant.quantize_(copy.deepcopy(model), cfg)
    after = monquant.certify_model(q)  # the deployed kernels
    assert before.verdict == after.verdict == "certified"
    assert before.layers["0"].dW_norm_upper == pytest.approx(after.layers["0"].dW_norm_upper)
    assert after.layers["0"].margin_quantized_lower > 0 and after.layers["0"].bits == 8
    with torch.no_grad():
        y_q = q(x)
    assert 0 < float((y_q - y_float).abs().max()) < 0.05  # it runs on the quantized operator
    assert_reloads_identically(q, lambda: build(seed=5), x)
    assert "8-bit per-channel composite kernels" in repr(q[0])
    low = monquant.certify_model(model, monquant.QuantConfig(bits=2))
    assert low.layers["0"].dW_norm_upper > after.layers["0"].dW_norm_upper


def test_bad_input() -> None:
    with pytest.raises(OperatorError, match="divisible"):
        MultiTierMonDEQ(1, (2, 2, 2), (14, 14))
    with pytest.raises(OperatorError, match="smaller than"):
        MultiTierMonDEQ(1, (2, 2, 2), (8, 8))
    with pytest.raises(ConfigError, match="output"):
        MultiTierMonDEQ(1, (2, 2), (20, 20), output="first")
    with pytest.raises(ConfigError, match="input must have shape"):
        build()[0](torch.zeros(2, 399))
    with pytest.raises(ConfigError, match="composite kernels"):
        monquant.quantize_(build(), monquant.QuantConfig(bits=4, targets=("W", "U")))
    with pytest.raises(ConfigError, match="closed form"):
        monquant.prepare_qat(build(), monquant.QuantConfig(bits=4), method="margin-aware")
    with pytest.raises(ConfigError, match="free W"):
        monquant.prepare_qat(build(), monquant.QuantConfig(bits=4), method="proxquant-W")
    with pytest.raises(ConfigError, match="composite kernels"):
        monquant.prepare_qat(build(), monquant.QuantConfig(bits=4, targets=("W", "U")))
    with pytest.raises(ConfigError, match="not quantized"):
        monquant.certify_model(build())


@pytest.mark.parametrize("method", ["ste", "proxquant-factors"])
def test_prepare_qat_trains_converts_certifies_and_reloads(method: str) -> None:
    """STE on every composite kernel (the forward solve runs on Q_b of each, straight through to
    the factors) or ProxQuant on every factor kernel; convert deploys the kernels, which are
    certified (ProxQuant on the factors: monotone by construction) and survive a reload."""
    from monquant.certify_multitier import quantize_kernels
    from monquant.quant.uniform import quantize

    model = build(3)
    layer = model[0]
    config = monquant.QuantConfig(bits=6, granularity="per-channel")
    monquant.prepare_qat(model, config, method=method, total_steps=4, lam_max=50.0)
    assert f"({method}, qat)" in repr(layer)
    if method == "ste":
        used = layer.used_operator().kernels()
        comp = layer.operator().composite(differentiable=True)
        for K, Kq in zip(comp.kernels(), used, strict=True):
            assert torch.equal(Kq.detach(), quantize(K.detach(), 6, "per-channel").dequantized())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 20, 20, generator=g), torch.randint(0, 3, (6,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in (*layer.P, *layer.Q, *layer.B)]
    for step in range(4):
        loss = F.cross_entropy(model(x), y) + monquant.qat_penalty(model)
        opt.zero_grad()
        loss.backward()
        for p in (*layer.P, *layer.Q, *layer.B):
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        monquant.qat_step(model, step, lr=0.05)
        assert layer.solver.last_forward.all_converged and layer.solver.last_backward.all_converged
    after = [p.detach() for p in (*layer.P, *layer.Q, *layer.B)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    monquant.convert(model)
    assert layer.quant.mode == "quantized" and layer.quant.method == method
    if method == "ste":  # the deployed kernels are PTQ's of the trained weights
        ref = quantize_kernels(layer.operator().composite(), 6, "per-channel")
        for K, q in zip(layer.deployed_operator().kernels(), ref, strict=True):
            assert torch.equal(K, q.dequantized().to(K.dtype))
    cert = monquant.certify_model(model)
    assert cert.verdict in ("certified", "refuted", "undecided")
    if method == "proxquant-factors":
        assert cert.verdict == "certified"
    assert_reloads_identically(model, lambda: build(7), x)
    copy.deepcopy(model)  # nothing unpicklable kept in the layer
