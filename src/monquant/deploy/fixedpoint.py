"""Fixed-point arithmetic of an integer MonDEQ deployment: formats, dyadic scales, integer weights.

- iterate and input formats ``x = 2^-f c`` (:class:`FixedPointFormat`, calibrated by
  :func:`calibrate_format`);
- dyadic scales ``M 2^-S`` (:func:`dyadic_scale`) and integer weights ``W~ = codes * M 2^-S``
  (:class:`IntWeights`, :func:`quantize_weights`: the codes of :func:`monquant.quant.uniform.quantize`);
- exact integer matmuls whose accumulator type is chosen from a proved bound before any product is
  formed (:func:`choose_accumulator`, :func:`int_matmul`): nothing may wrap silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from monquant.errors import ConfigError, MonquantError
from monquant.quant.uniform import check_bits, quantize

__all__ = [
    "ACCUMULATORS",
    "INT32_MAX",
    "INT64_MAX",
    "AccumulatorChoice",
    "DyadicScale",
    "FixedPointFormat",
    "IntWeights",
    "IntegerOverflowError",
    "calibrate_format",
    "choose_accumulator",
    "dyadic_scale",
    "int_matmul",
    "matmul_bound",
    "quantize_weights",
]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
ACCUMULATORS: tuple[str, ...] = ("auto", "int32", "int64")


class IntegerOverflowError(MonquantError, OverflowError):
    """An integer intermediate could exceed its type: detected before computing, never wrapped."""


# ----------------------------------------------------------------------------------------------
# Fixed-point formats and dyadic scales
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPointFormat:
    """Fixed-point numbers ``x = 2^-frac_bits c`` with ``bits``-bit integer codes ``c``.

    Signed codes are symmetric, ``|c| <= 2^(bits-1) - 1``; unsigned codes are ``0 <= c <= 2^bits - 1``.
    Encoding rounds half to even and saturates at the ends of the range.
    """

    bits: int
    frac_bits: int
    signed: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int):
            raise ConfigError(f"frac_bits must be an int, got {self.frac_bits!r}")
        if abs(self.frac_bits) > 96:
            raise ConfigError(f"frac_bits out of range [-96, 96]: {self.frac_bits}")

    @property
    def code_min(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def code_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_abs_code(self) -> int:
        return max(-self.code_min, self.code_max)

    @property
    def scale(self) -> float:
        """Grid spacing ``2^-frac_bits``."""
        return math.ldexp(1.0, -self.frac_bits)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """``round(x 2^f)`` in float64; refuses NaN and inf."""
        if not bool(torch.isfinite(x).all()):
            raise ConfigError("cannot encode NaN or inf in fixed point")
        return torch.round(torch.ldexp(x.detach().to(torch.float64), torch.tensor(self.frac_bits)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """int64 codes ``clamp(round(x 2^f), code_min, code_max)`` (float64 scaling is exact)."""
        return torch.clamp(self._scaled(x), self.code_min, self.code_max).to(torch.int64)

    def saturated(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries of ``x`` that :meth:`encode` clips."""
        r = self._scaled(x)
        return (r > self.code_max) | (r < self.code_min)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Real values ``2^-f c`` in float64 (exact for codes below ``2^53``)."""
        return torch.ldexp(codes.to(torch.float64), torch.tensor(-self.frac_bits))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "frac_bits": self.frac_bits, "signed": self.signed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FixedPointFormat:
        return cls(bits=int(d["bits"]), frac_bits=int(d["frac_bits"]), signed=bool(d["signed"]))


def calibrate_format(
    max_abs: float, bits: int, signed: bool = False, headroom: float = 1.0
) -> FixedPointFormat:
    """The finest power-of-two format whose range covers ``headroom * max_abs``.

    ``frac_bits = floor(log2(code_max / (headroom * max_abs)))``; when ``max_abs = 0`` any grid
    works and ``frac_bits = bits - 1`` is returned.
    """
    if not (math.isfinite(max_abs) and max_abs >= 0) or not headroom >= 1.0:
        raise ConfigError(f"need a finite max_abs >= 0 and headroom >= 1, got {max_abs}, {headroom}")
    probe = FixedPointFormat(check_bits(bits), 0, signed)
    target = headroom * max_abs
    if target == 0:
        return FixedPointFormat(probe.bits, probe.bits - 1, signed)
    f = math.floor(math.log2(probe.code_max / target))
    while math.ldexp(probe.code_max, -f) < target:  # guard the floating-point boundary
        f -= 1
    return FixedPointFormat(probe.bits, max(min(f, 96), -96), signed)


@dataclass(frozen=True)
class DyadicScale:
    """Scale ``multiplier * 2^-shift`` with an int64 ``multiplier`` (shape ``()`` or ``(rows,)``)."""

    multiplier: torch.Tensor
    shift: int

    def value(self) -> torch.Tensor:
        """The exact float64 value ``M 2^-S`` (``M < 2^53``)."""
        return torch.ldexp(self.multiplier.to(torch.float64), torch.tensor(-self.shift))

    @property
    def max_multiplier(self) -> int:
        return int(self.multiplier.abs().max())


def dyadic_scale(scale: torch.Tensor | float, mult_bits: int = 24) -> DyadicScale:
    """Round a positive scale (or one per row) to ``M 2^-S`` with ``M`` of ``mult_bits`` bits.

    ``S`` is shared by all rows and chosen so the largest scale gets ``2^(mult_bits-1) <= M <=
    2^mult_bits``; then ``|M 2^-S - s| <= 2^-(S+1)``, a relative error ``<= 2^-mult_bits`` for the
    largest scale. All-zero scales give ``M = 0``.
    """
    if not 2 <= int(mult_bits) <= 31:
        raise ConfigError(f"mult_bits must be in [2, 31], got {mult_bits}")
    s = torch.as_tensor(scale, dtype=torch.float64).detach().cpu()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ConfigError("scales must be finite and non-negative")
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return DyadicScale(torch.zeros_like(s, dtype=torch.int64), 0)
    shift = int(mult_bits) - 1 - math.floor(math.log2(top))
    M = torch.round(torch.ldexp(s, torch.tensor(shift))).to(torch.int64)
    return DyadicScale(M, shift)


# ----------------------------------------------------------------------------------------------
# Integer weights and exact integer matmuls
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntWeights:
    """A weight matrix as ``bits``-bit integer codes (rows x cols) and a dyadic scale.

    ``scale.multiplier`` has shape ``()`` (per-tensor) or ``(rows,)`` (per-channel); the deployed
    matrix is ``codes * M * 2^-S`` row by row (:meth:`dequantized`, exact in float64).
    """

    codes: torch.Tensor
    scale: DyadicScale
    bits: int
    granularity: str
    step_rule: str = "paper"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def row_multipliers(self) -> torch.Tensor:
        """int64 multiplier per row, shape ``(rows,)``."""
        return self.scale.multiplier.reshape(-1).expand(self.shape[0]).to(torch.int64)

    def dequantized(self) -> torch.Tensor:
        """The deployed matrix ``W~ = codes * M 2^-S`` in float64 (exact)."""
        s = self.scale.value().reshape(-1)
        s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
        return self.codes.to(torch.float64) * s

    def max_row_abs_sum(self) -> int:
        """``max_i sum_j |codes_ij|`` as a Python int (the matmul bound's weight factor)."""
        return int(self.codes.to(torch.int64).abs().sum(dim=1).max())


def quantize_weights(
    w: torch.Tensor,
    bits: int,
    granularity: str = "per-tensor",
    mult_bits: int = 24,
    step_rule: str = "paper",
) -> IntWeights:
    """Quantize ``w`` with the paper's quantizer (docs/theory.md section 2, ``step_rule`` paper or
    narrow) and make its step dyadic.

    Codes are those of :func:`monquant.quant.uniform.quantize`; the step ``D_b`` becomes ``M 2^-S``.
    """
    if w.dim() != 2:
        raise ConfigError(f"expected a matrix, got shape {tuple(w.shape)}")
    q = quantize(w.detach().to(torch.float64), bits, granularity, step_rule=step_rule)
    step = q.step.reshape(-1) if q.step.dim() else q.step
    return IntWeights(q.codes, dyadic_scale(step, mult_bits), q.bits, granularity, step_rule)


@dataclass(frozen=True)
class AccumulatorChoice:
    """Accumulator type of one integer matmul and the exact bound that decided it."""

    dtype: torch.dtype
    bound: int
    int32_would_overflow: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "bound": self.bound,
            "bound_log2": math.log2(self.bound) if self.bound > 0 else 0.0,
            "int32_would_overflow": self.int32_would_overflow,
        }


