"""The circular-convolution operator's spectra from its Fourier blocks (prints, asserts nothing).

For ``c`` channels, an ``H x W`` image and a ``k x k`` kernel: seconds to compute margin(W),
``L = ||I - W||`` and ``||W||`` from the ``H W`` blocks of size ``c x c`` (the operator itself has
size ``c H W``; a dense eigendecomposition at c = 64, 28 x 28 would be of a 50,176 x 50,176 matrix).
For small sizes, the same quantities from the dense matrix (built by applying the operator to basis
vectors) and the largest difference. Then the seconds of the whole *proved* certificate
(:func:`monquant.certify_conv.certify_conv`: float bounds, the quantized kernel's bounds and
``||dW||``, at ``--bits`` per output channel). Medians of ``--repeats``; one thread by default.

    python benchmarks/conv_operator.py [--c 64] [--image 28 28] [--kernel 3] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monquant.operators.conv import CircularConvOperator
from monquant.report import text_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--c", type=int, default=64)
    p.add_argument("--image", type=int, nargs=2, default=[28, 28])
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the kernels go there")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for c, (H, W) in ((args.c, tuple(args.image)), (3, (6, 6)), (4, (8, 7))):
        K = 0.05 * torch.randn(c, c, args.kernel, args.kernel, generator=g, dtype=torch.float64)
        K = K.to(args.device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            st = CircularConvOperator(K, (H, W)).spectral_stats()  # blocks computed afresh
            times.append(time.perf_counter() - t0)
        diff = "-"
        if c * H * W <= 400:
            D = CircularConvOperator(K.cpu(), (H, W)).dense()
            S = torch.eye(D.shape[0], dtype=torch.float64) - D
            dense = (
                float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0]),
                float(torch.linalg.matrix_norm(S, 2)),
                float(torch.linalg.matrix_norm(D, 2)),
            )
            diff = max(abs(a - b) for a, b in zip((st.m, st.L, st.norm_W), dense, strict=True))
        rows.append([c, f"{H}x{W}", f"{args.kernel}x{args.kernel}", c * H * W,
                     statistics.median(times), st.m, st.L, diff])  # fmt: skip
    print(text_table(["c", "image", "kernel", "operator size", "seconds (median)", "margin", "L",
                      "max |Fourier - dense|"], rows))  # fmt: skip
    from monquant.certify_conv import certify_conv

    K = 0.05 * torch.randn(args.c, args.c, args.kernel, args.kernel, generator=g, dtype=torch.float64)
    K = K.to(args.device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cert = certify_conv(K, tuple(args.image), args.bits, "per-channel")
        times.append(time.perf_counter() - t0)
    print(f"proved certificate (c = {args.c}, {args.image[0]}x{args.image[1]}, {args.bits} bits "
          f"per channel): {statistics.median(times):.2f} s median, verdict {cert.verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
