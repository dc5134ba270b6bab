"""Does ``torch.compile`` pay for the PR iteration? (prints, asserts nothing; issue 16)

Runs blocks of ``--unroll`` Peaceman-Rachford iterations of the library's own splitting map
(:class:`monquant.solvers.SplittingMap`, the dense path: one ``addmm``, one ``relu``, one ``lerp``
per iteration) followed by the residual terms of the stopping test, eagerly and compiled with
``torch.compile`` (inductor, static shapes), on a ``--batch x n`` state. Prints microseconds per
iteration for both, the time of the iteration's one ``addmm`` alone (the arithmetic bound), the
compile time, and the ratios, medians of ``--repeats`` timing rounds.

    python benchmarks/pr_compile.py [--n 100] [--batch 128] [--unroll 8] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from monquant.operators import wk_weight
from monquant.report import text_table
from monquant.solvers import SplittingMap


def per_iteration_us(
    f: Callable[[], object], iterations: int, calls: int, repeats: int, sync,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median over ``repeats`` rounds of ``clock`` microseconds per iteration of ``f`` (which runs
    ``iterations`` iterations per call), after a warm-up (also used by ``solve_loop.py``)."""
    for _ in range(10):
        f()
    sync()
    rounds = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            f()
        sync()
        rounds.append((clock() - t0) / calls / iterations * 1e6)
    return statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--unroll", type=int, default=8)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n = args.n
    W = wk_weight(
        torch.randn(n, n, generator=g) / n**0.5, torch.randn(n, n, generator=g) / n**0.5, 0.5
    )
    W = W.to(dev)
    q = torch.randn(args.batch, n, generator=g).to(dev)
    it = SplittingMap("pr", W, q, 0.3, torch.relu)
    s0 = torch.zeros_like(q)
    x0 = it.start(s0)
    z0, y0 = it.read(s0, x0)

    def block(s: torch.Tensor, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor):
        z_prev = z
        for _ in range(args.unroll):
            z_prev = z
            s, x = it.advance(s, x, z, y)
            z, y = it.read(s, x)
        return s, x, z, (z - z_prev).square().sum(1), z.square().sum(1)

    with torch.no_grad():
        eager = per_iteration_us(
            lambda: block(s0, x0, z0, y0), args.unroll, args.calls, args.repeats, sync
        )
        t0 = time.perf_counter()
        compiled = torch.compile(block, dynamic=False)
        compiled(s0, x0, z0, y0)
        sync()
        compile_s = time.perf_counter() - t0
        fast = per_iteration_us(
            lambda: compiled(s0, x0, z0, y0), args.unroll, args.calls, args.repeats, sync
        )
        K, c = it.K, it.c
        mm = per_iteration_us(
            lambda: torch.addmm(c, s0, K), 1, args.calls * args.unroll, args.repeats, sync
        )
    print(f"n={n} batch={args.batch} unroll={args.unroll} threads={torch.get_num_threads()} "
          f"device={dev} (median of {args.repeats})")  # fmt: skip
    print(text_table(["variant", "us / iteration", "/ eager", "/ addmm alone"], [
        ["eager", eager, 1.0, eager / mm],
        ["torch.compile", fast, fast / eager, fast / mm],
        ["addmm alone", mm, mm / eager, 1.0],
    ]))  # fmt: skip
    print(f"compile time: {compile_s:.1f} s (paid once per shape and process)")


if __name__ == "__main__":
    main()
