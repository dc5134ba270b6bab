"""Where should a training solve make its first residual check? (prints, asserts nothing; issue 16)

Records the forward and adjoint solves of ``--steps`` training steps of a model (the library's
training loop with its training settings: estimated spectral constants, the geometric step): a
fresh model, or a checkpoint (``--checkpoint``, optionally trained on under QAT with
``--qat-bits``) at learning rate ``--lr``. Then replays every recorded solve in order, with the same
operator, injection, settings, step, prox and resolvent, under two schedules of
``check_every="auto"``:

- cold: the first checks at iterations 1 and 3 (what every solve outside training does);
- warm: the first check at :func:`monquant.solvers.first_check_after` of the iterations of the
  previous solve of the same side (forward or adjoint), what the training solves do.

Prints per schedule the mean iterations and residual checks per solve, the CPU time of the solves
(per solve, the median of ``--repeats`` replays, cold and warm alternated), and the ratio warm /
cold. Both schedules decide by the same test; the table also counts unconverged solves.

    MONQUANT_DATA=... python benchmarks/check_schedule.py [--checkpoint F [--qat-bits B]]
        [--steps 60] [--lr 1e-3] [--repeats 5] [--threads 1] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import monquant.implicit
from monquant.data import load_mnist, take_rows
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.report import text_table
from monquant.solvers import first_check_after, solve
from monquant.storage.checkpoints import load_model
from monquant.storage.jsonio import dumps_json
from monquant.training.loop import (
    TrainConfig,
    TrainHooks,
    _train_one_epoch,
    install_qat,
    training_solver_config,
)
from monquant.training.optim import Adam


def record(model: Any, steps: int, lr: float, seed: int) -> list[tuple[str, tuple, dict]]:
    """The solves of ``steps`` training steps on the first training images: ``(side, args, kwargs)``."""
    data = load_mnist()
    n = 128 * steps
    x, y = take_rows(data.x_train, torch.arange(n)), data.y_train[:n]
    cfg = TrainConfig(epochs=1, lr=lr, seed=seed)
    solver = model.solver
    solver.forward_config = training_solver_config(cfg, solver.forward_config, 0)
    solver.reset()
    calls: list[tuple[str, tuple, dict]] = []
    real = monquant.implicit.solve

    def spy(*a: Any, **kw: Any) -> Any:
        calls.append(("adjoint" if "prox" in kw else "forward", a, {k: v for k, v in kw.items()
                                                                    if k != "first_check"}))  # fmt: skip
        return real(*a, **kw)

    monquant.implicit.solve = spy
    try:
        model.train()
        _train_one_epoch(model, Adam(model.parameters(), lr=lr), x, y, cfg, TrainHooks(), 0, False)
    finally:
        monquant.implicit.solve = real
    return calls


def replay(calls: list[tuple[str, tuple, dict]], repeats: int) -> dict[str, dict[str, float]]:
    """Every recorded solve under the cold and the warm schedule (timed alternately)."""
    stats = {name: {"iterations": 0, "checks": 0, "unconverged": 0, "seconds": 0.0}
             for name in ("cold", "warm")}  # fmt: skip
    last: dict[str, int] = {}
    for side, a, kw in calls:
        first = first_check_after(last[side]) if side in last else None
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        results = {}
        for _ in range(repeats):
            for name, fc in (("cold", None), ("warm", first)):
                t0 = time.process_time()
                results[name] = solve(*a, **kw, first_check=fc)
                times[name].append(time.process_time() - t0)
        last[side] = results["warm"].iterations
        for name, r in results.items():
            st = stats[name]
            st["iterations"] += r.iterations
            st["checks"] += r.checks
            st["unconverged"] += r.n_unconverged
            st["seconds"] += statistics.median(times[name])
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a saved model (default: a fresh one)")
    p.add_argument("--qat-bits", type=int, default=None, help="train under QAT at these bits")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint).model if args.checkpoint else MonDEQClassifier(MonDEQConfig())
    if args.qat_bits is not None:
        install_qat(model, args.qat_bits)
    calls = record(model, args.steps, args.lr, args.seed)
    stats = replay(calls, args.repeats)
    n = len(calls)
    cold = stats["cold"]["seconds"]
    rows = [[name, n, st["iterations"] / n, st["checks"] / n, st["unconverged"], st["seconds"] / n * 1e6,
             st["seconds"] / cold] for name, st in stats.items()]  # fmt: skip
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "a fresh model"
    qat = f", QAT {args.qat_bits} bits" if args.qat_bits else ""
    print(f"{n} recorded solves ({args.steps} training steps, {what}{qat}), threads "
          f"{torch.get_num_threads()}, medians of {args.repeats} replays")  # fmt: skip
    print(text_table(["schedule", "solves", "iterations / solve", "checks / solve", "unconverged",
                      "us / solve", "time / cold"], rows))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps_json({"args": vars(args), "schedules": stats, "solves": n}))


if __name__ == "__main__":
    main()
