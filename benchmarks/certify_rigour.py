"""Certificates that are proofs: adversarial boundary cases, the exact oracle, cost (issue 10).

Prints four tables (asserts nothing; the tests assert):

1. boundary families (``monquant.testing``: margin(W~) exactly 0, and m = ||dW|| exactly for the
   Weyl family), n = 2..256, plain and permuted + sign-flipped: how many the proved certificate
   certifies (must be 0) against the plain float64 decision it replaced (``m > 0``, ``||dW|| < m``,
   ``margin(W~) > 0`` on computed values);
2. the exact rational oracle on small dyadic instances near the boundary: agreement, undecided;
3. random operators away from the boundary: verdict changes, largest loss of margin;
4. time of ``certify`` against the plain float64 computation, median of repeats, per n.

    python benchmarks/certify_rigour.py [--oracle 10000] [--sizes 50 100 200 400 800] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from monquant.certify import certify
from monquant.operators import spectral_norm, spectral_stats, wk_weight
from monquant.quant.uniform import quantize
from monquant.report import text_table
from monquant.storage.jsonio import dumps_json
from monquant.testing import (
    exact_boundary_case,
    exact_margin_sign,
    shifted_singular_case,
    transform_case,
    weyl_boundary_case,
)
from monquant.verified import margin_bounds

SIZES = (2, 3, 4, 5, 8, 16, 32, 64, 128, 256)


def plain_float_certificate(W: torch.Tensor, bits: int) -> dict[str, bool]:
    """The decision monquant made before proved bounds: raw float64 comparisons (the baseline)."""
    Wt = quantize(W, bits).dequantized().to(torch.float64)
    st, st_q = spectral_stats(W), spectral_stats(Wt)
    dW = spectral_norm(Wt - W)
    return {"weyl": st.m > 0 and dW < st.m, "exact": st_q.m > 0}


def boundary_table(seeds: int) -> list[dict]:
    rows = []
    for family in (exact_boundary_case, weyl_boundary_case):
        for n in SIZES:
            cases = []
            for s in range(seeds):
                base = family(n, seed=s)
                cases += [base, transform_case(base, s + 101)]
            proved = sum(certify(c.W, c.bits).certified_exact for c in cases)
            plain = [plain_float_certificate(c.W, c.bits) for c in cases]
            rows.append(
                {
                    "family": family.__name__,
                    "n": n + 1,
                    "cases": len(cases),
                    "certified_proved": proved,
                    "certified_plain_weyl": sum(p["weyl"] for p in plain),
                    "certified_plain_exact": sum(p["exact"] for p in plain),
                }
            )
    return rows


def oracle_table(count: int) -> dict:
    g = torch.Generator().manual_seed(7)
    out = {"instances": count, "certified": 0, "refuted": 0, "undecided": 0, "oracle_zero": 0,
           "wrong": 0, "plain_wrong": 0, "undecided_nonzero": 0}  # fmt: skip
    for i in range(count):
        n = 1 + i % 6
        j = int(torch.randint(0, 61, (1,), generator=g))
        sign = 1 if int(torch.randint(0, 2, (1,), generator=g)) else -1
        W = shifted_singular_case(n, j if j > 0 else None, sign, seed=i)
        truth = exact_margin_sign(W)
        lo, hi, computed = margin_bounds(W)
        verdict = 1 if lo > 0 else -1 if hi < 0 else 0
        out["oracle_zero"] += truth == 0
        key = {1: "certified", -1: "refuted", 0: "undecided"}[verdict]
        out[key] += 1
        out["wrong"] += verdict != 0 and verdict != truth
        out["undecided_nonzero"] += verdict == 0 and truth != 0
        out["plain_wrong"] += (computed > 0) != (truth > 0)
    return out


def random_table(count: int) -> dict:
    changed, loss_abs, loss_rel = 0, 0.0, 0.0
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(5, 120, (1,), generator=g))
        A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        W = wk_weight(A, B, float(torch.rand(1, generator=g)) * 0.5 + 0.01)
        for bits in (3, 5, 8):
            c = certify(W, bits)
            p = plain_float_certificate(W, bits)
            changed += (c.certified_weyl != p["weyl"]) + (c.certified_exact != p["exact"])
            loss_abs = max(loss_abs, c.margin - c.margin_lower)
            loss_rel = max(loss_rel, (c.margin - c.margin_lower) / c.margin)
    return {"operators": count, "certificates": 3 * count, "verdict_changes": changed,
            "max_margin_loss_abs": loss_abs, "max_margin_loss_rel": loss_rel}  # fmt: skip


def timing_table(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        W = wk_weight(A, B, 0.2)
        t_new, t_old = [], []
        for _ in range(repeats):  # interleaved pairs: the machine is shared and noisy
            t0 = time.perf_counter()
            certify(W, 6)
            t_new.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_float_certificate(W, 6)
            t_old.append(time.perf_counter() - t0)
        mn, mo = statistics.median(t_new), statistics.median(t_old)
        rows.append({"n": n, "proved_s": mn, "plain_s": mo, "ratio": mn / mo})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oracle", type=int, default=10_000, help="oracle instances (default 10000)")
    p.add_argument("--random", type=int, default=100, help="random operators (default 100)")
    p.add_argument("--seeds", type=int, default=3, help="boundary seeds per size (default 3)")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (default 5)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = {"boundary": boundary_table(a.seeds), "oracle": oracle_table(a.oracle),
           "random": random_table(a.random), "timing": timing_table(a.sizes, a.repeats)}  # fmt: skip
    b = res["boundary"]
    print("1. boundary families: certified (proved) vs the plain float64 decision it replaced")
    print(text_table(["family", "n", "cases", "proved", "plain Weyl", "plain exact"],
                     [[r["family"], r["n"], r["cases"], r["certified_proved"],
                       r["certified_plain_weyl"], r["certified_plain_exact"]] for r in b]))  # fmt: skip
    o = res["oracle"]
    print(f"\n2. exact oracle, {o['instances']} dyadic instances (n <= 6, margin 0 or +-2^-j): "
          f"certified {o['certified']}, refuted {o['refuted']}, undecided {o['undecided']} "
          f"({o['oracle_zero']} exactly singular, {o['undecided_nonzero']} non-zero margins "
          f"within rounding of 0); wrong verdicts {o['wrong']} (plain float64 sign of the "
          f"computed eigenvalue wrong on {o['plain_wrong']})")  # fmt: skip
    r = res["random"]
    print(f"\n3. random operators: {r['certificates']} certificates, verdict changes "
          f"{r['verdict_changes']}, largest loss of margin {r['max_margin_loss_abs']:.3g} "
          f"(relative {r['max_margin_loss_rel']:.3g})")  # fmt: skip
    print("\n4. time per certify(W, 6), median of interleaved repeats, one thread")
    print(text_table(["n", "proved (s)", "plain float64 (s)", "ratio"],
                     [[t["n"], t["proved_s"], t["plain_s"], t["ratio"]] for t in res["timing"]]))  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(dumps_json(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