def matmul_bound(w: IntWeights, max_abs_input: int) -> int:
    """Exact bound ``max_i sum_j |C_ij| * max|c|`` on every entry of the product ``C c``."""
    return w.max_row_abs_sum() * int(max_abs_input)


def choose_accumulator(
    bound: int, accumulator: str = "auto", what: str = "matmul"
) -> AccumulatorChoice:
    """int32 when the bound fits (``<= 2^31 - 1``), else int64; never a type that could wrap.

    ``accumulator="int32"`` models strict int32 hardware: a bound above ``2^31 - 1`` raises
    :class:`IntegerOverflowError`. ``"int64"`` forces int64. Any bound above ``2^63 - 1`` raises.
    """
    if accumulator not in ACCUMULATORS:
        raise ConfigError(f"accumulator must be one of {ACCUMULATORS}, got {accumulator!r}")
    over32 = bound > INT32_MAX
    if bound > INT64_MAX:
        raise IntegerOverflowError(
            f"{what}: accumulator bound {bound} (2^{math.log2(bound):.1f}) exceeds int64"
        )
    if accumulator == "int32" and over32:
        raise IntegerOverflowError(
            f"{what}: int32 accumulator would overflow: |acc| can reach {bound} "
            f"(2^{math.log2(bound):.2f}) > 2^31 - 1; use fewer bits or an int64 accumulator"
        )
    use64 = accumulator == "int64" or over32
    return AccumulatorChoice(torch.int64 if use64 else torch.int32, bound, over32)


def int_matmul(x_codes: torch.Tensor, w: IntWeights, acc: AccumulatorChoice) -> torch.Tensor:
    """Row-layout integer product ``x C^T`` accumulated in ``acc.dtype``; returned as int64.

    Operands are widened to the accumulator type (an int8 matmul would accumulate in int8). The
    caller's bound (:func:`matmul_bound`) guarantees the result is exact.
    """
    return (x_codes.to(acc.dtype) @ w.codes.to(acc.dtype).T).to(torch.int64)
