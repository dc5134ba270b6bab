"""What STE fake quantization costs a QAT training step (prints, asserts nothing; issue 16).

Times ``monquant.quant.uniform.fake_quant`` on the tensors that the paper's QAT script
fake-quantizes every step (``W`` 100 x 100, ``U`` 100 x 784, ``b`` 100; ``train --qat-parts W U b``):
the forward pass alone (without autograd) and the forward pass with its backward, as the medians
of ``--rounds`` rounds of ``--calls`` calls, in microseconds per step (all three tensors). Uses
only public names, so the same file times another revision of the library
(``PYTHONPATH=OTHER/src python benchmarks/fake_quant.py``) for an A/B comparison.

    python benchmarks/fake_quant.py [--bits 4] [--calls 200] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monquant.quant.uniform import fake_quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = {"W": (100, 100), "U": (100, 784), "b": (100,)}
    leaves = {k: (0.1 * torch.randn(s, generator=g)).requires_grad_(True) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

    def forward() -> None:
        with torch.no_grad():
            for t in leaves.values():
                fake_quant(t, args.bits)

    def with_backward() -> None:
        outs = [fake_quant(t, args.bits) for t in leaves.values()]
        torch.autograd.backward(outs, [grads[k] for k in leaves])

    rows = []
    for name, f in (("forward", forward), ("forward + backward", with_backward)):
        f()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
            times.append((time.perf_counter() - t0) / args.calls * 1e6)
        rows.append((name, statistics.median(times)))
    print(f"fake_quant of W, U, b at {args.bits} bits, threads {torch.get_num_threads()} "
          f"(medians of {args.rounds} rounds of {args.calls} steps)")  # fmt: skip
    for name, us in rows:
        print(f"{name:20s} {us:8.1f} us per step")


if __name__ == "__main__":
    main()
