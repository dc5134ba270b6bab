"""Quantize and certify a model of your own: a convolutional stem, a MonDEQ layer, a linear head.

    python examples/custom_model.py [--data-dir DIR] [--train-limit K] [--epochs E] [--bits B]

Trains the model on MNIST with a standard torch optimizer and LR scheduler, then quantizes every
MonDEQ layer's ``W`` in place (post-training quantization), certifies it from the weights alone
(no solver run), measures accuracy before and after, and checks that the saved model reloads to the
same certificate.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.data import load_mnist
from monquant.nn import MonDEQ


class ConvMonDEQ(nn.Module):
    """28 x 28 image -> conv stem (8 x 14 x 14) -> MonDEQ equilibrium (100 units) -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.deq = MonDEQ(8 * 14 * 14, 100, margin=0.5)
        self.head = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(x.reshape(-1, 1, 28, 28))))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--test-limit", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--bits", type=int, default=6)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_mnist(args.data_dir)
    x, y = data.x_train[: args.train_limit], data.y_train[: args.train_limit]
    xt, yt = data.x_test[: args.test_limit], data.y_test[: args.test_limit]
    model = ConvMonDEQ()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, x.shape[0], 128):
            loss = F.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, xt, yt):.4f}")
    float_acc = accuracy(model, xt, yt)

    print(monquant.min_certified_bits(model))  # smallest certified bits per tier, per layer
    config = monquant.QuantConfig(bits=args.bits, granularity="per-channel")
    monquant.quantize_(model, config)
    cert = monquant.certify_model(model)
    print(model.deq)
    print(cert)
    quant_acc = accuracy(model, xt, yt)
    print(f"accuracy: float {float_acc:.4f}, {args.bits}-bit {quant_acc:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        fresh = ConvMonDEQ()
        fresh.load_state_dict(torch.load(path, weights_only=True))
        same = monquant.certify_model(fresh).to_dict() == cert.to_dict()
    print(f"reloaded model has the same certificate: {same}")
    return {"verdict": cert.verdict, "float_accuracy": float_acc,
            "quantized_accuracy": quant_acc, "same_after_reload": same}  # fmt: skip


if __name__ == "__main__":
    main()
