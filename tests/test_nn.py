"""The library layers of :mod:`monquant.nn` under quantization-aware training: what their training
solves take their step from. (The rest of the layers' behaviour is tested through the public API,
tests/api, and per layer kind in test_nn_conv.py and test_nn_multitier.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import RecordingEstimates
from torch import nn

import monquant
from monquant.nn import ConvMonDEQ, MonDEQ, MultiTierMonDEQ
from monquant.operators import ConvWKOperator, MultiTierWKOperator


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "dense":
        return MonDEQ(12, 10, margin=0.3), torch.randn(4, 12)
    if kind == "conv":
        return ConvMonDEQ(1, 3, (6, 6), margin=0.3), torch.randn(4, 1, 6, 6)
    return MultiTierMonDEQ(1, (1, 2), (12, 12), margin=0.3), torch.randn(4, 1, 12, 12)


@pytest.mark.parametrize("kind", ["dense", "conv", "multitier"])
@pytest.mark.parametrize("method", ["ste", "proxquant-factors"])
def test_the_float_operator_caps_the_step_of_fake_quantized_layers(kind: str, method: str) -> None:
    """Under STE QAT the forward solve is of ``Q_b(W)``, and the float operator's estimated
    constants cap the step of a solve with estimated constants (``EquilibriumSolver``,
    ``step_from``). ProxQuant's forward pass solves with the float operator itself: nothing to
    cap."""
    layer, x = _layer(kind)
    monquant.prepare_qat(nn.Sequential(layer), monquant.QuantConfig(bits=4), method=method)
    solver = layer.solver
    own, rec = RecordingEstimates(solver.estimates), RecordingEstimates(solver.reference_estimates)
    solver.estimates, solver.reference_estimates = own, rec
    fast = replace(solver.forward_config, spectral="estimate", step_policy="geometric")
    with solver.configured(fast):
        layer(x).square().sum().backward()
    assert len(own.seen) == 1 and len(rec.seen) == (1 if method == "ste" else 0)
    floats = rec.seen if method == "ste" else own.seen  # the float operator
    if kind == "dense":
        assert torch.equal(floats[0], layer.weight().detach())
        assert torch.equal(own.seen[0], layer.effective_weight().detach())
    else:
        assert isinstance(floats[0], ConvWKOperator if kind == "conv" else MultiTierWKOperator)
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
