"""How close is a training step to what eager PyTorch can do at all? (prints, asserts nothing; issue 16)

Times two training steps of the paper's dense MonDEQ (n = 100, batch 128, Adam 1e-3, one thread)
on the same batches, in alternated rounds:

- the library's: ``monquant.training.loop`` with its training solves (PR at the estimated
  geometric step, scheduled residual checks, the implicit backward as an adjoint PR solve);
- a floor: the same model and optimizer, but its equilibrium is a bare autograd function that
  inverts ``I + a (I - W)`` and runs a fixed number of PR iterations forward and backward (the
  library's iterations in its last forward and adjoint solves before the round) with no residual test, no
  spectral estimate, no input check and no bookkeeping. It proves and reports nothing, and it is
  not a solver anyone should use: it only shows the least an eager step of the same arithmetic
  costs on this machine.

Prints the median milliseconds per step of each, their ratio, and the epoch (469 steps) each would
take, and below them the matrix products alone (the injection, its weight gradient and the PR
products of the bare step's iterations, timed apart at the same shapes: a floor under any step);
next to the paper's code's epoch (``--paper-epoch S``, e.g. from ``benchmarks/paper_epoch.py``) the
ratios an epoch could reach. A fresh model's solves need about 10 iterations, a trained one's
about 40 (``--checkpoint F``: both steps start from that saved model, e.g. a reproduction's
``float/model.safetensors``, at ``--lr``).

    MONQUANT_DATA=... python benchmarks/train_floor.py [--steps 40] [--rounds 7] [--paper-epoch S]
        [--checkpoint F [--lr 1e-4]]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from pr_compile import per_iteration_us  # the benchmarks' shared timing loop (same folder)

from monquant.data import load_mnist, take_rows
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.report import text_table
from monquant.storage.checkpoints import load_model
from monquant.training.loop import TrainConfig, TrainHooks, _train_one_epoch, training_solver_config
from monquant.training.optim import Adam


class _BarePR(torch.autograd.Function):
    """``z = relu(W z + q)`` by ``iterations`` PR steps at step ``a`` (the fixed point is not
    tested); the backward runs as many steps of the adjoint PR iteration."""

    @staticmethod
    def forward(ctx: Any, W: torch.Tensor, q: torch.Tensor, a: float, iterations: int) -> torch.Tensor:
        eye = torch.eye(W.shape[0], dtype=W.dtype)
        K = torch.linalg.inv(eye + a * (eye - W)).T  # row layout: J v = v K
        R = 2 * K - eye  # reflected resolvent
        c = (q @ K).mul_(2 * a)
        y = c.clone()
        for _ in range(iterations):
            y = torch.addmm(c, y.abs(), R)  # u = 2 relu(y) - y = |y|, then y = R_F(u)
        z = y.relu()
        ctx.save_for_backward(W, q, z, K)
        ctx.a, ctx.iterations = a, iterations
        return z

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        W, q, z, K = ctx.saved_tensors
        eye = torch.eye(W.shape[0], dtype=W.dtype)
        d = ((z @ W.T + q) > 0).to(g.dtype)
        KT = K.T.contiguous()
        R = 2 * KT - eye
        c = (g @ KT).mul_(2 * ctx.a)
        sign = 2 * d - 1  # the reflection of the mask projection
        y = c.clone()
        for _ in range(ctx.iterations):
            y = torch.addmm(c, y * sign, R)
        v = y * d
        return v.T @ z, v, None, None


def products_per_step(model: MonDEQClassifier, x: torch.Tensor, iterations: int) -> dict[str, float]:
    """Microseconds of the matrix products a training step cannot avoid, at the model's shapes:
    the injection ``U x + b``, its weight gradient ``g^T x`` and one PR product ``y R + c``, and
    their sum per step for ``iterations`` PR iterations in each of the forward and adjoint solves."""
    U, b = model.layer.factor("U").detach(), model.layer.factor("b").detach()
    n = U.shape[0]
    g, y = torch.randn(x.shape[0], n), torch.randn(x.shape[0], n)
    R = torch.randn(n, n)
    def median_us(fn: Any) -> float:  # the median of 7 rounds of 300 calls, after a warm-up
        return per_iteration_us(fn, 1, 300, 7, lambda: None)

    with torch.no_grad():
        us = {"injection": median_us(lambda: torch.nn.functional.linear(x, U, b)),
              "weight gradient": median_us(lambda: g.T @ x),
              "PR product": median_us(lambda: torch.addmm(y, y, R))}  # fmt: skip
    us["step"] = us["injection"] + us["weight gradient"] + 2 * iterations * us["PR product"]
    return us


class _BareSolver:
    def __init__(self, iterations: int, step: float) -> None:
        self.iterations, self.step = iterations, step

    def __call__(self, W: torch.Tensor, q: torch.Tensor, step_from: object = None) -> torch.Tensor:
        return _BarePR.apply(W, q, self.step, self.iterations)  # a fixed step: step_from has no say


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--paper-epoch", type=float, default=None, help="seconds of the paper's epoch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", default=None, help="a saved model (default: a fresh one)")
    p.add_argument("--lr", type=float, default=None, help="Adam's rate (default: the training's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    n = 128 * args.steps
    x, y = take_rows(data.x_train, torch.arange(n)), data.y_train[:n]
    cfg = TrainConfig(epochs=1, **({"lr": args.lr} if args.lr is not None else {}))
    models, opts = {}, {}
    for name in ("library", "floor"):
        torch.manual_seed(0)
        saved = load_model(args.checkpoint).model if args.checkpoint else None
        models[name] = saved if saved is not None else MonDEQClassifier(MonDEQConfig())
        opts[name] = Adam(models[name].parameters(), lr=cfg.lr)
        models[name].train()
    solver = models["library"].solver
    solver.forward_config = training_solver_config(cfg, solver.forward_config, 0)
    times: dict[str, list[float]] = {"library": [], "floor": []}
    for r in range(args.rounds):
        for name in ("library", "floor"):
            if name == "floor":  # the library's iterations (forward and adjoint) and step just now
                fwd, bwd = solver.last_forward, solver.last_backward
                its = max(round((fwd.iterations + bwd.iterations) / 2), 1)
                models[name].layer.solver = _BareSolver(its, fwd.step)
            t0 = time.perf_counter()
            _train_one_epoch(models[name], opts[name], x, y, cfg, TrainHooks(), r, False)
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
    its = models["floor"].layer.solver.iterations
    prod = products_per_step(models["floor"], x[:128], its)
    med["products only"] = prod["step"] * 1e-6
    rows = [[k, med[k] * 1e3, med[k] / med["library"], med[k] * 469] for k in med]
    header = ["step", "ms / step", "/ library", "epoch s (469 steps)"]
    if args.paper_epoch:
        header.append("epoch / paper's")
        for row in rows:
            row.append(row[3] / args.paper_epoch)
    what = f"checkpoint {args.checkpoint}" if args.checkpoint else "a fresh model"
    print(f"{what}: {args.steps} steps x {args.rounds} rounds, threads {torch.get_num_threads()}, "
          f"floor at {models['floor'].layer.solver.iterations} PR iterations per solve")  # fmt: skip
    print(text_table(header, rows))
    print(f"products only: the injection {prod['injection']:.1f} us, its weight gradient "
          f"{prod['weight gradient']:.1f} us and {2 * its} PR products of {prod['PR product']:.1f} us "
          "per step (medians, batch 128); nothing else of the step is counted")  # fmt: skip


if __name__ == "__main__":
    main()
