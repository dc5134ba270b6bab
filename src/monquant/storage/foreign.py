"""Checkpoints of other MonDEQ code, converted into monquant models (``monquant import``).

Two layouts, both plain PyTorch state dicts of tensors:

- ``mondeq-quant``: the paper's code (github JLi-Projects/mondeq-quant, ``MNISTMonDEQ``):
  ``mon.core.A`` (r x n), ``mon.core.S`` (n x n), ``mon.core.m_raw`` (scalar), ``mon.core.U``
  (n x d), ``mon.core.b`` (n), ``classifier.weight`` (k x n), ``classifier.bias`` (k), with
  ``W = (1 - m) I - A^T A + S - S^T`` and ``m = softplus(m_raw) + 1e-4``. monquant's W-K form is the
  same with ``B = S``, rank ``r`` and margin floor ``1e-4``, so the imported W is the paper's W.
- ``monotone-op-net``: the original MonDEQ code (github locuslab/monotone_op_net), its fully
  connected ``MONSingleFc`` inside ``SingleFcNet``: ``mon.linear_module.U.weight`` / ``.bias``,
  ``mon.linear_module.A.weight``, ``mon.linear_module.B.weight`` (n x n) and the head ``Wout``;
  the margin ``m`` is not stored (a constructor argument: 1.0 in ``MONSingleFc``, 0.1 in
  ``SingleFcNet``), so the caller gives it. Keys may also come without the ``mon.linear_module.``
  prefix (a bare ``MONSingleFc``); a state dict without a head gets a zero head, flagged.

Loading is ``torch.load(..., weights_only=True)`` and nothing else: a pickle that needs any global
(a whole pickled model, custom classes) is refused with a one-line error. Unknown or missing keys
and wrong shapes are named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monquant.errors import CheckpointError
from monquant.model import MonDEQClassifier, MonDEQConfig, softplus_inverse
from monquant.names import IMPORT_LAYOUTS

__all__ = [
    "LAYOUTS",
    "PAPER_MARGIN_FLOOR",
    "ImportedModel",
    "import_checkpoint",
    "read_state_dict",
    "to_state_dict",
]

#: The paper's code keeps ``m = softplus(m_raw) + 1e-4`` away from 0.
PAPER_MARGIN_FLOOR = 1e-4
LAYOUTS: tuple[str, ...] = IMPORT_LAYOUTS


@dataclass
class ImportedModel:
    """A converted model and what the conversion knows about it."""

    model: MonDEQClassifier
    layout: str
    source: str
    notes: list[str]

    def metadata(self) -> dict[str, Any]:
        return {"imported_from": {"layout": self.layout, "source": self.source,
                                  "notes": list(self.notes)}}  # fmt: skip


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch state dict file, loaded with ``weights_only=True`` only."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{p}: not loadable with torch.load(weights_only=True) ({first}); only state dicts of "
            "plain tensors are imported, never arbitrary pickles"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")  # fmt: skip
    tensors = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise CheckpointError(f"{p}: {k} has dtype {v.dtype}; weights must be floating point")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{p}: {k} has non-finite values")
        tensors[str(k)] = v.detach().clone()
    return tensors


def _take(sd: dict[str, torch.Tensor], path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"{path}: missing key {key!r} (found: {', '.join(sorted(sd))})")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _no_extra(sd: dict[str, torch.Tensor], path: Path, known: set[str]) -> None:
    extra = sorted(set(sd) - known)
    if extra:
        raise CheckpointError(f"{path}: unknown keys for this layout: {', '.join(extra)}")


def _fill(model: MonDEQClassifier, values: dict[str, torch.Tensor]) -> MonDEQClassifier:
    dtype = model.layer.A.dtype
    with torch.no_grad():
        for name, value in values.items():
            obj: Any = model
            *parents, leaf = name.split(".")
            for part in parents:
                obj = getattr(obj, part)
            getattr(obj, leaf).copy_(value.to(dtype))
    return model


def _mondeq_quant(sd: dict[str, torch.Tensor], path: Path) -> tuple[MonDEQClassifier, list[str]]:
    A = sd.get("mon.core.A")
    U = sd.get("mon.core.U")
    head = sd.get("classifier.weight")
    if A is None or U is None or head is None or A.dim() != 2 or U.dim() != 2 or head.dim() != 2:
        missing = [k for k in ("mon.core.A", "mon.core.U", "classifier.weight") if k not in sd]
        raise CheckpointError(
            f"{path}: not the mondeq-quant layout"
            + (f" (missing key {missing[0]!r}; found: {', '.join(sorted(sd))})" if missing else
               " (A, U and classifier.weight must be matrices)")
        )  # fmt: skip
    r, n = A.shape
    d, k = U.shape[1], head.shape[0]
    shapes = {
        "mon.core.A": (r, n), "mon.core.S": (n, n), "mon.core.m_raw": (), "mon.core.U": (n, d),
        "mon.core.b": (n,), "classifier.weight": (k, n), "classifier.bias": (k,),
    }  # fmt: skip
    t = {key: _take(sd, path, key, shp) for key, shp in shapes.items()}
    _no_extra(sd, path, set(shapes))
    m = float(torch.nn.functional.softplus(t["mon.core.m_raw"].double())) + PAPER_MARGIN_FLOOR
    cfg = MonDEQConfig(in_features=d, hidden=n, out_features=k, rank=r, margin_init=m,
                       learn_margin=True, margin_floor=PAPER_MARGIN_FLOOR, init="paper")  # fmt: skip
    model = _fill(MonDEQClassifier(cfg), {
        "layer.A": t["mon.core.A"], "layer.B": t["mon.core.S"], "layer.m_raw": t["mon.core.m_raw"],
        "layer.U.weight": t["mon.core.U"], "layer.U.bias": t["mon.core.b"],
        "head.weight": t["classifier.weight"], "head.bias": t["classifier.bias"],
    })  # fmt: skip
    return model, [f"W = (1 - m) I - A^T A + S - S^T with rank {r}, m = softplus(m_raw) + 1e-4"]


def _monotone_op_net(
    sd: dict[str, torch.Tensor], path: Path, margin: float
) -> tuple[MonDEQClassifier, list[str]]:
    prefix = "mon.linear_module." if "mon.linear_module.A.weight" in sd else ""
    a_key = f"{prefix}A.weight"
    A, U = sd.get(a_key), sd.get(f"{prefix}U.weight")
    if A is None or U is None or A.dim() != 2 or U.dim() != 2:
        raise CheckpointError(
            f"{path}: not the monotone-op-net fully connected layout (missing key {a_key!r} or "
            f"{prefix}U.weight; found: {', '.join(sorted(sd))})"
        )
    n, d = U.shape
    shapes = {f"{prefix}U.weight": (n, d), f"{prefix}U.bias": (n,), f"{prefix}A.weight": (n, n),
              f"{prefix}B.weight": (n, n)}  # fmt: skip
    notes = [f"MONSingleFc: W = (1 - m) I - A^T A + B - B^T with the given fixed m = {margin}"]
    has_head = "Wout.weight" in sd
    if has_head:
        k = sd["Wout.weight"].shape[0] if sd["Wout.weight"].dim() == 2 else -1
        shapes |= {"Wout.weight": (k, n), "Wout.bias": (k,)}
    else:
        k = 10
        notes.append("no output layer (Wout) in the file: the head is zero (predictions are "
                     "meaningless; certificates of W are not affected)")  # fmt: skip
    t = {key: _take(sd, path, key, shp) for key, shp in shapes.items()}
    _no_extra(sd, path, set(shapes))
    cfg = MonDEQConfig(in_features=d, hidden=n, out_features=k, margin_init=margin,
                       learn_margin=False, init="paper")  # fmt: skip
    values = {"layer.A": t[a_key], "layer.B": t[f"{prefix}B.weight"],
              "layer.U.weight": t[f"{prefix}U.weight"], "layer.U.bias": t[f"{prefix}U.bias"]}  # fmt: skip
    if has_head:
        values |= {"head.weight": t["Wout.weight"], "head.bias": t["Wout.bias"]}
    model = MonDEQClassifier(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        # the fixed margin as m = softplus(m_raw): equal to the given m up to float rounding
        model.layer.m_raw.fill_(softplus_inverse(margin))
    model = _fill(model, values)
    got = float(model.layer.margin())
    if abs(got - margin) > 1e-6 * max(1.0, margin):
        raise CheckpointError(f"margin {margin} is not representable here (got {got})")
    return model, notes


def import_checkpoint(layout: str, path: str | Path, margin: float | None = None) -> ImportedModel:
    """Convert the state dict at ``path`` in ``layout`` (:data:`LAYOUTS`) into a monquant model.

    ``margin`` is the fixed ``m`` of the ``monotone-op-net`` layout (default 1.0, its
    ``MONSingleFc`` default); the ``mondeq-quant`` layout stores its own (``margin`` must be None).
    """
    p = Path(path)
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    sd = read_state_dict(p)
    if layout == "mondeq-quant":
        if margin is not None:
            raise CheckpointError("the mondeq-quant layout stores its margin (m_raw): omit --margin")
        model, notes = _mondeq_quant(sd, p)
    else:
        m = 1.0 if margin is None else float(margin)
        if not m > 0:
            raise CheckpointError(f"the margin must be positive, got {m}")
        model, notes = _monotone_op_net(sd, p, m)
    return ImportedModel(model.eval(), layout, str(p), notes)


def to_state_dict(model: MonDEQClassifier, layout: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`import_checkpoint`: ``model``'s tensors under ``layout``'s keys
    (``import_checkpoint`` of the result gives back the same tensors, bit for bit)."""
    layer = model.layer
    if layer.free:
        raise CheckpointError("a free-parameterized W has no A, B factors to export")
    t = {k: v.detach().clone() for k, v in {
        "A": layer.A, "B": layer.B, "m_raw": layer.m_raw, "U": layer.U.weight, "b": layer.U.bias,
        "C": model.head.weight, "c": model.head.bias}.items()}  # fmt: skip
    if layout == "mondeq-quant":
        if layer.config.margin_floor != PAPER_MARGIN_FLOOR or not layer.config.learn_margin:
            raise CheckpointError("the mondeq-quant layout needs a learned margin with floor 1e-4")
        return {"mon.core.A": t["A"], "mon.core.S": t["B"], "mon.core.m_raw": t["m_raw"],
                "mon.core.U": t["U"], "mon.core.b": t["b"], "classifier.weight": t["C"],
                "classifier.bias": t["c"]}  # fmt: skip
    if layout == "monotone-op-net":
        if layer.config.rank not in (None, layer.config.hidden):
            raise CheckpointError("the monotone-op-net layout has a square A (full rank)")
        pre = "mon.linear_module."
        return {f"{pre}U.weight": t["U"], f"{pre}U.bias": t["b"], f"{pre}A.weight": t["A"],
                f"{pre}B.weight": t["B"], "Wout.weight": t["C"], "Wout.bias": t["c"]}  # fmt: skip
    raise CheckpointError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
