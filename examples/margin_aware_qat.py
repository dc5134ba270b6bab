"""Margin-aware quantization-aware training at 4 bits, against post-training quantization.

    python examples/margin_aware_qat.py [--data-dir DIR] [--train-limit K] [--epochs E]

A fully connected MonDEQ (784 -> 100 -> 10) is trained in float, then (1) quantized to 4 bits
after training, and (2) fine-tuned with ``prepare_qat(method="margin-aware")``: STE through
``Q_4(W)`` plus the penalty ``relu(tau - margin(Q_4(W)))`` that pushes the *quantized* operator's
margin above ``tau``. The certificate says which of the two 4-bit models is proved to converge.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.data import load_mnist
from monquant.nn import MonDEQ


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, x.shape[0], 128):
            loss = F.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
            loss = loss + monquant.qat_penalty(model)  # 0 unless a layer is in margin-aware QAT
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=20_000)
    p.add_argument("--test-limit", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_mnist(args.data_dir)
    x, y = data.x_train[: args.train_limit], data.y_train[: args.train_limit]
    xt, yt = data.x_test[: args.test_limit], data.y_test[: args.test_limit]
    model = nn.Sequential(MonDEQ(784, 100, margin=0.2, init="paper"), nn.Linear(100, 10))
    fit(model, x, y, args.epochs, 1e-3)
    print(f"float: accuracy {accuracy(model, xt, yt):.4f}")

    config = monquant.QuantConfig(bits=args.bits)
    ptq = monquant.quantize_(copy.deepcopy(model), config)
    ptq_cert = monquant.certify_model(ptq)
    print(f"PTQ {args.bits}-bit: accuracy {accuracy(ptq, xt, yt):.4f}\n{ptq_cert}")

    qat = monquant.prepare_qat(copy.deepcopy(model), config, method="margin-aware",
                               margin_target=0.1)  # fmt: skip
    fit(qat, x, y, 1, 3e-4)
    monquant.convert(qat)
    qat_cert = monquant.certify_model(qat)
    print(f"margin-aware QAT {args.bits}-bit: accuracy {accuracy(qat, xt, yt):.4f}\n{qat_cert}")
    return {"ptq": ptq_cert.verdict, "qat": qat_cert.verdict,
            "qat_margin_lower": qat_cert.layers["0"].margin_quantized_lower}  # fmt: skip


if __name__ == "__main__":
    main()
