"""Certificate speed against the paper's computation of the same quantities (prints ratios).

For each n, a Winston-Kolter ``W`` (margin 0.3) is certified at ``--bits`` with the float
operator's bounds computed once (as ``monquant certify`` does for a sweep). The baseline computes
what the paper's code computes per bit-width, the way it computes it: ``||W - Q_b(W)||_2`` and
``||I - Q_b(W)||_2`` by ``torch.linalg.matrix_norm(., 2)`` (singular values) and
``lmin(sym(I - Q_b(W)))`` by ``eigvalsh``; the float ``m`` and ``L`` once. monquant computes the
same three quantities as *proved* bounds (a Cholesky factorization verifies each) plus the
certificate's other fields. Interleaved repeats, one thread each; medians and the ratio
monquant / baseline (< 1: monquant is faster). Asserts nothing.

    python benchmarks/certify_speed.py [--n 100 200 400 800 1600 3200] [--repeats 3] [--breakdown]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monquant.certify import certify
from monquant.operators import wk_weight
from monquant.quant.uniform import quantize
from monquant.report import text_table
from monquant.storage.jsonio import dumps_json
from monquant.verified import quantized_bounds, spectral_bounds


def operator(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / (2 * n**0.5)
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / (2 * n**0.5)
    return wk_weight(A, B, 0.3)


def paper_float(W: torch.Tensor) -> tuple[float, float]:
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    S = eye - W
    return float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0]), float(torch.linalg.matrix_norm(S, 2))


def paper_bits(W: torch.Tensor, bits: int) -> tuple[float, float, float]:
    Wq = quantize(W, bits).dequantized()
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    S = eye - Wq
    dW = float(torch.linalg.matrix_norm(W - Wq, 2))
    return dW, float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0]), float(torch.linalg.matrix_norm(S, 2))


def breakdown(W: torch.Tensor, bits: int, repeats: int = 50) -> dict[str, float]:
    """Median milliseconds, per bit-width, of monquant's proved bounds of ``Q_b(W)`` beside ``W``
    (:func:`quantized_bounds`), of the one batched ``eigvalsh`` of its three symmetric matrices
    (``sym(I - W~)`` and the Gram matrices of ``I - W~`` and ``W~ - W``) that places their shifts,
    and of the paper's computation (two SVDs and one ``eigvalsh``)."""
    Wq = quantize(W, bits).dequantized()
    S = torch.eye(W.shape[0], dtype=W.dtype) - Wq
    D = Wq - W
    mats = torch.stack([0.5 * (S + S.T), S.T @ S, D.T @ D])

    def med(fn) -> float:
        for _ in range(5):
            fn()
        return statistics.median(timed(fn) for _ in range(repeats)) * 1e3

    return {"monquant": med(lambda: quantized_bounds(Wq, W)),
            "its eigvalsh": med(lambda: torch.linalg.eigvalsh(mats)),
            "paper": med(lambda: paper_bits(W, bits))}  # fmt: skip


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100, 200, 400, 800, 1600, 3200])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--breakdown", action="store_true",
                   help="also time one bit-width's parts (monquant's eigvalsh against the rest)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, out = [], []
    for n in args.n:
        W = operator(n)
        ours, base = [], []
        for _ in range(args.repeats):  # interleaved: A B A B ...
            def mine(W: torch.Tensor = W) -> None:
                st = spectral_bounds(W)
                for b in args.bits:
                    certify(W, b, float_bounds=st)

            def paper(W: torch.Tensor = W) -> None:
                paper_float(W)
                for b in args.bits:
                    paper_bits(W, b)

            ours.append(timed(mine))
            base.append(timed(paper))
        a, b = statistics.median(ours), statistics.median(base)
        certs = [certify(W, bb) for bb in args.bits]
        rows.append([n, len(args.bits), a, b, a / b, " ".join(c.verdict[:4] for c in certs)])
        out.append({"n": n, "monquant_s": a, "paper_s": b, "ratio": a / b})
        print(f"n={n}: monquant {a:.3f} s, paper's computation {b:.3f} s, ratio {a / b:.2f}",
              flush=True)  # fmt: skip
    print(text_table(["n", "bit-widths", "monquant s (median)", "paper's computation s",
                      "ratio", "verdicts"], rows))  # fmt: skip
    if args.breakdown:
        parts = []
        for n in args.n:
            d = breakdown(operator(n), args.bits[-1])
            parts.append([n, d["monquant"], d["its eigvalsh"], d["monquant"] - d["its eigvalsh"], d["paper"]])
        print(f"per bit-width ({args.bits[-1]} bits), medians in ms:")
        print(text_table(["n", "monquant", "its eigvalsh (estimates)", "the rest (proofs, batching)",
                          "paper (2 SVDs + eigvalsh)"], parts))  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json({"threads": args.threads, "bits": args.bits, "rows": out}))


if __name__ == "__main__":
    main()
