"""The model-level flow, written only against public names (no private imports): a custom model
(a conv stem, a MonDEQ layer, a linear head) trained two steps with torch.optim.SGD, quantized,
certified, saved, reloaded, and certified again to the same certificate."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import monquant
from monquant.errors import CheckpointError, ConfigError
from monquant.nn import MonDEQ, QuantConv2d, QuantLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.deq = MonDEQ(4 * 7 * 7, 32, margin=0.5)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(x)))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 14, 14, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_custom_model_train_quantize_certify_save_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    config = monquant.QuantConfig(bits=8, granularity="per-channel", targets=("W", "U", "Linear"))
    assert monquant.QuantConfig.from_json(config.to_json()) == config
    monquant.quantize_(model, config, filter_fn=lambda m, name: name != "head")
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, QuantLinear)
    assert not isinstance(model.stem[0], QuantConv2d)  # Conv2d was not a target
    assert "quant=W+U 8-bit per-channel" in repr(model.deq)
    cert = monquant.certify_model(model)
    assert cert.verdict == "certified" and list(cert.layers) == ["deq"]
    assert "certified" in repr(cert)
    with torch.no_grad():
        out = model(x)

    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = Net()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    again = monquant.certify_model(fresh)
    assert again.to_dict() == cert.to_dict()
    assert json.loads(again.to_json())["verdict"] == "certified"
    bits = monquant.min_certified_bits(fresh)
    assert set(bits) == {"deq"} and bits["deq"]["exact"] is not None


@pytest.mark.parametrize("method", ["ste", "margin-aware", "proxquant-W", "proxquant-factors"])
def test_prepare_qat_then_convert(method: str) -> None:
    torch.manual_seed(1)
    model = Net()
    config = monquant.QuantConfig(bits=4)
    monquant.prepare_qat(model, config, method=method, total_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # after prepare_qat (ProxQuant-W's W)
    x, y = batch(1)
    for step in range(4):
        loss = nn.functional.cross_entropy(model(x), y) + monquant.qat_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monquant.qat_step(model, step, lr=0.05)
    monquant.convert(model)
    assert model.deq.quant.mode == "quantized" and model.deq.quant.method == method
    cert = monquant.certify_model(model)
    assert cert.verdict in ("certified", "refuted", "undecided")
    if method == "proxquant-factors":  # W~ = (1 - m) I - A~^T A~ + B~ - B~^T: monotone, margin >= m
        assert cert.verdict == "certified"
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_certify_with_a_config_changes_nothing_and_errors_are_clear() -> None:
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    cert = monquant.certify_model(model, monquant.QuantConfig(bits=6))
    assert cert.layers["deq"].bits == 6
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(state[k], after[k]) for k in state)
    with pytest.raises(ConfigError, match="not quantized"):
        monquant.certify_model(model)
    with pytest.raises(ConfigError, match="no MonDEQ layer"):
        monquant.quantize_(nn.Linear(3, 3), monquant.QuantConfig(bits=4))
    with pytest.raises(ConfigError, match="bits"):
        monquant.QuantConfig(bits=1)
    with pytest.raises(ConfigError, match="targets"):
        monquant.QuantConfig(bits=4, targets=("V",))
    with pytest.raises(ConfigError, match="method"):
        monquant.prepare_qat(model, monquant.QuantConfig(bits=4), method="sgd")


def test_solver_settings_are_attributes_saved_with_the_layer(tmp_path) -> None:
    layer = MonDEQ(5, 6, solver="dr", tol=1e-6, max_iter=300)
    layer.configure_solver(method="fb", tol=1e-7, anderson=4, check_every=2)
    assert layer.solver_config.method == "fb" and "fb(tol=1e-07, max_iter=300)" in repr(layer)
    torch.save(layer.state_dict(), tmp_path / "l.pt")
    fresh = MonDEQ(5, 6)
    fresh.load_state_dict(torch.load(tmp_path / "l.pt", weights_only=True))
    assert fresh.solver_config.method == "fb" and fresh.solver_config.tol == 1e-7
    assert fresh.solver_config.anderson == 4 and fresh.solver_config.check_every == 2
    assert MonDEQ.from_config(layer.config).solver_config == layer.solver_config
    with pytest.raises(CheckpointError, match="hidden"):
        MonDEQ(5, 7).load_state_dict(torch.load(tmp_path / "l.pt", weights_only=True), strict=False)


def test_a_classifier_layer_is_upgraded_in_place() -> None:
    from monquant.model import MonDEQClassifier, MonDEQConfig

    model = MonDEQClassifier(MonDEQConfig(in_features=8, hidden=6, out_features=3)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    monquant.quantize_(model, monquant.QuantConfig(bits=16))
    assert isinstance(model.layer, MonDEQ)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-3)
    assert monquant.certify_model(model).certified


def test_ordinary_layers_quantized_too_and_reloaded_into_a_quantized_fresh_model(tmp_path) -> None:
    torch.manual_seed(2)
    model = Net()
    config = monquant.QuantConfig(bits=6, granularity="per-channel", targets=("W", "Linear", "Conv2d"))
    monquant.quantize_(model, config)
    assert isinstance(model.head, QuantLinear) and isinstance(model.stem[0], QuantConv2d)
    assert not isinstance(model.deq.U, QuantLinear)  # the injection is quantized through "U"
    for w in (model.head.weight, model.stem[0].weight):  # on a 6-bit grid, one step per row
        steps = w.detach().abs().reshape(w.shape[0], -1).max(dim=1).values / 31  # max code 31
        codes = w.detach().reshape(w.shape[0], -1) / steps[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    x, _ = batch(2)
    with torch.no_grad():
        out = model(x)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    fresh = monquant.quantize_(Net(), config)  # as torchao: quantize the fresh model, then load
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert "weight 6-bit per-channel" in repr(fresh.head)


def test_import_monquant_is_light_and_exports_lazily() -> None:
    import subprocess
    import sys

    code = ("import sys, monquant; assert 'torch' not in sys.modules; "
            "monquant.QuantConfig(bits=4); assert 'torch' not in sys.modules; "
            "monquant.quantize_; assert 'torch' in sys.modules; print(monquant.__version__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == monquant.__version__
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        monquant.nothing  # noqa: B018
