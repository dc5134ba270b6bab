"""The uniform weight quantizer ``Q_b`` (docs/theory.md section 2): bits, granularity, step rule, codes.

Symmetric uniform mid-tread quantizer with ``b`` bits over ``[-w_max, w_max]``:

    D_b  = 2 w_max / (2^b - 1)          (step rule "paper", the default: the paper's text)
    D_b  = w_max / (2^(b-1) - 1)        (step rule "narrow": the paper's code, torch.ao, TensorRT)
    Q(w) = D_b * clamp(round(w / D_b), -(2^(b-1) - 1), 2^(b-1) - 1)

so there are ``2^b - 1`` levels (the narrow rule's top level is ``w_max`` itself), the integer
codes fit a ``b``-bit signed integer, and
``|Q(w) - w| <= D_b / 2`` for every ``|w| <= w_max``. Per-tensor scaling uses one ``w_max = max|W_ij|``
(the paper); per-channel uses one ``w_max`` per row. ``round`` is round-half-to-even.

Note: with ``w_max`` re-derived from its input the paper's ``Q`` is not idempotent (its top
level ``(2^(b-1) - 1) D_b`` is below ``w_max``); the narrow rule's is, and both are with the range
held fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from monquant.errors import MonquantError
from monquant.names import GRANULARITIES, MAX_BITS, MIN_BITS, STEP_RULES

__all__ = [
    "GRANULARITIES",
    "QuantizationError",
    "Quantized",
    "a_priori_step",
    "check_bits",
    "check_granularity",
    "check_step_rule",
    "fake_quant",
    "grid_codes",
    "quantize",
    "step_size",
    "storage_bits",
]

Granularity = Literal["per-tensor", "per-channel"]


class QuantizationError(MonquantError, ValueError):
    """Invalid quantization request (bit-width, granularity, non-finite weights...)."""


def check_bits(bits: object) -> int:
    """Return ``bits`` as an int if it is a whole number in ``[2, 32]``; raise otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or isinstance(bits, complex):
        raise QuantizationError(f"bit-width must be an integer in [2, 32], got {bits!r}")
    if isinstance(bits, float) and (not math.isfinite(bits) or bits != int(bits)):
        raise QuantizationError(f"bit-width must be an integer in [2, 32], got {bits!r}")
    b = int(bits)
    if not MIN_BITS <= b <= MAX_BITS:
        why = " (1 bit has no symmetric mid-tread level besides 0)" if b == 1 else ""
        raise QuantizationError(f"bit-width must be an integer in [2, 32], got {b}{why}")
    return b


#: Accepted spellings of a granularity (``per-row`` is ProxQuant's old name for per-channel).
ALIASES = {"per-row": "per-channel"}


def check_granularity(granularity: str) -> str:
    """The canonical granularity name (``per-tensor`` or ``per-channel``); raise otherwise."""
    granularity = ALIASES.get(granularity, granularity)
    if granularity not in GRANULARITIES:
        raise QuantizationError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    return granularity


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def check_step_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`monquant.names.STEP_RULES`; raise otherwise."""
    if rule not in STEP_RULES:
        raise QuantizationError(f"unknown step rule {rule!r}; choose one of {', '.join(STEP_RULES)}")
    return rule


def step_size(w_max: Any, bits: int, rule: str = "paper") -> Any:
    """The step ``D_b`` of the rule: ``2 w_max / (2^b - 1)`` (``paper``) or
    ``w_max / (2^(b-1) - 1)`` (``narrow``). ``w_max`` may be a float or a tensor."""
    b = check_bits(bits)
    if check_step_rule(rule) == "paper":
        return 2.0 * w_max / (2**b - 1)
    return w_max / (2 ** (b - 1) - 1)


def a_priori_step(w_max: float, bits: int, rule: str = "paper") -> float:
    """Quantization step ``D_b`` for ``w_max`` (:func:`step_size` of a float)."""
    return float(step_size(float(w_max), bits, rule))


@dataclass
class Quantized:
    """Integer codes and scales of a quantized tensor.

    ``step`` has shape ``()`` (per-tensor) or ``(rows, 1)`` (per-channel) and dtype float64;
    ``w_max`` likewise. ``dequantized()`` is ``codes * step`` in ``dtype``.
    """

    codes: torch.Tensor
    step: torch.Tensor
    w_max: torch.Tensor
    bits: int
    granularity: str
    dtype: torch.dtype
    step_rule: str = "paper"

    def dequantized(self) -> torch.Tensor:
        return (self.codes.to(torch.float64) * self.step).to(self.dtype)

    @property
    def max_step(self) -> float:
        return float(self.step.max())

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def grid_codes(w: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / D), -qmax, qmax)`` (half to even); ``D = 0`` gives codes 0.

    The one rounding rule of every uniform grid in monquant (this quantizer and ProxQuant's).
    """
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.div(w, safe).round_().clamp_(-qmax, qmax)  # one new tensor, rounded in place


