"""The one progress bar: tqdm on stderr, off with ``enabled=False`` (``--no-progress``).

Progress never goes to stdout, so ``--json`` output stays parseable; the bar is cleared when its
work ends (``leave=False``) unless ``leave`` asks to keep it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    enabled: bool,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not enabled,
        file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
