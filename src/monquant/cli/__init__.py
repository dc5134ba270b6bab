"""The ``monquant`` command line: ``main`` (the command table) and one module per command family."""

from monquant.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
