"""``monquant conv``: the paper's experiments on a single-convolution MonDEQ beside the dense one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monquant.cli.common import (
    AddCommand,
    bits_arg,
    data_args,
    emit,
    executor_args,
    load_data,
    positive_int,
)

__all__ = ["cmd_conv", "register"]

EPILOG_CONV = """examples:
  monquant conv --out results/conv                  # the full study (hours on a 2-core CPU)
  monquant conv --out results/conv-quick --quick    # a CI-sized run of the same pipeline
  monquant conv --out results/conv --resume         # continue an interrupted study
  monquant conv --out results/c8 --channels 8 --epochs 3
  monquant conv --out results/conv --executor process --workers 2   # trainings, QAT rows in parallel
  monquant conv --out results/conv --qat-bits 4 --resume            # the low-bit stage at 4 bits only
  monquant conv --out results/conv --qat-rows ste:2 margin:2 --resume   # add configurations
"""


KINDS = ("ste", "margin", "proxquant-factors")


def qat_row(text: str) -> tuple[str, int]:
    """``KIND:BITS`` of ``--qat-rows`` (argparse reports the ArgumentTypeError as a usage error)."""
    kind, sep, bits = text.partition(":")
    if not sep or kind not in KINDS or not bits.isdigit() or not 2 <= int(bits) <= 32:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KIND:BITS with KIND one of {', '.join(KINDS)} and BITS in 2..32")
    return kind, int(bits)


def cmd_conv(args: argparse.Namespace) -> int:
    from monquant.experiments.conv.report import conv_tables
    from monquant.experiments.conv.study import ConvStudyConfig, run_conv_study

    kw = dict(out=Path(args.out), channels=args.channels, epochs=args.epochs,
              bits=tuple(args.bits) if args.bits else None, train_limit=args.train_limit,
              qat_bits=tuple(args.qat_bits) if args.qat_bits else None,
              qat_kinds=tuple(args.qat_kinds) if args.qat_kinds else None,
              qat_rows=tuple(args.qat_rows) if args.qat_rows else None,
              resume=args.resume, progress=not args.no_progress, executor=args.executor,
              workers=args.workers, address=args.address,
              worker_threads=args.threads if getattr(args, "threads_given", False) else None,
              command=["monquant", *sys.argv[1:]])  # fmt: skip
    cfg = (ConvStudyConfig.quick_config(**kw) if args.quick
           else ConvStudyConfig(**{k: v for k, v in kw.items() if v is not None}))  # fmt: skip
    data = load_data(args)  # the settings above are checked before any data loads
    res = run_conv_study(cfg, data, echo=None if args.json else print)
    text = conv_tables(res) + f"\nreport: {cfg.out / 'report.md'}\nresults: {cfg.out / 'results.json'}"
    emit(args, {k: res[k] for k in ("compare", "phase", "displacement", "qat", "stage_seconds")}, text)
    return 0


def register(add: AddCommand) -> None:
    """Add ``conv`` to the main parser."""
    c = add("conv", cmd_conv, "the paper's experiments on a single-convolution MonDEQ (vs dense)",
            EPILOG_CONV)  # fmt: skip
    c.add_argument("--out", default="results/conv", help="results folder (report, figure, stages)")
    c.add_argument("--quick", action="store_true", help="small CI-sized run of the same pipeline")
    c.add_argument("--resume", action="store_true", help="skip stages already finished")
    c.add_argument("--channels", type=positive_int, default=None, help="channels of the conv model")
    c.add_argument("--epochs", type=positive_int, default=None, help="epochs of the conv model")
    c.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on the first K images only")  # fmt: skip
    bits_arg(c, many=True, help_="bit-widths of the phase transition (default 2..16)")
    c.add_argument("--qat-rows", type=qat_row, nargs="+", default=None, metavar="KIND:B",
                   help="low-bit configurations, e.g. ste:4 proxquant-factors:2 (default: the three "
                   "methods at 4 bits and proxquant-factors at 2)")  # fmt: skip
    c.add_argument("--qat-bits", type=int, nargs="+", default=None, metavar="B",
                   help="instead of --qat-rows: every --qat-kinds method at these bit-widths (default 4)")
    c.add_argument("--qat-kinds", nargs="+", default=None, choices=KINDS,
                   help="instead of --qat-rows: these methods at every --qat-bits (default: all three)")
    executor_args(c)
    data_args(c)
