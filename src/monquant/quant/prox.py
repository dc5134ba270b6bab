"""ProxQuant (Bai, Wang, Liberty, ICLR 2019): quantization by proximal operators.

Quantization grids
------------------
A :class:`Grid` is a finite, symmetric set of levels ``L(a)`` fixed by a scale ``a >= 0``:

- ``binary``:  ``L = {-a, +a}``, ``a = mean |w|`` (the minimizer of ``||w - a sign(w)||^2``)
- ``ternary``: ``L = {-a, 0, +a}``, ``a = mean |w|``
- ``uniform``: ``L = {k D : |k| <= 2^(b-1) - 1}``, ``D = 2 a / (2^b - 1)``, ``a = w_max = max |w|``

The uniform grid is monquant's quantizer (docs/theory.md section 2): ``nearest`` is exactly
``Q(w) = D clamp(round(w / D), -(2^(b-1) - 1), 2^(b-1) - 1)``. The scale is one number per tensor
(``per-tensor``) or one per row (``per-channel``: entry ``(i, ...)`` uses the scale of row ``i``,
computed over all the other dimensions; a tensor with fewer than two dimensions has a single
scale, as in :mod:`monquant.quantize`).

``nearest(w)`` is the projection onto ``L`` (hard quantization). Ties (``w`` exactly halfway between
two levels) are broken like ``torch.round`` in ``Q``, i.e. half to even: ``(k + 1/2) D`` goes to the
even one of ``k D, (k + 1) D`` (so ``+-D/2 -> 0``; for ternary ``+-a/2 -> 0``); for binary the only
tie is ``w = 0``, which goes to ``+a`` (``sign(0) = +1``, as :func:`monquant.quant.ste.binary_sign`). The
tie rule is odd-symmetric for ternary/uniform: ``nearest(-w) = -nearest(w)``.

Scale caveat: with ``a`` recomputed from its own output, hard quantization is not idempotent
(``max |Q(w)| = (2^(b-1) - 1) D < w_max``, and for ternary ``mean |Q(w)| < a`` once some entries
are 0), so repeatedly projecting/proxing with a freshly computed scale shrinks the grid
geometrically. :class:`ProxQuantizer` therefore holds the scales fixed in ``prox`` mode (see
``calibrate``).

W-shaped regularizers and their exact proximal operators
--------------------------------------------------------
``R1(x) = dist(x, L)`` (the W-shaped ``L1`` regularizer; for ``L = {-1, +1}`` it is ``| |x| - 1 |``)
and ``R2(x) = 1/2 dist(x, L)^2``. The prox of ``lam R`` at ``w`` is the (set of) minimizers of

    g(x) = 1/2 (x - w)^2 + lam R(x).

Although ``R`` is nonconvex, both proxes are available in closed form for *every* ``lam >= 0``.
Since ``dist(x, L) = min_l |x - l|``, ``g = min_l g_l`` with the convex
``g_l(x) = 1/2 (x - w)^2 + lam |x - l|`` (resp. ``lam/2 (x - l)^2``), so
``min_x g = min_l min_x g_l``. The inner minimum depends on ``l`` only through ``d = |w - l|``:

    L1:  min g_l = h1(d) = d^2 / 2            if d <= lam,    lam d - lam^2 / 2   otherwise
    L2:  min g_l = h2(d) = lam d^2 / (2 (1 + lam))

and both are strictly increasing in ``d``. Hence the best ``l`` is the level ``q`` nearest to ``w``
and the prox is the minimizer of ``g_q``:

    prox_l1(w) = q + sign(w - q) max(|w - q| - lam, 0)   (soft-threshold toward q, never past it)
    prox_l2(w) = (w + lam q) / (1 + lam)                  (shrink toward q)

Jumping to a farther level is never better, whatever ``lam``: the objective of landing on a level
``l`` is ``(w - l)^2 / 2 >= (w - q)^2 / 2``. The prox is unique except when ``w`` is equidistant
from two levels (both soft-thresholded points are minimizers); the selection made here follows the
tie rule of ``nearest``. Consequences, for every ``lam >= 0``:

- ``prox(w)`` lies in the closed segment ``[w, q]``: ``|prox_l1(w) - w| = min(lam, |w - q|)``,
  ``nearest(prox(w)) = nearest(w)`` (the prox never changes the hard-quantized value; only gradient
  steps can), and ``prox(w) w >= 0`` (the nearest level of ``w`` has the sign of ``w`` or is 0 since
  ``L = -L``): a weight never crosses zero. It can land on 0 only when ``q = 0`` (ternary/uniform,
  ``|w - q| <= lam`` for L1; never for L2 with finite ``lam`` unless ``w = 0``). For binary grids
  ``sign(prox(w)) = sign(w)`` exactly (with ``sign(0) = +1``).
- ``lam = 0`` is the identity; L1 with ``lam >= |w - q|`` and L2 with ``lam = inf`` give ``q``.

Training
--------
ProxQuant is the prox-gradient method ``w_{t+1} = prox_{eta_t lam_t R}(w_t - eta_t grad f(w_t))``
with a growing ``lam_t`` (:func:`lambda_schedule`, linear homotopy ``lam_t = lam_max t / T`` by
default); BinaryConnect/STE is the "lazy" variant that keeps latent floats ``w_t`` and evaluates the
gradient at ``nearest(w_t)``. :class:`ProxQuantizer` drives either around any optimizer, and
:func:`toy_binaryconnect_vs_proxquant` reproduces the paper's one-dimensional comparison.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from monquant.errors import MonquantError
from monquant.quant.ste import binary_sign
from monquant.quant.uniform import (
    MAX_BITS,
    MIN_BITS,
    QuantizationError,
    check_granularity,
    grid_codes,
)

__all__ = [
    "Grid",
    "LambdaSchedule",
    "ProxQuantError",
    "ProxQuantizer",
    "lambda_schedule",
    "prox",
    "prox_l1",
    "prox_l2",
]

GridKind = Literal["binary", "ternary", "uniform"]
Granularity = Literal["per-tensor", "per-channel"]
RegularizerKind = Literal["l1", "l2"]
Mode = Literal["prox", "lazy"]
ScheduleKind = Literal["linear", "constant", "exponential"]

GRID_KINDS: tuple[str, ...] = ("binary", "ternary", "uniform")
MAX_LISTED_LEVELS = 1 << 16


class ProxQuantError(MonquantError, ValueError):
    """Invalid ProxQuant request: bad grid, scale, lambda, schedule, mode or non-finite input."""


# ----------------------------------------------------------------------------- validation helpers


def _check_tensor(name: str, w: object) -> torch.Tensor:
    """Require a non-empty floating-point tensor with only finite entries."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ProxQuantError(f"{name} must be a floating-point tensor, got {type(w).__name__}")
    if w.numel() == 0:
        raise ProxQuantError(f"{name} is empty")
    if not bool(torch.isfinite(w).all()):
        raise ProxQuantError(f"{name} has NaN or inf entries")
    return w