def _range(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``max |w|`` (per row for per-channel) in float64: the maximum is taken in ``w``'s dtype,
    whose values float64 holds exactly. A NaN or infinite entry makes its range non-finite."""
    a = w.detach().abs()
    if granularity == "per-tensor" or w.dim() < 2:
        return a.amax().to(torch.float64)
    return a.reshape(a.shape[0], -1).amax(dim=1).to(torch.float64).reshape(-1, *([1] * (w.dim() - 1)))


def _codes64(
    w: torch.Tensor, bits: int, granularity: str, w_max: torch.Tensor | float | None, step_rule: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, str]:
    """``(codes, step, w_max, bits, granularity)`` of :func:`quantize`, the codes as float64
    integers (exact), after every check."""
    b = check_bits(bits)
    granularity = check_granularity(granularity)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise QuantizationError("quantize expects a floating-point tensor")
    if w_max is None:
        wmax = _range(w, granularity)  # the range carries any NaN or inf of w: one finite sum
        finite = math.isfinite(float(wmax.sum())) or bool(torch.isfinite(wmax).all())
    else:
        wmax = torch.as_tensor(w_max, dtype=torch.float64, device=w.device)
        finite = bool(torch.isfinite(w).all())
    if not finite:
        raise QuantizationError("cannot quantize a tensor with NaN or inf entries")
    step = step_size(wmax, b, step_rule)
    codes = grid_codes(w.detach().to(torch.float64), step, 2 ** (b - 1) - 1)
    return codes, step, wmax, b, granularity


def quantize(
    w: torch.Tensor,
    bits: int,
    granularity: str = "per-tensor",
    w_max: torch.Tensor | float | None = None,
    step_rule: str = "paper",
) -> Quantized:
    """The paper's quantizer ``Q_b`` (docs/theory.md section 2): codes, steps and the dequantized tensor.

    ``step_rule``: ``paper`` or ``narrow`` (:func:`step_size`). ``w_max`` defaults to ``max|w|``
    over the tensor (per-tensor) or over each row (per-channel).
    An all-zero tensor (or row) gets step 0 and codes 0. Raises :class:`QuantizationError` for a
    bad bit-width or granularity and for NaN/inf entries.
    """
    codes, step, wmax, b, granularity = _codes64(w, bits, granularity, w_max, step_rule)
    return Quantized(
        codes=codes.to(_code_dtype(b)),
        step=step,
        w_max=wmax,
        bits=b,
        granularity=granularity,
        dtype=w.dtype,
        step_rule=step_rule,
    )


class _FakeQuant(torch.autograd.Function):
    """Forward ``Q_b(w)``; backward straight-through: the gradient passes unchanged.

    The clipped STE passes the gradient inside ``[-w_max, w_max]`` (bounds included) and stops it
    outside; here ``w_max`` is ``max |w|`` itself (per tensor or per row), so every entry is
    inside and the clip is the identity: no mask is formed (it was all ones, five operations on
    the tensor per backward)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, granularity: str, rule: str):  # type: ignore[override]
        codes, step, _, _, _ = _codes64(w, bits, granularity, None, rule)
        # Quantized.dequantized() without the round trip through the integer dtype: the float64
        # codes are the same integers, so codes * D rounds to the same values
        return codes.mul_(step).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None, None


def fake_quant(
    w: torch.Tensor,
    bits: int,
    granularity: str = "per-tensor",
    step_rule: str = "paper",
) -> torch.Tensor:
    """Straight-through fake quantization for QAT: forward ``Q_b(w)``, backward ``dQ/dw := 1``.

    The range ``w_max`` comes from ``w`` (:func:`quantize`), so every entry lies inside it and the
    clipped STE (gradient 1 on ``[-w_max, w_max]``, 0 outside) is the identity. ``w_max`` is
    treated as a constant (no gradient through the range).
    """
    rule = check_step_rule(step_rule)
    return _FakeQuant.apply(w, check_bits(bits), check_granularity(granularity), rule)


def storage_bits(shape: tuple[int, ...], bits: int, granularity: str, scale_bits: int = 32) -> int:
    """Bits needed to store a quantized tensor: ``numel * b`` for codes plus one float per scale."""
    numel = math.prod(shape)
    n_scales = 1 if granularity == "per-tensor" or len(shape) < 2 else shape[0]
    return numel * check_bits(bits) + n_scales * scale_bits
