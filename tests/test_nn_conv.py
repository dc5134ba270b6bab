"""The single-convolution MonDEQ layer (monquant.nn.ConvMonDEQ): monotone by construction, trains
through the implicit backward, every solve converges."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_reloads_identically
from torch import nn
from torch.nn import functional as F

from monquant.errors import ConfigError
from monquant.nn import ConvMonDEQ
from monquant.operators import OperatorError


def test_conv_mondeq_trains_and_stays_monotone() -> None:
    torch.manual_seed(0)
    layer = ConvMonDEQ(1, 4, (8, 8), margin=0.3)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 64, 3))
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (24,), generator=g)
    x = torch.randn(24, 1, 8, 8, generator=g) * 0.3
    for k in range(3):  # a learnable pattern: class k brightens one quadrant
        x[y == k, :, (k % 2) * 4:(k % 2) * 4 + 4, (k // 2) * 4:(k // 2) * 4 + 4] += 1.0
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert layer.solver.last_forward.all_converged and layer.solver.last_backward.all_converged
    assert losses[-1] < 0.7 * losses[0]
    st = layer.operator().spectral_stats()
    assert st.m >= float(layer.margin().detach()) - 1e-9 > 0  # sym(I - W) = m I + A^T A
    assert "channels=4" in repr(layer) and "3x3 factors" in repr(layer)


def test_conv_mondeq_refuses_bad_sizes() -> None:
    with pytest.raises(OperatorError, match="smaller than"):
        ConvMonDEQ(1, 2, (2, 2), kernel=3)
    with pytest.raises(OperatorError, match="odd"):
        ConvMonDEQ(1, 2, (8, 8), kernel=4)
    with pytest.raises(ConfigError, match="margin_floor"):
        ConvMonDEQ(1, 2, (8, 8), margin=0.1, margin_floor=0.2)


def test_quantize_and_certify_a_conv_model_then_reload() -> None:
    import monquant
    from monquant.certify import certify
    from monquant.nn import QuantConv2d
    from monquant.operators.conv import CircularConvOperator

    torch.manual_seed(3)
    make = lambda: nn.Sequential(ConvMonDEQ(1, 3, (6, 6), margin=0.4), nn.Flatten(),  # noqa: E731
                                 nn.Linear(3 * 36, 4))  # fmt: skip
    model = make()
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
    config = monquant.QuantConfig(bits=8, granularity="per-channel", targets=("W", "Conv2d"))
    monquant.quantize_(model, config)
    layer = model[0]
    assert layer.quant.mode == "quantized" and layer.quant.tensors["K"].shape == (3, 3, 5, 5)
    assert not isinstance(layer.U, QuantConv2d)  # the injection is the layer's own, not a target
    assert "8-bit per-channel composite kernel" in repr(layer)
    cert = monquant.certify_model(model)
    assert cert.verdict == "certified" and cert.layers["0"].bits == 8
    # the same verdict and bounds as the dense certificate of the same two operators
    K = layer.operator().composite_kernel()
    d = certify(CircularConvOperator(K, (6, 6)).dense(),
                W_tilde=CircularConvOperator(layer.quant.tensors["K"].double(), (6, 6)).dense())  # fmt: skip
    c = cert.layers["0"]
    assert c.verdict == d.verdict and c.margin_quantized_lower == pytest.approx(
        d.margin_quantized_lower, abs=1e-9)  # fmt: skip
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, atol=5e-2)
    assert_reloads_identically(model, make, x)
    with pytest.raises(ConfigError, match="free W"):
        monquant.prepare_qat(make(), monquant.QuantConfig(bits=4), method="proxquant-W")
    with pytest.raises(ConfigError, match="composite kernel"):
        monquant.prepare_qat(make(), monquant.QuantConfig(bits=4, targets=("W", "U")))
    low = monquant.certify_model(make(), monquant.QuantConfig(bits=2))
    assert low.layers["0"].bits == 2 and low.verdict in ("certified", "refuted", "undecided")


@pytest.mark.parametrize("method", ["ste", "margin-aware", "proxquant-factors"])
def test_prepare_qat_of_a_conv_layer_trains_converts_certifies_and_reloads(method) -> None:
    """QAT of the composite kernel (STE, margin-aware) or of the factor kernels (ProxQuant), then
    convert: the layer deploys K~, is certified from the Fourier blocks, and reloads identically."""
    import monquant
    from monquant.conv_model import conv_margin_tensor
    from monquant.quant.uniform import quantize

    torch.manual_seed(4)
    make = lambda: nn.Sequential(ConvMonDEQ(1, 3, (6, 6), margin=0.4), nn.Flatten(),  # noqa: E731
                                 nn.Linear(3 * 36, 4))  # fmt: skip
    model = make()
    layer = model[0]
    config = monquant.QuantConfig(bits=4, granularity="per-channel")
    monquant.prepare_qat(model, config, method=method, margin_target=5.0, total_steps=6, lam_max=50.0)
    assert layer.quant.mode == "qat" and f"({method}, qat)" in repr(layer)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
    if method != "proxquant-factors":  # the forward solve runs on Q_b(K), straight through
        K = layer.weight()
        assert torch.equal(layer.effective_weight(),
                           quantize(K.detach(), 4, "per-channel").dequantized())  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = layer.A.detach().clone()
    for step in range(6):
        pen = monquant.qat_penalty(model)
        if method == "margin-aware":  # tau = 5 exceeds any margin: the penalty is active
            assert float(pen.detach()) > 0
        loss = F.cross_entropy(model(x), y) + pen
        opt.zero_grad()
        loss.backward()
        assert layer.A.grad is not None and torch.isfinite(layer.A.grad).all()
        opt.step()
        monquant.qat_step(model, step, lr=0.05)
        assert layer.solver.last_forward.all_converged
    assert not torch.equal(layer.A.detach(), before)
    monquant.convert(model)
    q = layer.quant
    assert q.mode == "quantized" and q.method == method and q.tensors["K"].shape == (3, 3, 5, 5)
    K = layer.operator().composite_kernel().to(layer.B.dtype)
    if method == "proxquant-factors":  # factors on their grids: K~ is their composite kernel
        for P in (layer.A, layer.B):  # each output channel on a uniform grid of 2^4 levels
            for row in P.detach().flatten(1):
                levels = torch.unique(row)
                assert len(levels) <= 16
                steps = torch.diff(levels)
                if len(steps):
                    assert torch.allclose(steps / steps.min(), (steps / steps.min()).round(), atol=1e-4)
        assert torch.equal(q.tensors["K"], K)
        m_tilde = float(conv_margin_tensor(q.tensors["K"].double(), (6, 6)))
        assert m_tilde >= float(layer.margin().detach()) - 1e-6
    else:
        assert torch.equal(q.tensors["K"], quantize(K, 4, "per-channel").dequantized())
    cert = monquant.certify_model(model)
    assert cert.verdict in ("certified", "refuted", "undecided")
    if method == "proxquant-factors":
        assert cert.verdict == "certified"
    assert_reloads_identically(model, make, x)