def _check_lam(lam: object, name: str = "lam") -> float:
    """Require a real ``lam >= 0`` (``inf`` allowed: the projection)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ProxQuantError(f"{name} must be a real number >= 0, got {lam!r}")
    value = float(lam)
    if math.isnan(value) or value < 0:
        raise ProxQuantError(f"{name} must be a real number >= 0, got {lam!r}")
    return value


def _check_bits(kind: str, bits: object) -> int | None:
    """``bits`` must be None for binary/ternary and a whole number in [2, 32] for uniform."""
    if kind != "uniform":
        if bits is not None:
            raise ProxQuantError(f"a {kind} grid takes no bit-width (bits=None), got {bits!r}")
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ProxQuantError(
            f"a uniform grid needs an integer bit-width in [{MIN_BITS}, {MAX_BITS}], got {bits!r}"
        )
    return bits


def _check_step(step: object) -> int:
    if isinstance(step, bool):
        raise ProxQuantError(f"step must be an integer >= 0, got {step!r}")
    try:
        t = int(step)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ProxQuantError(f"step must be an integer >= 0, got {step!r}") from None
    if t != step or t < 0:
        raise ProxQuantError(f"step must be an integer >= 0, got {step!r}")
    return t


# ----------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """A symmetric quantization grid ``L(a)`` (see the module docstring for the levels and scales).

    ``kind``: ``"binary"`` ``{-a, a}``, ``"ternary"`` ``{-a, 0, a}`` or ``"uniform"``
    ``{k D : |k| <= 2^(b-1) - 1}`` with ``D = 2a / (2^b - 1)``; ``bits`` (uniform only, 2..32);
    ``granularity``: ``"per-tensor"`` or ``"per-channel"`` (one scale per row; the vocabulary of
    :mod:`monquant.quant.uniform`, whose ``check_granularity`` also accepts ``"per-row"``).
    """

    kind: GridKind = "uniform"
    bits: int | None = None
    granularity: Granularity = "per-tensor"

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise ProxQuantError(f"unknown grid kind {self.kind!r}; choose one of {GRID_KINDS}")
        _check_bits(self.kind, self.bits)
        try:
            gran = check_granularity(self.granularity)
        except QuantizationError as exc:
            raise ProxQuantError(str(exc)) from None
        object.__setattr__(self, "granularity", gran)

    @property
    def max_index(self) -> int:
        """Largest index ``K``: the levels are ``k * spacing`` (ternary/uniform), ``|k| <= K``."""
        return 1 if self.bits is None else 2 ** (self.bits - 1) - 1

    @property
    def num_levels(self) -> int:
        """``|L|``: 2 (binary), 3 (ternary), ``2^b - 1`` (uniform)."""
        return 2 if self.kind == "binary" else 2 * self.max_index + 1

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The scale ``a``: ``mean |w|`` (binary, ternary) or ``max |w|`` (uniform).

        Shape ``()`` per tensor, or ``(rows, 1, ..., 1)`` per row; no gradient flows through it.
        """
        a = _check_tensor("w", w).detach().abs()
        reduce = torch.amax if self.kind == "uniform" else torch.mean
        if self.granularity == "per-tensor" or a.dim() < 2:
            return reduce(a)
        return reduce(a.reshape(a.shape[0], -1), dim=1).reshape(-1, *([1] * (a.dim() - 1)))

    def spacing(self, scale: torch.Tensor) -> torch.Tensor:
        """Distance between adjacent levels: ``2a`` (binary), ``a`` (ternary), ``D`` (uniform)."""
        if self.kind == "binary":
            return 2.0 * scale
        if self.kind == "ternary":
            return scale
        return 2.0 * scale / (2**self.bits - 1)  # type: ignore[operator]

    def levels(self, scale: torch.Tensor | float) -> torch.Tensor:
        """All levels, sorted, along a new last dimension (shape ``scale.shape + (|L|,)``)."""
        if self.num_levels > MAX_LISTED_LEVELS:
            raise ProxQuantError(f"refusing to list {self.num_levels} levels")
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        s = s if s.is_floating_point() else s.to(torch.get_default_dtype())
        if self.kind == "binary":
            ks = torch.tensor([-0.5, 0.5], dtype=s.dtype, device=s.device)
        else:
            ks = torch.arange(-self.max_index, self.max_index + 1, dtype=s.dtype, device=s.device)
        return self.spacing(s).unsqueeze(-1) * ks

    def _resolve_scale(self, w: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
        """Validate a given scale (finite, ``>= 0``, broadcastable to ``w``) or compute one."""
        if scale is None:
            return self.scale(w)
        s = torch.as_tensor(scale, dtype=w.dtype, device=w.device)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ProxQuantError("scale must be finite and >= 0")
        try:
            shape = torch.broadcast_shapes(s.shape, w.shape)
        except RuntimeError:
            shape = None
        if shape != w.shape:
            raise ProxQuantError(f"scale of shape {tuple(s.shape)} does not fit w {tuple(w.shape)}")
        return s

    def nearest(self, w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Projection of every entry onto ``L(scale)`` (hard quantization; ties as documented).

        ``scale=None`` uses ``self.scale(w)``. A zero scale maps everything to 0.
        """
        w = _check_tensor("w", w)
        s = self._resolve_scale(w, scale)
        return self._nearest(w.detach(), s)

    def _nearest(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "binary":
            return s * binary_sign(w)
        d = self.spacing(s)
        return grid_codes(w, d, self.max_index) * d

    def distance(self, w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Entrywise ``dist(w, L(scale)) = |w - nearest(w)|`` (the W-shaped regularizer ``R1``)."""
        return (w.detach() - self.nearest(w, scale)).abs()


# ------------------------------------------------------------------------------------ prox maps


def _prox_inputs(
    w: torch.Tensor, lam: float, grid: Grid, scale: torch.Tensor | float | None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Validate and return ``(w, lam, q)`` with ``q = nearest(w)``."""
    w = _check_tensor("w", w).detach()
    lam = _check_lam(lam)
    if not isinstance(grid, Grid):
        raise ProxQuantError(f"grid must be a Grid, got {type(grid).__name__}")
    return w, lam, grid.nearest(w, scale)


def _onto_segment(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` to the segment ``[w, q]``: exact in real arithmetic, it removes the one-ulp
    overshoots of floating point, so the guarantees (no zero crossing, ``nearest`` unchanged) hold
    bit for bit."""
    return torch.minimum(torch.maximum(x, torch.minimum(w, q)), torch.maximum(w, q))


def prox_l1(
    w: torch.Tensor, lam: float, grid: Grid, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Exact prox of ``lam dist(., L)``: ``q + sign(w - q) max(|w - q| - lam, 0)``, q = nearest(w).

    Each entry moves toward its nearest level by ``min(lam, |w - q|)`` and stops on it. This is the
    global minimizer of ``1/2 (x - w)^2 + lam dist(x, L)`` for every ``lam >= 0`` (see the module
    docstring).
    """
    w, lam, q = _prox_inputs(w, lam, grid, scale)
    r = w - q
    return _onto_segment(torch.where(r.abs() <= lam, q, w - torch.sign(r) * lam), w, q)


def prox_l2(
    w: torch.Tensor, lam: float, grid: Grid, scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Exact prox of ``lam/2 dist(., L)^2``: ``(w + lam q) / (1 + lam)``, ``q = nearest(w)``.

    ``lam = inf`` returns ``q`` (the projection). Global minimizer of
    ``1/2 (x - w)^2 + lam/2 dist(x, L)^2`` for every ``lam >= 0`` (module docstring).
    """
    w, lam, q = _prox_inputs(w, lam, grid, scale)
    if math.isinf(lam):
        return q
    return _onto_segment((w + lam * q) / (1.0 + lam), w, q)


def prox(
    w: torch.Tensor,
    lam: float,
    grid: Grid,
    scale: torch.Tensor | float | None = None,
    regularizer: RegularizerKind = "l1",
) -> torch.Tensor:
    """Dispatch to :func:`prox_l1` or :func:`prox_l2`."""
    if regularizer == "l1":
        return prox_l1(w, lam, grid, scale)
    if regularizer == "l2":
        return prox_l2(w, lam, grid, scale)
    raise ProxQuantError(f"unknown regularizer {regularizer!r}; choose 'l1' or 'l2'")


# ------------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class LambdaSchedule:
    """``step -> lam_t`` for ``t`` clamped to ``[0, T]``:

    - linear:      ``lam_t = lam_max t / T`` (the homotopy of the paper)
    - constant:    ``lam_t = lam_max``
    - exponential: ``lam_t = lam_min (lam_max / lam_min)^(t / T)`` (geometric)
    """

    kind: ScheduleKind
    lam_max: float
    total_steps: int
    lam_min: float

    def __call__(self, step: int) -> float:
        frac = min(_check_step(step), self.total_steps) / self.total_steps
        if self.kind == "linear":
            return self.lam_max * frac
        if self.kind == "constant":
            return self.lam_max
        return self.lam_min * (self.lam_max / self.lam_min) ** frac


def lambda_schedule(
    kind: ScheduleKind = "linear",
    *,
    lam_max: float,
    total_steps: int,
    lam_min: float | None = None,
) -> LambdaSchedule:
    """Build a :class:`LambdaSchedule` (``lam_min``: exponential only, default ``lam_max/1000``)."""
    if kind not in ("linear", "constant", "exponential"):
        raise ProxQuantError(f"unknown schedule {kind!r}; choose linear, constant or exponential")
    lam_max = _check_lam(lam_max, "lam_max")
    if math.isinf(lam_max):
        raise ProxQuantError("lam_max must be finite")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ProxQuantError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    lo = lam_max / 1000.0 if lam_min is None else _check_lam(lam_min, "lam_min")
    if kind == "exponential" and not 0 < lo <= lam_max:
        raise ProxQuantError(f"exponential needs 0 < lam_min <= lam_max, got {lo}, {lam_max}")
    return LambdaSchedule(kind, lam_max, total_steps, lo)


# ------------------------------------------------------------------------- trainer-agnostic API


class _STEQuant(torch.autograd.Function):
    """Forward: the given hard-quantized tensor; backward: identity (optionally masked)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None):  # type: ignore[override]
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.masked = mask is not None
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.masked:
            (mask,) = ctx.saved_tensors
            grad = grad * mask.to(grad.dtype)
        return grad, None, None


@dataclass
class _Entry:
    param: torch.Tensor
    grid: Grid
    scale: torch.Tensor | None = None
    frozen: bool = False
    hook: object | None = None


class ProxQuantizer:
    """Drive ProxQuant (``mode="prox"``) or BinaryConnect/STE (``mode="lazy"``) beside an optimizer.

    ``params``: ``(parameter, Grid)`` pairs; ``schedule``: ``step -> lam_t`` (needed in prox mode).
    ``regularizer``: ``"l1"`` (``R = dist(w, L)``) or ``"l2"`` (``R = 1/2 dist(w, L)^2``).

    - prox: the forward pass uses the float weights; after every optimizer step call
      ``after_step(step, lr)``, which applies ``w <- prox_{lr lam_t R}(w)`` in place (pass the
      learning rate ``eta_t`` to get the prox-gradient method exactly; ``lr=1`` applies ``lam_t``
      as the absolute prox strength).
    - lazy: the float weights are latent; the forward pass uses ``quantized(param)`` (hard-quantized
      values, identity gradient = straight-through); ``after_step`` leaves them alone.

    Scales: ``dynamic_scale`` (default: True in lazy mode, False in prox mode) recomputes ``a`` from
    the current weights at every use (as QAT does); otherwise the scales are computed at
    construction and refreshed only by :meth:`calibrate`. Proxing with a dynamic scale shrinks the
    grid (module docstring), hence the default. ``ste_clip`` zeroes the STE gradient where
    ``|w| > a``.

    ``freeze()`` hard-quantizes every parameter with its current scale, which is then kept; frozen
    parameters get a gradient hook returning zeros and are re-projected by every ``after_step``
    (needed: momentum and weight decay still move a parameter whose gradient is zero).
    """

    def __init__(
        self,
        params: Iterable[tuple[torch.Tensor, Grid]],
        schedule: Callable[[int], float] | None = None,
        *,
        regularizer: RegularizerKind = "l1",
        mode: Mode = "prox",
        dynamic_scale: bool | None = None,
        ste_clip: bool = False,
    ) -> None:
        if regularizer not in ("l1", "l2"):
            raise ProxQuantError(f"unknown regularizer {regularizer!r}; choose 'l1' or 'l2'")
        if mode not in ("prox", "lazy"):
            raise ProxQuantError(f"unknown mode {mode!r}; choose 'prox' or 'lazy'")
        if mode == "prox" and schedule is None:
            raise ProxQuantError("prox mode needs a lambda schedule")
        self.schedule = schedule
        self.regularizer: RegularizerKind = regularizer
        self.mode: Mode = mode
        self.dynamic_scale = (mode == "lazy") if dynamic_scale is None else bool(dynamic_scale)
        self.ste_clip = ste_clip
        self._entries = [self._make_entry(p, g) for p, g in params]
        if not self._entries:
            raise ProxQuantError("no parameters given")
        self._by_id = {id(e.param): e for e in self._entries}
        if len(self._by_id) != len(self._entries):
            raise ProxQuantError("a parameter is listed twice")
        self.calibrate()

    @staticmethod
    def _make_entry(param: torch.Tensor, grid: Grid) -> _Entry:
        if not isinstance(param, torch.Tensor) or not isinstance(grid, Grid):
            raise ProxQuantError("params must be (tensor, Grid) pairs")
        _check_tensor("parameter", param)
        return _Entry(param, grid)

    @property
    def params(self) -> list[torch.Tensor]:
        """The managed parameters, in the order given."""
        return [e.param for e in self._entries]

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` has been called."""
        return all(e.frozen for e in self._entries)

    def _entry(self, param: torch.Tensor) -> _Entry:
        entry = self._by_id.get(id(param))
        if entry is None:
            raise ProxQuantError("this parameter is not managed by the ProxQuantizer")
        return entry

    def calibrate(self) -> None:
        """(Re)compute and store the scale of every non-frozen parameter from its current values."""
        for e in self._entries:
            if not e.frozen:
                e.scale = e.grid.scale(e.param)

    def scale_of(self, param: torch.Tensor) -> torch.Tensor:
        """The scale currently in force for ``param`` (frozen, stored or freshly computed)."""
        e = self._entry(param)
        if e.frozen or not self.dynamic_scale:
            return e.scale  # type: ignore[return-value]
        return e.grid.scale(e.param)

    def lam(self, step: int) -> float:
        """``lam_t`` of the schedule (0 without one)."""
        return 0.0 if self.schedule is None else _check_lam(self.schedule(step))

    def quantized(self, param: torch.Tensor) -> torch.Tensor:
        """``nearest(param)`` in the forward pass with a straight-through (identity) backward.

        The scale is a constant here. With ``ste_clip`` the gradient is zero where ``|w| > a``.
        """
        e = self._entry(param)
        s = self.scale_of(param)
        q = e.grid.nearest(param, s)
        mask = (param.detach().abs() <= s) if self.ste_clip else None
        return _STEQuant.apply(param, q, mask)

    def forward_weight(self, param: torch.Tensor) -> torch.Tensor:
        """The forward-pass weight: ``param`` (prox mode, frozen) or ``quantized(param)`` (lazy)."""
        e = self._entry(param)
        if self.mode == "prox" or e.frozen:
            return param
        return self.quantized(param)

    @torch.no_grad()
    def after_step(self, step: int, lr: float = 1.0) -> None:
        """Call after each optimizer step: prox (prox mode); re-projection of frozen parameters."""
        strength = _check_lam(lr, "lr") * self.lam(step) if self.mode == "prox" else 0.0
        for e in self._entries:
            s = self.scale_of(e.param)
            if e.frozen:
                e.param.copy_(e.grid.nearest(e.param, s))
            elif self.mode == "prox":
                e.param.copy_(prox(e.param, strength, e.grid, s, self.regularizer))

    @torch.no_grad()
    def freeze(self) -> None:
        """Hard-quantize every parameter onto its grid, keep its scale, zero its future grads."""
        for e in self._entries:
            if e.frozen:
                continue
            e.scale = self.scale_of(e.param)
            e.param.copy_(e.grid.nearest(e.param, e.scale))
            e.frozen = True
            if e.param.requires_grad:
                e.hook = e.param.register_hook(torch.zeros_like)

    def zero_frozen_grads(self) -> None:
        """Zero the ``.grad`` of frozen parameters (redundant with the hook; for foreign grads)."""
        for e in self._entries:
            if e.frozen and e.param.grad is not None:
                e.param.grad.zero_()

    def on_grid(self) -> list[float]:
        """Max entrywise distance of each parameter to its grid (0.0 means exactly quantized)."""
        return [
            float(e.grid.distance(e.param, self.scale_of(e.param)).max()) for e in self._entries
        ]

    def penalty(self) -> float:
        """Total regularizer ``sum R(w)`` over the parameters (``lam_t`` not included)."""
        total = 0.0
        for e in self._entries:
            d = e.grid.distance(e.param, self.scale_of(e.param))
            total += float(d.sum() if self.regularizer == "l1" else 0.5 * (d * d).sum())
        return total
