"""Paired training-epoch benchmark: monquant against the paper's own code, on the same data.

Runs one training epoch of the paper's MNIST MonDEQ (n = 100, batch 128, Adam 1e-3) with the
paper's own training function (github.com/JLi-Projects/mondeq-quant, ``training.train_mnist.train``
with its settings: FB at alpha = 1 tuned at batches 30 and len/2, tol 1e-5, 500 iterations) and one
with monquant's (``monquant train``'s defaults: PR, tol 1e-4, the step 1/sqrt(m L) from estimated
constants, scheduled residual checks), alternating
``--pairs`` times, each from a fresh model. Both see the same normalised MNIST tensors in batches of
128 through the same kind of loader, and both evaluate the same ``--test-size`` test images after
the epoch (each library's own evaluation), so the two timed calls do the same work. Prints each
pair's seconds and ratio, the medians, and the ratio of the medians. Asserts nothing.

The paper's code is read from ``--paper-repo`` (a checkout; nothing of it is copied here). Its
training module imports torchvision for its own data loaders, which this benchmark does not call;
when torchvision is not installed an empty stand-in module is registered so that the import works.

    MONQUANT_DATA=... python benchmarks/paper_epoch.py --paper-repo PATH [--pairs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from monquant.data import load_mnist
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.report import text_table
from monquant.training.loop import TrainConfig, train


def paper_modules(repo: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The paper's model and training modules, imported from ``repo/src``."""
    src = repo / "src"
    if not (src / "training" / "train_mnist.py").is_file():
        raise SystemExit(f"error: {repo} is not a checkout of JLi-Projects/mondeq-quant")
    sys.path.insert(0, str(src))
    try:
        importlib.import_module("torchvision")
    except ImportError:  # only its loaders need it; register an empty stand-in for the import
        tv = types.ModuleType("torchvision")
        tv.datasets = types.ModuleType("torchvision.datasets")  # type: ignore[attr-defined]
        tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.datasets": tv.datasets,
                            "torchvision.transforms": tv.transforms})  # fmt: skip
    return importlib.import_module("models.mnist_mondeq"), importlib.import_module(
        "training.train_mnist"
    )


def paper_epoch(models, training, x, y, xt, yt, seed: int) -> float:
    """Seconds of one epoch of the paper's ``train`` (its evaluation of ``xt`` included)."""
    torch.manual_seed(seed)
    model = models.MNISTMonDEQ(hidden_dim=100, alpha=1.0, max_iters=500, tol=1e-5)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=g)
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=256)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        training.train(train_loader, test_loader, model, epochs=1, max_lr=1e-3, lr_mode="step",
                       tune_alpha_flag=True, max_alpha=1.0, seed=seed)  # fmt: skip
    return time.perf_counter() - t0


def monquant_epoch(x, y, xt, yt, seed: int) -> float:
    """Seconds of one epoch of monquant's ``train`` (its evaluation of ``xt`` included)."""
    torch.manual_seed(seed)
    model = MonDEQClassifier(MonDEQConfig())
    t0 = time.perf_counter()
    train(model, x, y, xt, yt, TrainConfig(epochs=1, seed=seed), progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper-repo", type=Path, required=True,
                   help="a checkout of github.com/JLi-Projects/mondeq-quant")  # fmt: skip
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.pairs < 1 or args.threads < 1 or args.train_size < 128 or args.test_size < 1:
        raise SystemExit(
            "error: --pairs and --threads must be >= 1, --train-size >= 128, --test-size >= 1"
        )
    models, training = paper_modules(args.paper_repo)
    torch.set_num_threads(args.threads)
    data = load_mnist()
    x, y = data.x_train[: args.train_size], data.y_train[: args.train_size]
    xt, yt = data.x_test[: args.test_size], data.y_test[: args.test_size]
    rows = []
    for k in range(args.pairs):
        t_paper = paper_epoch(models, training, x, y, xt, yt, args.seed + k)
        t_mq = monquant_epoch(x, y, xt, yt, args.seed + k)
        rows.append([k + 1, t_paper, t_mq, t_mq / t_paper])
        print(f"pair {k + 1}: paper {t_paper:.2f} s, monquant {t_mq:.2f} s", flush=True)
    med_p = statistics.median(r[1] for r in rows)
    med_m = statistics.median(r[2] for r in rows)
    rows.append(["median", med_p, med_m, statistics.median(r[3] for r in rows)])
    print(text_table(["pair", "paper s", "monquant s", "monquant / paper"], rows))
    print(f"ratio of the medians: {med_m / med_p:.4f} ({args.threads} thread(s), "
          f"{args.train_size} training images)")  # fmt: skip


if __name__ == "__main__":
    main()
