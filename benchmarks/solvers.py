"""Solver benchmark: iterations and milliseconds to relative residual 1e-6 (prints, asserts nothing).

A 100-unit MonDEQ with condition number kappa = L/m about 8, batch 128. FB at its certified step
m/L^2 and at alpha = 1 (uncertified unless 1 < 2m/L^2), PR and DR at 1/L, in float32 and float64.
Target (issue 2): PR needs at most a third of FB's iterations at FB's certified step. The
``Anderson(M)`` rows run the same method with safeguarded Anderson acceleration (issue 16): fewer
iterations, each dearer (the least-squares mix), so the milliseconds decide.

    python benchmarks/solvers.py [--repeats 5] [--kappa 8] [--anderson 5] [--json out.json]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from monquant.operators import spectral_stats, wk_weight
from monquant.report import text_table
from monquant.solvers import SolverConfig, solve
from monquant.storage.jsonio import dumps_json


def operator_with_kappa(n: int, kappa: float, m: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A Winston-Kolter ``W`` whose ``L/m`` is ``kappa`` (bisection on the scale of A and B)."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B0 = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    lo, hi = 0.0, 10.0
    for _ in range(60):
        s = 0.5 * (lo + hi)
        st = spectral_stats(wk_weight(s * A0, s * B0, m))
        lo, hi = (s, hi) if st.kappa < kappa else (lo, s)
    return wk_weight(lo * A0, lo * B0, m)


def bench(W, q, cfg: SolverConfig, repeats: int) -> dict:
    r = solve(W, q, cfg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = solve(W, q, cfg)
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "iterations": r.iterations,
        "converged": int(r.converged.sum()),
        "batch": q.shape[0],
        "ms_median": 1e3 * times[len(times) // 2],
        "ms_per_iteration": 1e3 * times[len(times) // 2] / max(r.iterations, 1),
        "step": r.step,
        "modulus": r.modulus,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--kappa", type=float, default=8.0)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--anderson", type=int, default=5, help="memory of the accelerated rows")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the operator and batch go there)")
    args = p.parse_args()
    dev = torch.device(args.device)
    W64 = operator_with_kappa(args.n, args.kappa)
    st = spectral_stats(W64)
    q64 = torch.randn(
        args.batch, args.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    rows, out = [], []
    for dtype in (torch.float32, torch.float64):
        W, q = W64.to(dtype=dtype, device=dev), q64.to(dtype=dtype, device=dev)
        results = {}
        for name, method, step, aa in (
            ("FB a=m/L^2", "fb", None, 0),
            (f"FB a=m/L^2 Anderson({args.anderson})", "fb", None, args.anderson),
            ("FB a=1", "fb", 1.0, 0),
            ("PR a=1/L", "pr", None, 0),
            (f"PR a=1/L Anderson({args.anderson})", "pr", None, args.anderson),
            ("DR a=1/L", "dr", None, 0),
            (f"DR a=1/L Anderson({args.anderson})", "dr", None, args.anderson),
        ):
            cfg = SolverConfig(method=method, step=step, tol=args.tol, max_iter=20_000, anderson=aa,
                               check_every=1)  # exact iteration counts
            res = bench(W, q, cfg, args.repeats)
            results[name] = res
            conv = f"{res['converged']}/{res['batch']}"
            rows.append(
                [
                    str(dtype).replace("torch.", ""),
                    name,
                    res["iterations"],
                    conv,
                    res["ms_median"],
                    res["ms_per_iteration"],
                    res["modulus"],
                ]
            )
            out.append({"dtype": str(dtype), "solver": name, **res})
        ratio = results["PR a=1/L"]["iterations"] / results["FB a=m/L^2"]["iterations"]
        rows.append(
            [
                str(dtype).replace("torch.", ""),
                "ratio PR/FB(m/L^2) iterations",
                ratio,
                "target <= 0.333",
                "met" if ratio <= 1 / 3 else "MISSED",
                "",
                "",
            ]
        )
    print(
        f"n={args.n} batch={args.batch} m={st.m:.4f} L={st.L:.4f} kappa={st.kappa:.3f} "
        f"tol={args.tol:g} threads={torch.get_num_threads()}"
    )
    print(
        text_table(["dtype", "solver", "iterations", "converged", "ms", "ms/iter", "modulus"], rows)
    )
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json({"stats": st.as_dict(), "rows": out}))


if __name__ == "__main__":
    main()
