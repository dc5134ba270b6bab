"""Shared fixtures and generators for the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from monquant.operators import wk_weight

settings.register_profile("monquant", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("monquant")
torch.set_num_threads(1)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def random_monotone_W(
    n: int, m: float, rank: int | None = None, skew: float = 1.0, scale: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """A random float64 ``W = (1 - m) I - A^T A + B - B^T`` with margin >= m."""
    g = torch.Generator().manual_seed(seed)
    r = rank or n
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * scale / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) * skew / n**0.5
    return wk_weight(A, B, m)


def assert_reloads_identically(model, make, x: torch.Tensor) -> None:
    """``model``'s state dict, loaded into a fresh ``make()``, gives the same outputs on ``x`` to
    the bit and the same model certificate (the quantization state travels with the weights)."""
    import io

    import monquant

    with torch.no_grad():
        out = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert monquant.certify_model(fresh).to_dict() == monquant.certify_model(model).to_dict()


class RecordingEstimates:
    """Wraps a solver's step estimates (:class:`~monquant.solvers.StepEstimates`), keeping the
    operators they were asked about."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __call__(self, W):
        self.seen.append(W)
        return self.inner(W)

    def reset(self) -> None:
        self.inner.reset()


def write_tiny_mnist(folder: Path, n_train: int, n_test: int) -> Path:
    """Raw IDX files of learnable 28 x 28 images in ``folder`` (class k lights up its own band
    of pixels): train and t10k splits, seeds 0 and 1."""
    import struct

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 784)).astype(np.uint8)
        for k in range(10):
            x[y == k, k * 78 : (k + 1) * 78] = 255
        images = struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes()
        (folder / f"{split}-images-idx3-ubyte").write_bytes(images)
        labels = struct.pack(">II", 0x801, n) + y.tobytes()
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    return folder


def small_classifier(seed: int, margin: float = 0.5, n: int = 12, d: int = 8):
    """A random float64 MonDEQ classifier (4 classes, head scaled up so margins vary)."""
    from monquant.model import MonDEQClassifier, MonDEQConfig

    torch.manual_seed(seed)
    cfg = MonDEQConfig(in_features=d, hidden=n, out_features=4, margin_init=margin)
    model = MonDEQClassifier(cfg)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    return model.double().eval()


@pytest.fixture(scope="session")
def classifier():
    """``classifier(seed, margin=0.5, n=12, d=8)``: a small random float64 MonDEQ classifier."""
    return small_classifier


@pytest.fixture(scope="session")
def tiny_mnist():
    """``tiny_mnist(folder, n_train, n_test) -> folder``: learnable IDX files (no real MNIST)."""
    return write_tiny_mnist


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST folder for tests: MONQUANT_DATA if set, else ../shared/data/mnist; skip if absent."""
    env = os.environ.get("MONQUANT_DATA")
    path = Path(env) if env else SHARED_MNIST
    if (
        not (path / "t10k-labels-idx1-ubyte.gz").exists()
        and not (path / "t10k-labels-idx1-ubyte").exists()
    ):
        pytest.skip(f"MNIST files not found in {path}")
    return path
