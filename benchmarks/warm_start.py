"""Would warm starts pay in training? (prints, asserts nothing; issue 16)

Trains the default dense MonDEQ (n = 100, PR) one epoch at a time. After each epoch it solves the
equilibria of the first ``--samples`` training images twice with the model's own solver settings:
from zero (what training does) and from each sample's final PR state of the previous epoch (a warm
start; the unique equilibrium does not depend on it). It prints the mean per-sample and the batch
iterations of both. The saving bounds what a warm start could save in the forward solves of
training, before the cost of storing one state per training image.

    MONQUANT_DATA=... python benchmarks/warm_start.py [--epochs 4] [--samples 1024] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from monquant.data import load_mnist
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.report import text_table
from monquant.solvers import solve
from monquant.training.loop import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    torch.manual_seed(args.seed)
    model = MonDEQClassifier(MonDEQConfig())
    x = data.x_train[: args.samples].flatten(1)
    rows, previous = [], None
    for epoch in range(1, args.epochs + 1):
        train(model, data.x_train, data.y_train, data.x_test[:500], data.y_test[:500],
              TrainConfig(epochs=1, seed=args.seed + epoch), progress=False)  # fmt: skip
        with torch.no_grad():
            W, q = model.layer.weight(), model.layer.injection(x)
        cfg = model.layer.solver.forward_config
        cold = solve(W, q, cfg)
        if previous is not None:
            warm = solve(W, q, cfg, init=previous)
            c, w = float(cold.sample_iterations.float().mean()), float(warm.sample_iterations.float().mean())
            rows.append([epoch, c, w, w / c, cold.iterations, warm.iterations,
                         cold.n_unconverged + warm.n_unconverged])  # fmt: skip
        previous = cold.state
    print(f"{args.samples} training images, {cfg.method} tol {cfg.tol:g}, threads {torch.get_num_threads()}")
    print(text_table(["epoch", "mean it. (cold)", "mean it. (warm)", "warm / cold", "batch it. (cold)",
                      "batch it. (warm)", "unconverged"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
