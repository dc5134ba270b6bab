"""Import the source paper's MNIST checkpoint and certify it at every bit-width.

    python examples/paper_checkpoint.py mnist_mondeq_float.pt [--bits 3 4 5 6 8]

The paper's code (github JLi-Projects/mondeq-quant) saves its float model with ``torch.save``;
``import_checkpoint`` reads it with ``torch.load(weights_only=True)`` only (never unpickling code),
checks every key and shape, and returns a monquant model. ``certify_model`` then proves, from the
weights alone, at which bit-widths the quantized operator is still monotone. The command line does
the same: ``monquant import mondeq-quant SRC --out M.safetensors`` then ``monquant certify M ...``.
"""

from __future__ import annotations

import argparse

import monquant
from monquant.storage.foreign import import_checkpoint


def main(argv: list[str] | None = None) -> dict[int, str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the paper's mnist_mondeq_float.pt")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    args = p.parse_args(argv)

    imported = import_checkpoint("mondeq-quant", args.checkpoint)
    for note in imported.notes:
        print(f"note: {note}")
    model = imported.model
    verdicts = {}
    for b in args.bits:
        cert = monquant.certify_model(model, monquant.QuantConfig(bits=b))
        c = cert.layers["layer"]
        print(f"{b:2d} bits: {cert.verdict:10s} tier {c.tier:8s} ||dW||/m {c.dW_over_m:.3g}  "
              f"margin(W~) >= {c.margin_quantized_lower:+.4g}")  # fmt: skip
        verdicts[b] = cert.verdict
    print(monquant.min_certified_bits(model))
    return verdicts


if __name__ == "__main__":
    main()
