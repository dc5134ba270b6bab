"""The single-convolution MonDEQ layer (monquant.nn.ConvMonDEQ): monotone by construction, trains
through the implicit backward, every solve converges."""

from __future__ import annotations

import pytest
import torch
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
    assert st.m >= float(layer.margin()) - 1e-9 > 0  # sym(I - W) = m I + A^T A
    assert "channels=4" in repr(layer) and "3x3 factors" in repr(layer)


def test_conv_mondeq_refuses_bad_sizes() -> None:
    with pytest.raises(OperatorError, match="smaller than"):
        ConvMonDEQ(1, 2, (2, 2), kernel=3)
    with pytest.raises(OperatorError, match="odd"):
        ConvMonDEQ(1, 2, (8, 8), kernel=4)
    with pytest.raises(ConfigError, match="margin_floor"):
        ConvMonDEQ(1, 2, (8, 8), margin=0.1, margin_floor=0.2)
