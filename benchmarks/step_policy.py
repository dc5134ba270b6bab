"""PR iterations under the two step policies, 1/L (``bound``) and 1/sqrt(m L) (``geometric``)
(prints, asserts nothing; issue 16).

Part 1: Winston-Kolter operators ``W = (1 - m) I - s A^T A + t (B - B^T)`` (n = 100, A and B
Gaussian / sqrt(n)) over a grid of margins ``m``, scales ``s`` of the symmetric part and ``t`` of
the skew part; a batch of 128 Gaussian injections, float64, exact m and L. Prints kappa = L/m, the
share of L that the symmetric part reaches (lmax(sym(I - W)) / L: 1 for a symmetric I - W) and the
PR iterations of each policy (a check at every iteration: exact counts). Part 2 (``--checkpoint``):
the same for trained models on MNIST test images. Both policies converge at every step; the
geometric one minimises the contraction factor when I - W is symmetric, 1/L the proved modulus.

PR converges at every step; ``--qat-bits B`` adds, per dense checkpoint, PR on its quantized
``W~ = Q_b(W)`` at ``1/L~``, at ``1/sqrt(m~ L~)`` from ``W~``'s own constants and at ``1/sqrt(m L)``
from the float ``W``'s (the step that QAT training solves take: rounding can take ``m~`` near 0).

    python benchmarks/step_policy.py [--tol 1e-6] [--checkpoint CKPT ... [--qat-bits B]] [--json F]
"""

from __future__ import annotations

import argparse
import math

import torch
from anderson import operator_and_injection  # the benchmarks' shared loader (same folder)

from monquant.operators import as_operator, spectral_stats, wk_weight
from monquant.report import text_table
from monquant.solvers import SolverConfig, solve
from monquant.storage.jsonio import dumps_json


def symmetric_share(W: torch.Tensor, L: float) -> float:
    S = torch.eye(W.shape[0], dtype=W.dtype) - W
    return float(torch.linalg.eigvalsh(0.5 * (S + S.T))[-1]) / L


def iterations(op, q: torch.Tensor, tol: float, stats) -> dict[str, int]:
    out = {}
    for policy in ("bound", "geometric"):
        cfg = SolverConfig(tol=tol, max_iter=20_000, check_every=1, step_policy=policy)
        r = solve(op, q, cfg, stats=stats)
        out[policy] = r.iterations if r.all_converged else -1  # -1: a sample did not converge
    return out


def quantized_rows(paths: list[str], x: torch.Tensor, bits: int, tol: float) -> list[dict]:
    """PR on each dense checkpoint's per-tensor ``W~ = Q_b(W)`` (with the float injection
    ``U x + b``) at three steps: ``1/L~`` and ``1/sqrt(m~ L~)`` from ``W~``'s exact constants, and
    ``1/sqrt(m L)`` from the float ``W``'s, the cap on the step that QAT training solves take;
    beside the margin ``m~``, the smallest real part of the eigenvalues of ``I - W~``. Prints a
    table."""
    from monquant.quant.uniform import quantize
    from monquant.storage.checkpoints import load_model

    rows, out = [], []
    for path in paths:
        layer = load_model(path).model.eval().layer
        W = layer.reference_weight()
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            print(f"{path}: not a dense model, skipped")
            continue
        Wq = quantize(W, bits).dequantized()
        with torch.no_grad():
            q = layer.injection(x)
        st, st_q = spectral_stats(W), spectral_stats(Wq)
        eye = torch.eye(Wq.shape[0], dtype=torch.float64)
        re_min = float(torch.linalg.eigvals(eye - Wq.double()).real.min())  # what PR's speed follows
        steps = {"1/L~": 1.0 / st_q.L, "1/sqrt(m L)": 1.0 / math.sqrt(st.m * st.L),
                 "1/sqrt(m~ L~)": 1.0 / math.sqrt(st_q.m * st_q.L) if st_q.m > 0 else math.nan}  # fmt: skip
        its = {}
        for name, a in steps.items():
            if math.isfinite(a):
                r = solve(Wq, q, SolverConfig(tol=tol, max_iter=20_000, check_every=1, step=a))
                its[name] = r.iterations if r.all_converged else -1
            else:
                its[name] = -1  # no positive margin: no geometric step of its own
        rows.append([path, st.m, st_q.m, re_min, st_q.kappa, *(steps[k] * st_q.L for k in steps),
                     *(its[k] for k in steps)])  # fmt: skip
        out.append({"checkpoint": path, "bits": bits, "m": st.m, "m_quantized": st_q.m,
                    "min_real_eigenvalue_quantized": re_min, "steps": steps, "iterations": its})  # fmt: skip
    print(f"{bits}-bit W~ = Q_b(W) per tensor, {x.shape[0]} MNIST test images, tol {tol:g}, PR, a check "
          "every iteration (-1: not converged, or no step)")  # fmt: skip
    print(text_table(["checkpoint", "m", "m~", "min Re eig(I - W~)", "kappa~", "L~ a: 1/L~",
                      "1/sqrt(m L)", "1/sqrt(m~ L~)", "it. 1/L~", "it. 1/sqrt(m L)",
                      "it. 1/sqrt(m~ L~)"], rows))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--checkpoint", nargs="*", default=[])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--qat-bits", type=int, default=None,
                   help="also solve each dense checkpoint's Q_b(W) at the steps of its own and of "
                   "the float W's constants (what QAT training solves step from)")  # fmt: skip
    p.add_argument("--qat-tol", type=float, default=1e-5, help="tolerance of those solves (the paper's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, rows, out = args.n, [], []
    g = torch.Generator().manual_seed(0)
    A0 = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B0 = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    q = torch.randn(128, n, generator=g, dtype=torch.float64)
    for m in (0.5, 0.05):
        for s in (1.0, 3.0):
            for t in (0.0, 0.3, 1.0, 3.0):
                W = wk_weight(s * A0, t * B0, m)
                st = spectral_stats(W)
                its = iterations(W, q, args.tol, st)
                share = symmetric_share(W, st.L)
                rows.append([m, s, t, st.kappa, share, its["bound"], its["geometric"],
                             its["geometric"] / its["bound"]])  # fmt: skip
                out.append({"m": m, "sym_scale": s, "skew_scale": t, "kappa": st.kappa,
                            "symmetric_share": share, **its})  # fmt: skip
    print(f"n={n}, 128 Gaussian injections, float64, tol {args.tol:g}, PR, a check every iteration")
    print(text_table(["m", "s (sym.)", "t (skew)", "kappa", "lmax(sym)/L", "it. 1/L", "it. 1/sqrt(mL)",
                      "ratio"], rows))  # fmt: skip
    if args.checkpoint:
        from monquant.data import load_mnist
        from monquant.storage.checkpoints import load_model

        x = load_mnist().x_test[: args.images]
        crow = []
        for path in args.checkpoint:
            op, qx = operator_and_injection(load_model(path).model.eval(), x)
            st = as_operator(op).detach().to(dtype=qx.dtype).spectral_stats()
            its = iterations(op, qx, 1e-4, st)
            crow.append([path, st.kappa, its["bound"], its["geometric"], its["geometric"] / its["bound"]])
            out.append({"checkpoint": path, "kappa": st.kappa, **its})
        print(f"trained models, {args.images} MNIST test images, tol 1e-4")
        print(text_table(["checkpoint", "kappa", "it. 1/L", "it. 1/sqrt(mL)", "ratio"], crow))
        if args.qat_bits:
            out += quantized_rows(args.checkpoint, x, args.qat_bits, args.qat_tol)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json({"tol": args.tol, "rows": out}))


if __name__ == "__main__":
    main()
