"""A multi-tier convolutional MonDEQ on MNIST: train it, quantize its operator, certify it.

    python examples/multitier_mondeq.py [--data-dir DIR] [--channels 4 8 16] [--train-limit K]
                                        [--epochs E] [--bits 4 6 8]

The equilibrium layer is ``monquant.nn.MultiTierMonDEQ``: a state of three tiers, 28 x 28,
14 x 14 and 7 x 7, coupled by stride-2 convolutions (block lower triangular, as in the multi-tier
MonDEQ of Winston and Kolter), monotone with margin >= m by construction. The forward solve is
Peaceman-Rachford with the resolvent applied tier by tier (one small inverse per frequency); the
backward is the implicit adjoint solve. The head reads the coarsest tier. After training,
``monquant.quantize_`` quantizes the operator's composite kernels (one per tier and one per
coupling) per output channel, and ``monquant.certify_model`` proves, without a solve, that the
quantized operator is still monotone wherever ``margin(W) - ||dW||`` stays positive (the Weyl tier
with a rigorous ``||dW||``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

import monquant
from monquant.data import load_mnist
from monquant.nn import MultiTierMonDEQ


def build(channels: list[int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        MultiTierMonDEQ(1, channels, (28, 28), kernel=3, margin=0.5),
        nn.Flatten(),
        nn.Linear(channels[-1] * 49, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sum((model(x[i : i + 500]).argmax(dim=1) == y[i : i + 500]).sum()
                         for i in range(0, x.shape[0], 500)) / x.shape[0])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--channels", type=int, nargs=3, default=[4, 8, 16])
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
    layer = model[1]
    assert isinstance(layer, MultiTierMonDEQ)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, x.shape[0], 128):
            loss = F.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, xt, yt):.4f}, "
              f"m {float(layer.margin().detach()):.4f}, "
              f"unconverged solves {layer.solver.counters.summary()['forward_unconverged']}")  # fmt: skip
    train_s = time.perf_counter() - start
    float_acc = accuracy(model, xt, yt)
    rows = {}
    for b in args.bits:
        q = monquant.quantize_(copy.deepcopy(model), monquant.QuantConfig(bits=b, granularity="per-channel"))
        cert = monquant.certify_model(q)
        c = cert.layers["1"]
        rows[b] = {"verdict": cert.verdict, "tier": c.tier, "accuracy": accuracy(q, xt, yt),
                   "margin_quantized_lower": c.margin_quantized_lower,
                   "dW_norm_upper": c.dW_norm_upper, "margin_lower": c.margin_lower}  # fmt: skip
        print(f"{b} bits per channel: {cert.verdict} (tier {c.tier}), ||dW|| <= {c.dW_norm_upper:.4g}, "
              f"margin(W~) >= {c.margin_quantized_lower:.4g} (m >= {c.margin_lower:.4g}), "
              f"accuracy {rows[b]['accuracy']:.4f}")  # fmt: skip
    print(f"float accuracy {float_acc:.4f}; training {train_s:.0f} s; "
          f"unconverged solves {layer.solver.counters.summary()['forward_unconverged']}")  # fmt: skip
    return {"float_accuracy": float_acc, "bits": rows, "train_seconds": train_s,
            "unconverged": layer.solver.counters.summary()["forward_unconverged"]}  # fmt: skip


if __name__ == "__main__":
    main()
