"""QAT fine-tuning solves: iterations, unconverged solves and diverged runs (prints, asserts nothing).

Fine-tunes a float checkpoint with STE QAT as ``monquant lowbit`` does (``finetune_method``: 3
epochs on a seeded ``--train`` sample subset, Adam 1e-3 decayed x0.1 for the last epoch, batch
128), with the model's solver at ``--tol`` and ``--max-iter`` (lowbit's 1e-4 and 2000), for every
bit-width, granularity and seed. Prints, per configuration, the mean iterations of the training
solves, the unconverged training and adjoint solves, the accuracy on the first 1000 fine-tuning
samples and the seconds, or the error of a run that diverged; then the totals. Uses only names
that older revisions have, so the same file measures another revision
(``PYTHONPATH=OTHER/src python benchmarks/qat_finetune.py ...``): issue 16's comparison of the step
that QAT training solves take.

    MONQUANT_DATA=... python benchmarks/qat_finetune.py --checkpoint FLOAT.safetensors
        [--bits 2 3 4] [--granularities per-tensor per-channel] [--seeds 0 1 2] [--json F]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from monquant.data import load_mnist, random_subset
from monquant.errors import MonquantError
from monquant.report import text_table
from monquant.storage.checkpoints import load_model
from monquant.storage.jsonio import dumps_json
from monquant.training.methods import QuantMethod, finetune_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a float monquant model checkpoint")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--granularities", nargs="+", default=["per-tensor", "per-channel"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=20_000, help="fine-tuning samples (lowbit's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    rows, out = [], []
    for bits in args.bits:
        for gran in args.granularities:
            for seed in args.seeds:
                x, y = random_subset(data.x_train, data.y_train, args.train, seed)  # lowbit's draw
                torch.manual_seed(seed)
                model = load_model(args.checkpoint).model
                solver = model.layer.solver
                solver.forward_config = replace(solver.forward_config, tol=args.tol, max_iter=args.max_iter)
                t0 = time.perf_counter()
                r: dict = {"bits": bits, "granularity": gran, "seed": seed}
                try:
                    _, hist = finetune_method(model, QuantMethod.default("ste", bits, gran), x, y,
                                              args.epochs, 1e-3, seed)  # fmt: skip
                    r.update(iterations=sum(h["train_mean_iterations"] for h in hist) / len(hist),
                             unconverged=sum(h["train_unconverged"] + h["backward_unconverged"]
                                             for h in hist),
                             accuracy=hist[-1]["test_accuracy"], error=None)  # fmt: skip
                except (MonquantError, torch.linalg.LinAlgError) as exc:  # a diverged run is a result
                    r.update(iterations=None, unconverged=None, accuracy=None, error=str(exc))
                r["seconds"] = time.perf_counter() - t0
                out.append(r)
                shown = [r["iterations"], r["unconverged"], r["accuracy"]]
                if r["error"] is not None:
                    shown = ["diverged", "", (r["error"].split(":")[0])[:40]]
                rows.append([bits, gran, seed, *shown, r["seconds"]])
                print(f"W{bits} {gran} seed {seed}: {shown} in {r['seconds']:.1f} s", flush=True)
    print(f"STE QAT fine-tuning of {args.checkpoint}: {args.epochs} epochs on {args.train} samples, "
          f"tol {args.tol:g}, cap {args.max_iter}, one thread each")  # fmt: skip
    print(text_table(["bits", "granularity", "seed", "mean it.", "unconverged", "accuracy", "seconds"], rows))
    done = [r for r in out if r["error"] is None]
    print(f"runs: {len(out)}, diverged: {len(out) - len(done)}; over the others: mean it. "
          f"{sum(r['iterations'] for r in done) / max(len(done), 1):.1f}, unconverged "
          f"{sum(r['unconverged'] for r in done)}; seconds in all {sum(r['seconds'] for r in out):.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(dumps_json({"checkpoint": args.checkpoint, "rows": out}))


if __name__ == "__main__":
    main()
