"""The multi-tier certificate: its time at MNIST scale and its tightness against the dense matrix
(prints, asserts nothing).

For a random multi-tier W-K operator (channels ``--channels`` on 28 x 28, 14 x 14, 7 x 7, 3 x 3
factors): seconds for the float operator's proved side
(:func:`monquant.certify_multitier.multitier_float_bounds`: composite kernels, composition error,
block bounds) and for one certificate at each of ``--bits`` per output channel (the quantized
kernels' bounds and the proved ``||dW||``), medians of ``--repeats`` on one thread. Then, on small
operators where the dense matrix can be built (by applying the operator to basis vectors), the
proved ``||dW||`` against the dense ``||W~ - W||`` (their ratio is the price of combining block
norms) and the proved margin bound against the dense ``margin(W~)``.

    python benchmarks/multitier_certificate.py [--channels 8 16 32] [--bits 4 6 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monquant.certify_multitier import certify_multitier, multitier_float_bounds, quantize_multitier
from monquant.operators.matrix import margin
from monquant.operators.multitier import MultiTierWKOperator
from monquant.report import text_table


def operator(
    channels: list[int], image: tuple[int, int], seed: int, scale: float = 0.15
) -> MultiTierWKOperator:
    g = torch.Generator().manual_seed(seed)
    T = len(channels)

    def r(*s: int) -> torch.Tensor:
        return scale / (3 * max(s[0], 1) ** 0.5) * torch.randn(*s, generator=g)

    return MultiTierWKOperator([r(c, c, 3, 3) for c in channels],
                               [r(channels[i], channels[i + 1], 3, 3) for i in range(T - 1)],
                               [r(c, c, 3, 3) for c in channels], 0.3, image)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    op = operator(args.channels, (28, 28), 0)
    t_float = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fb = multitier_float_bounds(op)
        t_float.append(time.perf_counter() - t0)
    rows = [["float side", "", f"{statistics.median(t_float):.2f}", "", "", ""]]
    for b in args.bits:
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            c = certify_multitier(op, b, "per-channel", float_bounds=fb)
            ts.append(time.perf_counter() - t0)
        rows.append([f"{b} bits per channel", c.verdict, f"{statistics.median(ts):.2f}",
                     f"{c.dW_norm_upper:.4g}", f"{c.margin_quantized_lower:.4g}", c.tier])  # fmt: skip
    print(f"multi-tier operator, channels {args.channels} on 28x28/14x14/7x7 (size {op.size}), "
          f"one thread, medians of {args.repeats}: seconds")  # fmt: skip
    print(text_table(["what", "verdict", "seconds", "||dW|| <=", "margin(W~) >=", "tier"], rows))
    small = []
    for seed, ch in enumerate([(2, 3, 2), (3, 2, 4), (1, 4, 2)]):
        sop = operator(list(ch), (20, 20), seed + 1, scale=0.6)
        sfb = multitier_float_bounds(sop)
        D = sop.to(torch.float64).dense()
        for b in (4, 8):
            c = certify_multitier(sop, b, "per-channel", float_bounds=sfb)
            Dq = quantize_multitier(sfb.comp, b, "per-channel")[0].dense()
            dW = float(torch.linalg.matrix_norm(Dq - D, 2))
            small.append([str(ch), b, f"{c.dW_norm_upper:.4g}", f"{dW:.4g}", f"{c.dW_norm_upper / dW:.3f}",
                          f"{c.margin_quantized_lower:.4g}", f"{margin(Dq):.4g}", c.verdict])  # fmt: skip
    print("\nsmall operators (20x20/10x10/5x5), proved bounds against the dense matrix:")
    print(text_table(["channels", "bits", "||dW|| <=", "dense ||dW||", "ratio", "margin(W~) >=",
                      "dense margin(W~)", "verdict"], small))  # fmt: skip


if __name__ == "__main__":
    main()
