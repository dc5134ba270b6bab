"""The same code on every available device: CPU always, CUDA when present (device and dtype follow
the inputs). ``benchmarks/gpu_check.sh`` runs this file on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.certify import certify
from monquant.nn import MonDEQ
from monquant.operators import wk_weight
from monquant.solvers import SolverConfig, solve

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _W(n: int, device: torch.device, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return wk_weight(torch.randn(n, n, generator=g) / 6, torch.randn(n, n, generator=g) / 6, 0.5).to(
        device=device, dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_solvers_follow_the_device_and_agree_with_cpu(device, method) -> None:
    W = _W(40, device)
    q = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    res = solve(W, q, SolverConfig(method, tol=1e-10, max_iter=5000))
    assert res.z.device.type == device.type and res.all_converged
    ref = solve(W.cpu(), q.cpu(), SolverConfig(method, tol=1e-10, max_iter=5000))
    assert torch.allclose(res.z.cpu(), ref.z, atol=1e-8)
    assert float(res.error_bound.max()) < 1e-6


def test_certificates_are_the_same_on_every_device(device) -> None:
    W = _W(30, device)
    for bits in (3, 6, 10):
        c = certify(W, bits)
        ref = certify(W.cpu(), bits)
        assert c.verdict == ref.verdict and c.tier == ref.tier
        assert c.margin_quantized_lower == pytest.approx(ref.margin_quantized_lower, rel=1e-9, abs=1e-12)


def test_a_model_trains_quantizes_and_certifies_on_the_device(device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MonDEQ(12, 10, margin=0.5), nn.Linear(10, 3)).to(device)
    x = torch.randn(32, 12, device=device)
    y = torch.randint(0, 3, (32,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.device.type == device.type for p in model.parameters())
    monquant.quantize_(model, monquant.QuantConfig(bits=8))
    with torch.no_grad():
        out = model(x)
    assert out.device.type == device.type and torch.isfinite(out).all()
    assert monquant.certify_model(model).certified
