"""The convolutional classifier (monquant.conv_model): composite kernel, margin, training runs,
checkpoints, resume, and the workflows (PTQ, eval) on conv checkpoints."""

from __future__ import annotations

import pytest
import torch

from monquant.conv_model import (
    ConvMonDEQClassifier,
    ConvMonDEQConfig,
    ConvMonDEQLayer,
    conv_margin_tensor,
)
from monquant.errors import ConfigError
from monquant.operators import CircularConvOperator
from monquant.operators.matrix import OperatorError, margin


def small(seed: int = 0, **kw) -> ConvMonDEQClassifier:
    torch.manual_seed(seed)
    cfg = ConvMonDEQConfig(**{"image": (8, 8), "channels": 3, "pool": 2, "init_scale": 1.0, **kw})
    return ConvMonDEQClassifier(cfg).double()


def test_config_validates_and_round_trips() -> None:
    cfg = ConvMonDEQConfig(image=(12, 12), channels=5, kernel=5, pool=3)
    assert ConvMonDEQConfig(**cfg.as_dict()) == cfg
    assert cfg.as_dict()["arch"] == "conv" and cfg.in_features == 144
    with pytest.raises(OperatorError, match="odd"):
        ConvMonDEQConfig(kernel=4)
    with pytest.raises(OperatorError, match="smaller than"):
        ConvMonDEQConfig(image=(2, 2))
    with pytest.raises(ConfigError, match="pool"):
        ConvMonDEQConfig(image=(10, 10), pool=4)
    with pytest.raises(ConfigError, match="rank"):
        ConvMonDEQConfig(channels=4, rank=5)
    with pytest.raises(ConfigError, match="direct"):
        ConvMonDEQConfig(backward="direct")


def test_composite_kernel_is_the_operator_and_differentiable() -> None:
    layer = small().layer
    K = layer.weight()
    assert K.shape == (3, 3, 5, 5) and K.requires_grad
    dense_wk = layer.operator().to(dtype=torch.float64).dense()
    dense_K = CircularConvOperator(K.detach(), layer.image).dense()
    assert torch.allclose(dense_wk, dense_K, atol=1e-12)
    # the gradient of a functional of K matches finite differences in B
    probe = torch.randn_like(K)
    (K * probe).sum().backward()
    g = layer.B.grad[1, 2, 0, 1].item()
    eps = 1e-6
    with torch.no_grad():
        layer.B[1, 2, 0, 1] += eps
        up = float((layer.weight() * probe).sum())
        layer.B[1, 2, 0, 1] -= 2 * eps
        down = float((layer.weight() * probe).sum())
    assert g == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_conv_margin_tensor_is_the_dense_margin_and_differentiable() -> None:
    layer = small(1).layer
    K = layer.weight().detach().requires_grad_(True)
    m = conv_margin_tensor(K, layer.image)
    assert float(m.detach()) == pytest.approx(margin(CircularConvOperator(K.detach(), layer.image).dense()),
                                     abs=1e-10)  # fmt: skip
    assert float(m.detach()) >= float(layer.margin().detach()) - 1e-10  # W-K: margin >= m by construction
    m.backward()
    assert K.grad is not None and torch.isfinite(K.grad).all() and K.grad.abs().sum() > 0


def test_classifier_evaluates_a_replacement_kernel_through_the_same_path() -> None:
    model = small(2).eval()
    x = torch.rand(5, 64, dtype=torch.float64)
    with torch.no_grad():
        a = model(x)
        b = model(x, W=model.layer.reference_weight())
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(OperatorError, match="channels"):
        model(x, W=torch.zeros(2, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="input must have shape"):
        model(torch.rand(5, 63, dtype=torch.float64))


def test_layer_gradient_check() -> None:
    torch.manual_seed(3)
    layer = ConvMonDEQLayer(ConvMonDEQConfig(image=(6, 6), channels=2, pool=1, init_scale=1.0,
                                             solver={"method": "pr", "tol": 1e-11,
                                                     "max_iter": 500})).double()  # fmt: skip
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    probe = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    (layer(x) * probe).sum().backward()
    g = layer.A.grad[0, 1, 1, 1].item()
    eps = 1e-5
    with torch.no_grad():
        layer.A[0, 1, 1, 1] += eps
        up = float((layer(x) * probe).sum())
        layer.A[0, 1, 1, 1] -= 2 * eps
        down = float((layer(x) * probe).sum())
    assert g == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_mnist):
    from monquant.data import load_mnist

    return load_mnist(tiny_mnist(tmp_path_factory.mktemp("mnist"), 256, 128), download=False)


def test_conv_training_run_checkpoints_resumes_and_quantizes(tmp_path, tiny_data) -> None:
    from monquant.storage.checkpoints import load_model
    from monquant.training.runs import TrainRequest, run_training
    from monquant.workflows import run_eval, run_ptq

    settings = dict(arch="conv", channels=3, epochs=2, batch_size=64, margin_init=0.5,
                    qat_bits=4, qat_granularity="per-channel", margin_target=0.3,
                    progress=False)  # fmt: skip
    full = run_training(TrainRequest.of(tmp_path / "full", **settings), tiny_data, echo=None)
    first = run_training(TrainRequest.of(tmp_path / "part", **{**settings, "epochs": 1}),
                         tiny_data, echo=None)  # fmt: skip
    assert len(first["history"]) == 1
    resumed = run_training(TrainRequest.of(tmp_path / "part", **settings, resume=True),
                           tiny_data, echo=None)  # fmt: skip
    a, b = full["history"][-1], resumed["history"][-1]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["test_accuracy"] == b["test_accuracy"]
    last = a
    assert last["train_unconverged"] == 0 and last["test_unconverged"] == 0
    assert last["margin_quantized_verdict"] == "certified"
    assert last["margin_quantized_lower"] <= last["margin_quantized"] + 1e-9
    loaded = load_model(full["model"])
    assert isinstance(loaded.model, ConvMonDEQClassifier)
    assert loaded.model.config.channels == 3
    r = run_ptq(full["model"], tiny_data, 3, "per-channel", parts=("W", "U", "b"))
    cert = r["certificate"]
    assert cert["n"] == 3 * 28 * 28 and cert["bits"] == 3
    assert r["eval"]["unconverged"] == 0
    e = run_eval(r["out"], tiny_data)
    assert e["quantized"] and e["eval"]["accuracy"] == r["eval"]["accuracy"]
    assert e["m"] == pytest.approx(cert["margin_quantized"], abs=1e-6)


def test_conv_requests_refuse_what_is_not_there(tmp_path) -> None:
    from monquant.training.runs import TrainRequest

    with pytest.raises(ConfigError, match="dense MonDEQ only"):
        TrainRequest.of(tmp_path, arch="conv", robust_eps=0.1)
    with pytest.raises(ConfigError, match="arch"):
        TrainRequest.of(tmp_path, arch="tiers")
    with pytest.raises(OperatorError, match="odd"):
        TrainRequest.of(tmp_path, arch="conv", kernel=2)
