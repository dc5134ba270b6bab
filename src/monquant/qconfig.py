"""``QuantConfig``: how a model's MonDEQ layers (and, if asked, its ordinary layers) are quantized.

One value describes a quantization everywhere (``monquant.quantize_``, ``monquant.prepare_qat``,
``monquant.certify_model``), is validated against the shared vocabulary of :mod:`monquant.names`
when it is built, and round-trips through JSON (``to_json`` / ``from_json``), so a quantized
model's state records exactly how it was made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from monquant.errors import ConfigError
from monquant.names import GRANULARITIES, MAX_BITS, MIN_BITS, STEP_RULES

__all__ = ["LAYER_TARGETS", "MONDEQ_TARGETS", "TARGETS", "QuantConfig"]

#: Tensors of a MonDEQ layer that can be quantized: the operator ``W`` and the injection ``U``, ``b``.
MONDEQ_TARGETS: tuple[str, ...] = ("W", "U", "b")
#: Ordinary layers of the model that can be quantized too (their ``weight``; never certified:
#: they have no equilibrium).
LAYER_TARGETS: tuple[str, ...] = ("Linear", "Conv2d")
TARGETS: tuple[str, ...] = MONDEQ_TARGETS + LAYER_TARGETS


@dataclass(frozen=True)
class QuantConfig:
    """``bits``-bit uniform symmetric quantization (docs/theory.md section 2).

    ``granularity``: ``per-tensor`` (one step) or ``per-channel`` (one step per output row);
    ``step_rule``: ``paper`` (``2 w_max / (2^b - 1)``) or ``narrow`` (``w_max / (2^(b-1) - 1)``);
    ``targets``: what is quantized, among ``W``, ``U``, ``b`` of every MonDEQ layer (``b`` always
    per tensor) and ``Linear``, ``Conv2d`` for the model's ordinary layers (default ``("W",)``, as
    the paper).
    """

    bits: int
    granularity: str = "per-tensor"
    step_rule: str = "paper"
    targets: tuple[str, ...] = ("W",)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ConfigError(f"targets must be some of {TARGETS}, got {list(targets)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))

    @property
    def mondeq_targets(self) -> tuple[str, ...]:
        """The MonDEQ tensors this config quantizes (``W``, ``U``, ``b``)."""
        return tuple(t for t in self.targets if t in MONDEQ_TARGETS)

    def granularity_of(self, target: str) -> str:
        """``b`` (a vector) is always quantized per tensor; everything else per ``granularity``."""
        return "per-tensor" if target == "b" else self.granularity

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {"bits", "granularity", "step_rule", "targets"}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"QuantConfig: unknown keys {sorted(extra)}")
        if "bits" not in d:
            raise ConfigError("QuantConfig: 'bits' is required")
        kw: dict[str, Any] = {k: (tuple(v) if k == "targets" else v) for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"QuantConfig: not JSON ({exc})") from None
        if not isinstance(d, dict):
            raise ConfigError("QuantConfig: the JSON must be an object")
        return cls.from_dict(d)
