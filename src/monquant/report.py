"""Rendering: text and Markdown tables from column specs, and figures (PNG + PDF).

Experiments return plain data (dicts, lists, numbers); turning data into tables and figures happens
here, in one place. Files are written through :mod:`monquant.storage` (JSON, atomic text).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CERTIFICATE_COLUMNS",
    "certificate_cells",
    "certificate_headers",
    "fmt",
    "markdown_table",
    "new_figure",
    "save_figure",
    "text_table",
]


def fmt(value: Any, digits: int = 4) -> str:
    """Format a table cell: floats with ``digits`` significant digits, booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    if value is None:
        return "-"
    return str(value)


def _cells(rows: Iterable[Sequence[Any]], digits: int) -> list[list[str]]:
    return [[fmt(v, digits) for v in row] for row in rows]


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """Render a GitHub-flavoured Markdown table (``|`` inside cells is escaped)."""
    body = [[_md_escape(c) for c in r] for r in _cells(rows, digits)]
    headers = [_md_escape(h) for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """Render a fixed-width plain-text table for terminals."""
    body = _cells(rows, digits)
    widths = [len(h) for h in headers]
    for r in body:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


#: Certificate fields shown in every certificate table, with their column titles.
CERTIFICATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("bits", "bits"),
    ("step", "step"),
    ("dW_norm", "||dW||"),
    ("dW_over_m", "||dW||/m"),
    ("dW_norm_upper", "||dW|| <="),
    ("a_priori_bound", "a-priori"),
    ("weyl_bound", "Weyl m-||dW|| >="),
    ("margin_quantized", "margin(W~)"),
    ("margin_quantized_lower", "margin(W~) >="),
    ("margin_quantized_upper", "margin(W~) <="),
    ("certified_a_priori", "a-priori ok"),
    ("certified_weyl", "Weyl ok"),
    ("certified_exact", "exact ok"),
    ("verdict", "verdict"),
)


def certificate_cells(cert: dict[str, Any], extra: Sequence[str] = ()) -> list[Any]:
    """One table row: the :data:`CERTIFICATE_COLUMNS` of a certificate dict, then ``extra`` keys.

    Keys missing from an older certificate (written before the proved bounds existed) show ``-``.
    """
    return [cert.get(k) for k, _ in CERTIFICATE_COLUMNS] + [cert.get(k) for k in extra]


def certificate_headers(extra: Sequence[str] = ()) -> list[str]:
    """Titles matching :func:`certificate_cells`."""
    return [title for _, title in CERTIFICATE_COLUMNS] + list(extra)


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.5, 4.0)):
    """Create a matplotlib figure with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    return fig, axes


def save_figure(fig: Any, stem: str | os.PathLike[str]) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.pdf``; close it; return both paths."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        p = stem.with_suffix(f".{ext}")
        fig.savefig(p, dpi=150 if ext == "png" else None)
        paths.append(p)
    plt.close(fig)
    return paths
