"""Seconds per training step of the single-convolution MonDEQ (prints, asserts nothing; issue 16).

Trains ``ConvMonDEQClassifier`` (``--channels`` channels, the library's defaults otherwise: PR,
implicit backward, Adam 1e-3, batch 128) on the first ``--images`` MNIST training images for
``--epochs`` epochs (``--qat-bits B``: under STE QAT of the composite kernel) and prints the
seconds per step, the mean training-solve iterations, the test accuracy on 256 test images and
the unconverged solves. Uses only public names, so the same file
times another revision (``PYTHONPATH=OTHER/src python benchmarks/conv_train_step.py``) for an A/B
comparison.

    MONQUANT_DATA=... python benchmarks/conv_train_step.py [--channels 16] [--images 2560]
        [--epochs 2] [--threads 1] [--qat-bits B] [--json F]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from monquant.conv_model import ConvMonDEQClassifier, ConvMonDEQConfig
from monquant.data import load_mnist
from monquant.storage.jsonio import dumps_json
from monquant.training.loop import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qat-bits", type=int, default=None, help="train under STE QAT of the composite kernel")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    torch.manual_seed(args.seed)
    model = ConvMonDEQClassifier(ConvMonDEQConfig(channels=args.channels))
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, qat_bits=args.qat_bits)
    x, y = data.x_train[: args.images], data.y_train[: args.images]
    t0 = time.perf_counter()
    history = train(model, x, y, data.x_test[:256], data.y_test[:256], cfg, progress=False)
    seconds = time.perf_counter() - t0
    steps = args.epochs * math.ceil(args.images / cfg.batch_size)
    last = history[-1]
    out = {
        "seconds_per_step": seconds / steps,
        "train_mean_iterations": last["train_mean_iterations"],
        "train_mean_iterations_all_epochs": sum(e["train_mean_iterations"] for e in history) / len(history),
        "test_accuracy": last["test_accuracy"],
        "unconverged": sum(e["train_unconverged"] + e["backward_unconverged"] for e in history),
        "threads": torch.get_num_threads(),
    }
    print(f"{args.channels} channels, {args.images} images, {args.epochs} epochs, {steps} steps: "
          f"{out['seconds_per_step']:.3f} s per step (evaluations included), mean iterations "
          f"{out['train_mean_iterations']:.2f}, test accuracy {out['test_accuracy']:.4f}, "
          f"unconverged solves {out['unconverged']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json(out))


if __name__ == "__main__":
    main()
