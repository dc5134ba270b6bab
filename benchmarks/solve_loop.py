"""Time of the solver loop alone: microseconds per iteration of one dense solve (prints, asserts
nothing; issue 16).

A Winston-Kolter ``W`` (n = 100, margin 0.2) and a 128-sample injection, solved with the spectral
constants and the resolvent passed in (as the training's adjoint solve gets them), so that what is
timed is the loop: the iterations, their residual tests and the per-solve bookkeeping. Prints,
per method, the iterations, the CPU time per solve (process time, less disturbed by other work on a
shared machine than wall time) divided by the iterations, and the time of the iteration's one
matrix product alone, as medians of ``--repeats`` rounds of ``--solves`` solves; then a PR solve
capped at one iteration (a solve's fixed cost plus one iteration) and what a training forward solve
adds before its loop (the estimated ``L``, the resolvent). Uses only public names of
``monquant.solvers`` and ``monquant.operators``, so the same file times another revision of the library
(``PYTHONPATH=OTHER/src python benchmarks/solve_loop.py``) for an A/B comparison.

    python benchmarks/solve_loop.py [--methods pr dr fb] [--tol 1e-5] [--check-every 1|auto] [--json F]
"""

from __future__ import annotations

import argparse
import time

import torch
from pr_compile import per_iteration_us  # the benchmarks' shared timing loop (same folder)

from monquant.operators import DenseOperator, spectral_stats, wk_weight
from monquant.report import text_table
from monquant.solvers import SolverConfig, estimate_lipschitz, solve
from monquant.storage.jsonio import dumps_json


def cpu_us(f, calls: int, repeats: int) -> float:
    """Process time per call in microseconds, the median of ``repeats`` rounds."""
    return per_iteration_us(f, 1, calls, repeats, lambda: None, clock=time.process_time)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["pr", "dr"])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--solves", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-every", default="1", help="K or auto (SolverConfig.check_every)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    every = args.check_every if args.check_every == "auto" else int(args.check_every)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.n
    W = wk_weight(torch.randn(n, n, generator=g) / n**0.5, torch.randn(n, n, generator=g) / n**0.5, 0.2)
    q = torch.randn(args.batch, n, generator=g)
    st = spectral_stats(W)
    rows, out = [], []
    for method in args.methods:
        cfg = SolverConfig(method=method, tol=args.tol, max_iter=20_000, check_every=every)
        first = solve(W, q, cfg, stats=st)
        K = first.resolvent
        us = cpu_us(lambda cfg=cfg, K=K: solve(W, q, cfg, stats=st, resolvent=K), args.solves, args.repeats)
        per_it = us / first.iterations
        rows.append([method, first.iterations, first.n_unconverged, us, per_it])
        out.append({"method": method, "iterations": first.iterations, "us_per_solve": us,
                    "us_per_iteration": per_it, "unconverged": first.n_unconverged})  # fmt: skip
    Kmm = torch.randn(n, n, generator=g)
    mm = cpu_us(lambda: torch.addmm(q, q, Kmm), 2000, args.repeats)
    one = SolverConfig(method="pr", tol=args.tol, max_iter=1, check_every=every)
    K = solve(W, q, one, stats=st).resolvent
    fixed = cpu_us(lambda: solve(W, q, one, stats=st, resolvent=K), args.solves, args.repeats)
    op = DenseOperator(W)
    setup = {"estimate_lipschitz": lambda: estimate_lipschitz(W), "resolvent": lambda: op.resolvent(0.5)}
    setup_us = {k: cpu_us(f, args.solves, args.repeats) for k, f in setup.items()}
    print(f"n={n} batch={args.batch} tol={args.tol:g} check_every={every} threads={torch.get_num_threads()} "
          f"(CPU time, medians of {args.repeats} rounds of {args.solves} solves)")  # fmt: skip
    print(text_table(["method", "iterations", "unconverged", "us / solve", "us / iteration"], rows))
    print(f"one {args.batch} x {n} @ {n} x {n} product alone: {mm:.1f} us")
    print(f"a PR solve capped at one iteration (the fixed cost plus one iteration): {fixed:.1f} us")
    print(f"a training forward solve's setup: the estimated L {setup_us['estimate_lipschitz']:.1f} us, "
          f"the resolvent {setup_us['resolvent']:.1f} us")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json({"rows": out, "matmul_us": mm, "one_iteration_solve_us": fixed,
                                 "setup_us": setup_us, "threads": args.threads,
                                 "check_every": every}))  # fmt: skip


if __name__ == "__main__":
    main()
