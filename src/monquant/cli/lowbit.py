"""``monquant lowbit``: the certified low-bit comparison (registered into :mod:`monquant.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monquant.cli.common import bits_arg, data_args, emit, executor_args, load_data, positive_int

__all__ = ["cmd_lowbit", "register"]

EPILOG_LOWBIT = """examples:
  monquant lowbit                                  # full comparison -> results/lowbit/
  monquant lowbit --quick --out results/lowbit-quick   # small CI-sized run (1-2 minutes)
  monquant lowbit --resume                         # skip configurations already finished
  monquant lowbit --resume --budget-minutes 25     # stop starting new ones after 25 minutes
  monquant lowbit --model runs/float/model.safetensors --seeds 0
  monquant lowbit --executor process --workers 2   # configurations in 2 worker processes
  monquant lowbit --executor ray --address auto    # on a running Ray cluster (pip install monquant[ray])
"""


def cmd_lowbit(args: argparse.Namespace) -> int:
    from monquant.experiments.lowbit_study.report import summary_rows
    from monquant.experiments.lowbit_study.study import run_lowbit
    from monquant.report import text_table

    options: dict[str, Any] = {"command": ["monquant", *sys.argv[1:]]}
    if args.budget_minutes is not None:
        options["budget_s"] = 60.0 * args.budget_minutes
    if args.train_limit is not None:
        options["train_limit"] = args.train_limit
    options.update(executor=args.executor, workers=args.workers, address=args.address,
                   worker_threads=args.threads if getattr(args, "threads_given", False) else None)
    from monquant.executors import ExecutorSpec

    ExecutorSpec(args.executor, args.workers, args.address)  # checked before any data loads
    data = load_data(args)
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    res = run_lowbit(
        Path(args.out),
        data,
        bits=args.bits,
        granularities=args.granularities,
        methods=args.methods,
        seeds=args.seeds,
        epochs=args.epochs,
        float_model=args.model,
        quick=args.quick,
        resume=args.resume,
        progress=not args.no_progress,
        echo=echo,
        **options,
    )
    h, rows = summary_rows(res["groups"])
    verdict = {True: "MET", False: "NOT MET", None: "not run"}
    targets = "\n".join(
        f"  [{verdict[t['met']]}] {t['target']}"
        + (f": {', '.join(t['met_by'])}" if t["met"] else "")
        for t in res["targets"]
    )
    missing = f"\n{len(res['not_run'])} stages not run (time budget): rerun with --resume" * bool(
        res["not_run"]
    )
    text = (
        f"{text_table(h, rows)}\n\ntargets:\n{targets}{missing}\n"
        f"report: {Path(args.out) / 'report.md'}\nresults: {Path(args.out) / 'results.json'}"
    )
    emit(
        args,
        {"out": args.out, "groups": res["groups"], "targets": res["targets"]},
        text,
    )
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``lowbit`` subcommand through ``cli.build_parser``'s ``add``."""
    from monquant.names import GRANULARITIES
    from monquant.names import QUANT_METHODS as KINDS

    p = add(
        "lowbit",
        cmd_lowbit,
        "how low can a MonDEQ go with certified convergence: PTQ, STE/margin-aware QAT, "
        "ProxQuant on W and on the factors, per-tensor/per-channel, mixed precision",
        EPILOG_LOWBIT,
    )
    p.add_argument("--out", default="results/lowbit", help="results folder")
    p.add_argument("--quick", action="store_true", help="small CI-sized run of the same pipeline")
    p.add_argument("--resume", action="store_true", help="skip configurations already finished")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="fine-tuning epochs (default 3)"
    )
    bits_arg(p, many=True, help_="weight bit-widths (default 2 3 4 6 8)")
    p.add_argument(
        "--granularities",
        nargs="+",
        choices=GRANULARITIES,
        default=None,
        help="granularities to compare (default: both)",
    )
    p.add_argument("--methods", nargs="+", choices=list(KINDS), default=None,
                   help="training methods to compare (default: all)")  # fmt: skip
    p.add_argument("--model", default=None, help="float checkpoint to use for every seed")
    p.add_argument("--train-limit", type=positive_int, default=None, help="fine-tuning samples")
    executor_args(p)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="start no new configuration after this many minutes (resume later)",
    )
    data_args(p)
