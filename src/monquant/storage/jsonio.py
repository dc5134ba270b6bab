"""JSON results: one convention for non-finite numbers, atomic files.

Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so the JSON stays standard
(a reader sees that a value was not finite rather than a silent ``null``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from monquant.errors import InputTypeError
from monquant.storage.files import PathLike, atomic_write_text

__all__ = ["read_json", "to_jsonable", "write_json"]


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, dataclasses and paths into JSON-serialisable data.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so the JSON stays
    standard (and a reader sees that a value was not finite rather than a silent ``null``).
    """
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
    except ImportError:  # pragma: no cover
        pass
    raise InputTypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
