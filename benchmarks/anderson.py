"""Safeguarded Anderson acceleration on the MNIST-scale operators (prints, asserts nothing).

For each model (a checkpoint given by ``--checkpoint``, else a freshly initialised dense, single-conv
and multi-tier MonDEQ), solves the equilibria of ``--batch`` MNIST test images with each splitting
method of ``--methods`` (the model's tolerance, each method's default step), plainly and with
``SolverConfig(anderson=M)`` for every ``M`` in ``--memory``, and prints the batch's iterations,
the mean per-sample iterations, the median seconds of ``--repeats`` solves, the ratio of those
seconds to the same method's plain solve and to the first method's plain solve (below 1: faster),
the unconverged count and the largest relative distance to the same method's plain equilibrium
(both stop at the same tolerance, so it is of the order of ``tol``).

    MONQUANT_DATA=... python benchmarks/anderson.py [--checkpoint CKPT ...]
        [--methods pr dr] [--memory 3 5] [--batch 128] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from monquant.data import load_mnist
from monquant.operators import as_operator
from monquant.report import text_table
from monquant.solvers import solve


def fresh_models() -> dict[str, Any]:
    from monquant.conv_model import ConvMonDEQClassifier, ConvMonDEQConfig
    from monquant.model import MonDEQClassifier, MonDEQConfig
    from monquant.multitier_model import MultiTierMonDEQClassifier, MultiTierMonDEQConfig

    torch.manual_seed(0)
    return {
        "dense 100 (init)": MonDEQClassifier(MonDEQConfig()),
        "conv 16x28x28 (init)": ConvMonDEQClassifier(ConvMonDEQConfig(channels=16)),
        "multi-tier 4/8/16 (init)": MultiTierMonDEQClassifier(
            MultiTierMonDEQConfig(tier_channels=(4, 8, 16))
        ),
    }


def operator_and_injection(model: Any, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    layer = model.layer
    with torch.no_grad():
        q = layer.injection(x)
        op = layer.used_operator() if hasattr(layer, "used_operator") else layer.weight()
    return (op.detach() if hasattr(op, "detach") else op), q


def timed(op: Any, q: torch.Tensor, cfg: Any, stats: Any, repeats: int) -> tuple[Any, float]:
    times, r = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = solve(op, q, cfg, stats=stats)
        times.append(time.perf_counter() - t0)
    return r, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="*", default=None, help="monquant model checkpoints")
    p.add_argument("--memory", type=int, nargs="+", default=[3, 5])
    p.add_argument("--methods", nargs="+", default=["pr", "dr"], help="splitting methods, first = reference")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_mnist().x_test[: args.batch]
    if args.checkpoint:
        from monquant.storage.checkpoints import load_model

        models = {path: load_model(path).model.eval() for path in args.checkpoint}
    else:
        models = fresh_models()
    rows = []
    for name, model in models.items():
        op, q = operator_and_injection(model, x)
        base_cfg = model.layer.solver.forward_config
        stats = as_operator(op).detach().to(dtype=q.dtype).spectral_stats()
        t_ref = None
        for method in args.methods:
            cfg = replace(base_cfg, method=method, step=None, anderson=0)
            plain, t_plain = timed(op, q, cfg, stats, args.repeats)
            t_ref = t_ref if t_ref is not None else t_plain
            for M in [0, *args.memory]:
                r, t = (plain, t_plain) if M == 0 else timed(op, q, replace(cfg, anderson=M), stats,
                                                           args.repeats)  # fmt: skip
                dist = float(((r.z - plain.z).norm(dim=1) / plain.z.norm(dim=1).clamp_min(1e-30)).max())
                rows.append([name, method, M, r.iterations, float(r.sample_iterations.float().mean()),
                             t, t / t_plain, t / t_ref, r.n_unconverged, dist])  # fmt: skip
    print(f"batch {args.batch}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(text_table(["model", "method", "Anderson M", "iterations", "mean it.", "seconds",
                      "/ plain same method", f"/ plain {args.methods[0]}", "unconverged",
                      "max rel. dist."], rows))  # fmt: skip


if __name__ == "__main__":
    main()
