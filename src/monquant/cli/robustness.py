"""``monquant robustness``: certified prediction agreement and robustness (issue 15)."""

from __future__ import annotations

import argparse
from pathlib import Path

from monquant.cli.common import (
    AddCommand,
    bits_arg,
    data_args,
    emit,
    load_data,
    positive_float,
    positive_int,
    quant_parts,
    renamed_flag,
    require_checkpoint,
    step_rule_arg,
)

__all__ = ["cmd_robustness", "register"]

EPILOG_ROBUSTNESS = """examples:
  monquant robustness runs/float/model.safetensors --bits 4 8
  monquant robustness runs/float/model.safetensors --bits 4 --eps 0.1 0.5 --pgd-samples 50 --json
  monquant robustness runs/float/model.safetensors --out results/robustness \\
      --bits 4 6 8 --granularities per-tensor per-channel \\
      --methods ptq ste margin proxquant-w proxquant-factors --robust-eps 0.25
  monquant robustness runs/float/model.safetensors --quick --out /tmp/rob   # CI-sized

eps is an L2 radius in the model's input space (normalised pixels for MNIST). Trained methods
fine-tune the checkpoint at --train-bits (the protocol of `monquant lowbit`); --robust-eps adds
margin-aware QAT with the Lipschitz-margin loss. With --out: report.md, results.json, a figure,
and one resumable stage per configuration (--resume).
"""


def cmd_robustness(args: argparse.Namespace) -> int:
    import sys

    from monquant.experiments.robustness.report import robustness_table
    from monquant.experiments.robustness.study import RobustnessConfig, run_robustness

    kw = dict(
        out=Path(args.out) if args.out else None,
        bits=tuple(args.bits) if args.bits else None,
        granularities=tuple(args.granularities) if args.granularities else None,
        quantize=args.quantize,
        step_rule=args.step_rule,
        methods=tuple(args.methods) if args.methods else None,
        train_bits=tuple(args.train_bits) if args.train_bits else None,
        robust_eps=args.robust_eps,
        eps=tuple(args.eps) if args.eps else None,
        test_limit=args.test_limit,
        pgd_samples=args.pgd_samples,
        pgd_steps=args.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        epochs=args.epochs,
        train_limit=args.train_limit,
        resume=args.resume,
        progress=not args.no_progress,
        command=["monquant", *sys.argv[1:]],
    )
    ckpt = Path(args.checkpoint)
    cfg = (RobustnessConfig.quick_config(ckpt, **kw) if args.quick
           else RobustnessConfig(ckpt, **{k: v for k, v in kw.items() if v is not None}))  # fmt: skip
    require_checkpoint(args.checkpoint, "robustness")  # verified before any data loads
    data = load_data(args)
    res = run_robustness(cfg, data, echo=None)
    text = robustness_table(res)
    if cfg.out is not None:
        text += f"\nreport: {cfg.out / 'report.md'}\nresults: {cfg.out / 'results.json'}"
    emit(args, {"checkpoint": args.checkpoint, "rows": res["rows"],
                "contradictions": res["contradictions"]}, text)  # fmt: skip
    if res["contradictions"]:
        from monquant.verified import VerificationError

        raise VerificationError("a certificate was contradicted by a measured prediction or an "
                                "attack: " + "; ".join(res["contradictions"]))  # fmt: skip
    return 0


def register(add: AddCommand) -> None:
    """Add ``robustness`` to the main parser."""
    from monquant.names import GRANULARITIES, QUANT_METHODS

    r = add("robustness", cmd_robustness, "certified prediction agreement and robustness of "
            "quantized models, against PGD", EPILOG_ROBUSTNESS)  # fmt: skip
    r.add_argument("checkpoint", help="monquant float model checkpoint")
    r.add_argument("--out", default=None, help="results folder (report, figure, stages)")
    r.add_argument("--quick", action="store_true", help="small CI-sized run of the same pipeline")
    r.add_argument("--resume", action="store_true", help="skip configurations already finished")
    bits_arg(r, many=True, help_="bit-widths of W~ for PTQ (default 4 8)")
    r.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=None,
                   help="granularities to compare (default per-tensor)")  # fmt: skip
    renamed_flag(r, "--granularity", "--granularities", "granularities", nargs="+",
                 choices=GRANULARITIES)  # fmt: skip
    r.add_argument("--quantize", type=quant_parts, default=("W",),
                   help="PTQ: comma list of W,U,b to quantize (default W)")  # fmt: skip
    step_rule_arg(r)
    r.add_argument("--methods", nargs="+", choices=list(QUANT_METHODS), default=None,
                   help="configurations: ptq, and trained methods fine-tuned from the checkpoint "
                   "(default ptq)")  # fmt: skip
    bits_arg(r, many=True, flag="--train-bits", help_="bit-widths of the trained methods (default 4)")
    r.add_argument("--robust-eps", type=positive_float, default=None, metavar="EPS",
                   help="add margin-aware QAT with the Lipschitz-margin loss at radius EPS")  # fmt: skip
    r.add_argument("--epochs", type=positive_int, default=None, help="fine-tuning epochs (default 3)")
    r.add_argument("--train-limit", type=positive_int, default=None, metavar="K",
                   help="fine-tuning samples (default 20000, drawn at random)")  # fmt: skip
    r.add_argument("--eps", type=positive_float, nargs="+", default=None,
                   help="L2 radii in normalised input space (default 0.1 0.25 0.5 1)")  # fmt: skip
    r.add_argument("--test-limit", type=positive_int, default=None, metavar="K",
                   help="the first K test images (default 1000)")  # fmt: skip
    r.add_argument("--pgd-samples", type=positive_int, default=None, metavar="K",
                   help="attack the first K of them (default 100)")  # fmt: skip
    r.add_argument("--pgd-steps", type=positive_int, default=None, help="PGD steps per restart (default 20)")
    r.add_argument("--pgd-restarts", type=positive_int, default=None, help="PGD restarts (default 2)")
    data_args(r)
