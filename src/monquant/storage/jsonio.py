"""JSON results: one convention for non-finite numbers, atomic files.

JSON has no infinity or NaN, and a number field must stay a number. monquant's convention, used by
every ``--json`` output, ``results.json``, ``log.json`` and file metadata:

- a non-finite float is written as ``null``;
- the innermost JSON object that holds it (directly or through lists) gains a key ``"nonfinite"``
  mapping the value's relative JSON pointer (RFC 6901, e.g. ``"L_quantized_upper"`` or
  ``"radii/3"``) to ``"inf"``, ``"-inf"`` or ``"nan"``.

So ``{"L": inf, "r": [1.0, nan]}`` is written ``{"L": null, "r": [1.0, null], "nonfinite": {"L":
"inf", "r/1": "nan"}}``; a reader that ignores the flag sees ``null`` (never a string where a
number belongs) and :func:`from_jsonable` / :func:`read_json` restore the floats exactly. A
non-finite number in a bare top-level list (no object around it) is written ``null`` without a flag.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from monquant.errors import InputTypeError
from monquant.storage.files import PathLike, atomic_write_text

__all__ = ["NONFINITE_KEY", "dumps_json", "from_jsonable", "read_json", "to_jsonable", "write_json"]

NONFINITE_KEY = "nonfinite"
_NAMES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, dataclasses and paths into JSON data (module convention).

    Non-finite floats become ``null`` and are listed under ``"nonfinite"`` in the innermost object
    that holds them (see the module docstring), so every number field stays a number or ``null``.
    """
    return _convert(obj, {}, ())


def _convert(obj: Any, marks: dict[str, str], path: tuple[str, ...]) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        own: dict[str, str] = {}
        out = {str(k): _convert(v, own, (_escape(str(k)),)) for k, v in obj.items()}
        if own:
            if NONFINITE_KEY in out:
                raise InputTypeError(f"cannot convert to JSON: a key is named {NONFINITE_KEY!r}")
            out[NONFINITE_KEY] = own
        return out
    if isinstance(obj, (list, tuple)):
        return [_convert(v, marks, (*path, str(i))) for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        marks["/".join(path)] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return _convert(obj.detach().cpu().tolist(), marks, path)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return _convert(obj.tolist(), marks, path)
        if isinstance(obj, np.generic):
            return _convert(obj.item(), marks, path)
    except ImportError:  # pragma: no cover
        pass
    raise InputTypeError(f"cannot convert {type(obj).__name__} to JSON")


def from_jsonable(obj: Any) -> Any:
    """Undo :func:`to_jsonable`'s non-finite convention: put the floats back, drop the flags."""
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: from_jsonable(v) for k, v in obj.items() if k != NONFINITE_KEY}
    marks = obj.get(NONFINITE_KEY)
    if not isinstance(marks, dict) or not all(v in _NAMES for v in marks.values()):
        if NONFINITE_KEY in obj:
            out[NONFINITE_KEY] = from_jsonable(marks)  # not our flag: keep it as data
        return out
    for pointer, name in marks.items():
        parts = [_unescape(p) for p in pointer.split("/")]
        holder: Any = out
        try:
            for p in parts[:-1]:
                holder = holder[int(p)] if isinstance(holder, list) else holder[p]
            last = parts[-1]
            if isinstance(holder, list):
                holder[int(last)] = _NAMES[name]
            else:
                holder[last] = _NAMES[name]
        except (KeyError, IndexError, ValueError, TypeError):
            continue  # a flag that points nowhere is ignored, never a crash
    return out


def dumps_json(data: Any, indent: int | None = 2) -> str:
    """``data`` as standard JSON text (the module convention for non-finite numbers)."""
    return json.dumps(to_jsonable(data), indent=indent, allow_nan=False)


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write_text(path, dumps_json(data) + "\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file written by :func:`write_json` (non-finite numbers restored)."""
    return from_jsonable(json.loads(Path(path).read_text(encoding="utf-8")))
