"""Command-line interface: ``monquant <command>``. Thin: parse, call the library, print.

Every command accepts ``--json`` for machine-readable output on stdout, exits non-zero on error
with a one-line message on stderr, and shows progress on stderr for long work. This module holds
the one command table; each command family lives in its own module and registers its commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from monquant import __version__
from monquant.cli import (
    certificates,
    conv,
    deploy,
    interop,
    lowbit,
    robustness,
    studies,
    training,
)
from monquant.cli.common import AddCommand, Parser, device_name, select_device, thread_count
from monquant.errors import MonquantError
from monquant.storage.files import folder_lock

__all__ = ["COMMAND_FAMILIES", "FOLDER_COMMANDS", "build_parser", "main"]

#: The command table: every family's ``register(add)``, in the order ``--help`` lists them.
COMMAND_FAMILIES: tuple[Callable[[AddCommand], None], ...] = (
    training.register,
    certificates.register,
    robustness.register,
    studies.register,
    conv.register,
    deploy.register,
    lowbit.register,
    interop.register,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written, and every option's default shown in ``--help``."""


#: Commands that write a run or results folder (``--out``): each holds the folder's lock.
#: Commands that only convert files (nothing to compute on a device).
NO_DEVICE_COMMANDS = frozenset({"import"})
FOLDER_COMMANDS = frozenset(
    {"train", "reproduce", "lowbit", "ste-recovery", "intdeploy", "robustness", "conv"}
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="monquant",
        description="Quantize monotone operator equilibrium networks with certified convergence.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"monquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, epilog: str = ""):
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=HelpFormatter,
            allow_abbrev=False,  # a prefix of a flag is refused, not silently taken for it
        )
        sp.set_defaults(func=func)
        commands[name] = sp
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
        if name not in NO_DEVICE_COMMANDS:
            sp.add_argument("--device", type=device_name, default="cpu",
                            help="where to compute: cpu, cuda, cuda:N, mps or auto")  # fmt: skip
            sp.add_argument("--threads", type=thread_count, default="auto",
                            help="intra-op CPU threads: N, or auto (the cores not kept busy by "
                            "other work; see docs/cli.md)")  # fmt: skip
        return sp

    for register in COMMAND_FAMILIES:
        register(add)
    p.set_defaults(_commands=commands)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # an unknown flag gets the subcommand's error and usage, not the top-level one
        target = args._commands.get(getattr(args, "command", None) or "", parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    t0 = time.perf_counter()
    try:
        return _dispatch(args, t0)
    finally:
        for note in getattr(args, "_deprecations", []):
            print(note, file=sys.stderr)


def _dispatch(args: argparse.Namespace, t0: float) -> int:
    """Run the command: an ``error:`` line and exit 2 for a :class:`MonquantError`."""
    try:
        if getattr(args, "device", "cpu") != "cpu":
            args.device = select_device(args.device)
        if hasattr(args, "threads"):
            from monquant.runtime import set_threads

            args.threads_given = args.threads != "auto"  # an explicit count also binds workers
            args.threads = set_threads(args.threads)
        # a data-parallel run's other ranks (torchrun sets RANK) leave the folder to rank 0
        worker = os.environ.get("RANK", "0") != "0"
        if args.command in FOLDER_COMMANDS and getattr(args, "out", None) is not None and not worker:
            # one writer per run/results folder, taken before any data loads or work starts
            with folder_lock(args.out, args.command):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except MonquantError as exc:
        print(f"monquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"monquant {args.command}: interrupted after {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
