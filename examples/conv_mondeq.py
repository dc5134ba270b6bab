"""A single-convolution MonDEQ on MNIST: train it, quantize its operator, certify it.

    python examples/conv_mondeq.py [--data-dir DIR] [--channels 8] [--train-limit K] [--epochs E]

The equilibrium layer is ``monquant.nn.ConvMonDEQ``: ``z* = relu(W z* + U x)`` on an
``8 x 28 x 28`` state, where ``W = (1 - m) I - A^T A + B - B^T`` with 3 x 3 convolution factors is
monotone by construction. The forward solve is Peaceman-Rachford, with the resolvent applied
per 2-D frequency; the backward is the implicit adjoint solve. After training,
``monquant.quantize_`` quantizes the operator's composite 5 x 5 kernel per output channel.
``monquant.certify_model`` then proves, from the Fourier blocks and without a solve, whether the
quantized operator is still monotone, at each bit-width.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.data import load_mnist
from monquant.nn import ConvMonDEQ


def build(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        ConvMonDEQ(1, channels, (28, 28), kernel=3, margin=0.5),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(channels * 49, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--test-limit", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_mnist(args.data_dir)
    x, y = data.x_train[: args.train_limit], data.y_train[: args.train_limit]
    xt, yt = data.x_test[: args.test_limit], data.y_test[: args.test_limit]
    model = build(args.channels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, x.shape[0], 128):
            loss = F.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        layer = model[1]
        assert isinstance(layer, ConvMonDEQ)
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, xt, yt):.4f}, "
              f"m {float(layer.margin().detach()):.4f}, "
              f"unconverged solves {layer.solver.counters.summary()['forward_unconverged']}")  # fmt: skip
    float_acc = accuracy(model, xt, yt)
    rows = {}
    for b in args.bits:
        q = monquant.quantize_(copy.deepcopy(model), monquant.QuantConfig(bits=b, granularity="per-channel"))
        cert = monquant.certify_model(q)
        c = cert.layers["1"]
        rows[b] = {"verdict": cert.verdict, "accuracy": accuracy(q, xt, yt),
                   "margin_quantized_lower": c.margin_quantized_lower, "dW_over_m": c.dW_over_m}  # fmt: skip
        print(f"{b} bits per channel: {cert.verdict} (tier {c.tier}), margin(W~) >= "
              f"{c.margin_quantized_lower:.4g}, ||dW||/m {c.dW_over_m:.3g}, "
              f"accuracy {rows[b]['accuracy']:.4f}")  # fmt: skip
    print(f"float accuracy {float_acc:.4f}")
    return {"float_accuracy": float_acc, "bits": rows}


if __name__ == "__main__":
    main()
