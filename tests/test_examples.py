"""The scripts in examples/ run, and what they print is what they claim (MNIST subsets)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from monquant.errors import CheckpointError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_example_is_tested() -> None:
    tested = {"custom_model", "margin_aware_qat", "paper_checkpoint", "conv_mondeq", "multitier_mondeq"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_custom_model(mnist_dir: Path, capsys) -> None:
    out = _load("custom_model").main(["--data-dir", str(mnist_dir), "--train-limit", "3000",
                                      "--test-limit", "500", "--epochs", "1"])  # fmt: skip
    assert out["verdict"] == "certified" and out["same_after_reload"] is True
    assert out["float_accuracy"] > 0.5  # it learned something in one short epoch
    assert "ModelCertificate: certified" in capsys.readouterr().out


def test_conv_mondeq(mnist_dir: Path) -> None:
    out = _load("conv_mondeq").main(["--data-dir", str(mnist_dir), "--channels", "2",
                                     "--train-limit", "256", "--test-limit", "128",
                                     "--bits", "3", "8"])  # fmt: skip
    assert set(out["bits"]) == {3, 8}
    eight = out["bits"][8]
    assert eight["verdict"] == "certified" and eight["margin_quantized_lower"] > 0
    assert all(r["verdict"] in ("certified", "refuted", "undecided") for r in out["bits"].values())


def test_multitier_mondeq(mnist_dir: Path) -> None:
    out = _load("multitier_mondeq").main(["--data-dir", str(mnist_dir), "--channels", "1", "2", "2",
                                          "--train-limit", "256", "--test-limit", "128",
                                          "--bits", "2", "8"])  # fmt: skip
    assert set(out["bits"]) == {2, 8}
    eight = out["bits"][8]
    assert eight["verdict"] == "certified" and eight["tier"] in ("weyl", "a_priori")
    assert 0 < eight["margin_quantized_lower"] <= eight["margin_lower"]
    assert out["bits"][2]["dW_norm_upper"] > 10 * eight["dW_norm_upper"]  # coarser grid, larger dW
    assert out["unconverged"] == 0


def test_margin_aware_qat(mnist_dir: Path) -> None:
    out = _load("margin_aware_qat").main(["--data-dir", str(mnist_dir), "--train-limit", "3000",
                                          "--test-limit", "500", "--epochs", "1"])  # fmt: skip
    assert out["qat"] == "certified" and out["qat_margin_lower"] > 0


def test_paper_checkpoint(tmp_path: Path, capsys) -> None:
    """A checkpoint in the paper's layout (its code's key names, torch.save of plain tensors)."""
    g = torch.Generator().manual_seed(0)
    n, r, d = 30, 8, 784
    state = {"mon.core.A": 0.05 * torch.randn(r, n, generator=g),
             "mon.core.S": 0.05 * torch.randn(n, n, generator=g),
             "mon.core.m_raw": torch.tensor(-1.5), "mon.core.U": 0.01 * torch.randn(n, d, generator=g),
             "mon.core.b": torch.zeros(n), "classifier.weight": torch.randn(10, n, generator=g),
             "classifier.bias": torch.zeros(10)}  # fmt: skip
    path = tmp_path / "mnist_mondeq_float.pt"
    torch.save(state, path)
    verdicts = _load("paper_checkpoint").main([str(path), "--bits", "2", "8", "16"])
    assert verdicts[16] == "certified"
    assert set(verdicts.values()) <= {"certified", "refuted", "undecided"}
    assert "bits" in capsys.readouterr().out
    torch.save({"x": object()}, tmp_path / "bad.pt")  # a pickle of code, not of tensors
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        _load("paper_checkpoint").main([str(tmp_path / "bad.pt")])
