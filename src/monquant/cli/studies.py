"""``monquant reproduce`` and ``ste-recovery``: the paper's and the STE paper's studies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from monquant.cli.common import (
    AddCommand,
    data_args,
    emit,
    executor_args,
    load_data,
    positive_float,
    positive_int,
    renamed_flag,
)

__all__ = ["cmd_reproduce", "cmd_ste_recovery", "register"]

EPILOG_REPRODUCE = """examples:
  monquant reproduce                              # full paper setup -> results/paper/
  monquant reproduce --quick --out results/quick  # same pipeline, small (a few minutes)
  monquant reproduce --resume                     # skip stages finished by an earlier run
  monquant reproduce --model runs/float/model.safetensors
  monquant import mondeq-quant mnist_mondeq_float.pt --out paper.safetensors
  monquant reproduce --model paper.safetensors --out results/paper-checkpoint
  monquant reproduce --setup fast --out results/fast   # monquant's earlier, faster defaults
  monquant reproduce --executor process --workers 2    # QAT trainings and extra seeds in parallel
"""


def cmd_reproduce(args: argparse.Namespace) -> int:
    from monquant.experiments.paper.reproduce import ReproduceConfig, run_reproduce

    kw: dict[str, Any] = dict(
        out=Path(args.out),
        model=Path(args.model) if args.model else None,
        setup=args.setup,
        resume=args.resume,
        progress=not args.no_progress,
        command=["monquant", *sys.argv[1:]],
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        worker_threads=args.threads if getattr(args, "threads_given", False) else None,
    )
    from monquant.executors import ExecutorSpec

    ExecutorSpec(args.executor, args.workers, args.address)  # checked before any data loads
    if args.seed is not None:
        kw["seed"] = args.seed
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.margin_init is not None:
        kw["margin_init"] = args.margin_init
    cfg = ReproduceConfig.quick_config(**kw) if args.quick else ReproduceConfig(**kw)
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    # no reference kept here: run_reproduce lets the training images go after the trainings
    res = run_reproduce(cfg, load_data(args), echo=echo)
    verdicts = "\n".join(f"  [{c['verdict']}] {c['claim']}" for c in res["claims"])
    text = (
        f"report: {Path(args.out) / 'report.md'}\nresults: {Path(args.out) / 'results.json'}\n"
        f"wall time: {res['wall_seconds_this_invocation']:.1f} s (stage times add up to "
        f"{res['stage_seconds_sum']:.1f} s)\nclaims:\n{verdicts}"
    )
    emit(
        args,
        {"out": args.out, "claims": res["claims"], "stage_seconds": res["stage_seconds"]},
        text,
    )
    return 0


EPILOG_STE = """examples:
  monquant ste-recovery                           # full study -> results/ste-recovery/
  monquant ste-recovery --quick --out /tmp/ste    # small grid, seconds
"""


def cmd_ste_recovery(args: argparse.Namespace) -> int:
    from monquant.experiments.ste.report import summary_text, write_report
    from monquant.experiments.ste.study import run_ste_recovery

    res = run_ste_recovery(
        quick=args.quick,
        seed=args.seed,
        trials=args.trials,
        m=args.hidden,
        T=args.T,
        sigma_frac=args.noise,
        progress=not args.no_progress,
    )
    res = write_report(args.out, res)
    emit(
        args,
        {"out": args.out, "scaling": res["scaling"], "timing": res["timing"]},
        summary_text(res) + f"\nreport: {Path(args.out) / 'report.md'}",
    )
    return 0


def register(add: AddCommand) -> None:
    """Add ``reproduce`` and ``ste-recovery`` to the main parser."""
    r = add("reproduce", cmd_reproduce, "reproduce every result of the paper", EPILOG_REPRODUCE)
    r.add_argument("--out", default="results/paper", help="results folder")
    r.add_argument("--quick", action="store_true", help="small CI-sized run of the same pipeline")
    r.add_argument("--model", default=None, help="reuse a float checkpoint instead of training")
    r.add_argument("--epochs", type=positive_int, default=None, help="override the training epochs")
    r.add_argument(
        "--setup",
        choices=("paper", "fast"),
        default="paper",
        help="paper: the paper's code where its text is silent (m0 0.2, rank 25, 0.01 N(0,1) "
        "init, seed 42, tol 1e-5); fast: monquant's earlier defaults (m0 0.05, full rank, seed 0)",
    )
    r.add_argument("--seed", type=int, default=None, help="random seed of every training "
                   "(default: the setup's, 42 or 0)")  # fmt: skip
    r.add_argument(
        "--margin-init",
        type=positive_float,
        default=None,
        help="initial learnable margin m of every trained model (default: the setup's)",
    )
    r.add_argument("--resume", action="store_true", help="skip stages already finished")
    executor_args(r)
    data_args(r)

    s = add(
        "ste-recovery",
        cmd_ste_recovery,
        "finite-sample STE study: binary two-layer network recovery and recurrence",
        EPILOG_STE,
    )
    s.add_argument("--out", default="results/ste-recovery", help="results folder")
    s.add_argument("--quick", action="store_true", help="small grid (seconds)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--trials", type=positive_int, default=50, help="independent trials per point")
    s.add_argument(
        "--hidden", type=positive_int, default=32, help="hidden units m of the recovery study"
    )
    renamed_flag(s, "--m", "--hidden", "hidden", keep=False,
                 note=" (hidden units; --m would read as the margin, its meaning elsewhere)")  # fmt: skip
    s.add_argument("--T", type=positive_int, default=2000, help="STE iterations")
    s.add_argument("--noise", type=float, default=0.2, help="label noise / label std (recurrence)")
