"""Integer-arithmetic forward-backward iteration of a quantized MonDEQ (Corollary 2 made real).

The deployed operator
---------------------
Everything the integer program touches is an exact dyadic rational, so the real-arithmetic map it
implements is known exactly and its equilibrium ``z~*`` can be computed in float64 for comparison:

- weights    ``W~ = s_W C_W``: integer codes ``C_W`` (``b`` bits, :func:`monquant.quant.uniform.quantize`)
  and a dyadic scale ``s_W = M_W 2^-S_W`` (an integer multiplier ``M_W`` of ``mult_bits`` bits, per
  tensor or per row). ``s_W`` approximates the quantizer's step ``D_b`` to relative ``2^-mult_bits``;
  the certificate of the deployed operator is computed for this exact ``W~``;
- iterate    ``z = 2^-f c``: unsigned fixed point (relu outputs are ``>= 0``) with ``bits`` bits and
  ``f`` fractional bits (:class:`FixedPointFormat`);
- injection  ``q~ = 2^-G Q``, one int64 vector ``Q`` per sample: from a float ``q`` rounded to the
  grid ``2^-G``, or in integers from ``U`` codes and input codes ``c_x`` (format ``2^-h``):
  ``Q = M_U (C_U c_x) + c_b`` with ``G = S_U + h`` and the bias ``c_b = round(b 2^G)``;
- step       ``a = 2^-k`` (:func:`power_of_two_step`).

One iteration in real arithmetic is the FB map whose fixed point is ``z~*``:

    T~(z) = relu((1 - a) z + a (W~ z + q~)).

With ``E = max(k + f, k + S_W + f, k + G)`` every term times ``2^E`` is an integer:

    N = ((2^k - 1) c) << (E - k - f)  +  (M_W (C_W c)) << (E - k - S_W - f)  +  Q << (E - k - G),
    T~(z) = 2^-E max(N, 0)                                               (exactly).

Requantization to the activation grid (relu, round half up by a shift ``r = E - f``, saturate):

    c+ = min((max(N, 0) + 2^(r-1)) >> r,  2^bits - 1).

So ``z+ = T~(z) + e`` with ``e = 2^-E ((c+ << r) - max(N, 0))``, which the solver evaluates exactly in
int64: ``|e_i| <= 2^-f / 2`` unless saturated, hence ``||e|| <= sqrt(n) 2^-f / 2``.

Corollary 2 then bounds the integer iterates (``rho`` = FB modulus of ``W~`` at step ``a``):
``||z_K - z~*|| <= rho^K ||z_0 - z~*|| + sum_{j<K} rho^(K-1-j) ||e_j||``, a ball of radius
``e_max / (1 - rho)`` in the limit. An iterate that *settled* (``c+ = c``: a fixed point of the
integer map) satisfies ``z = T~(z) + e``, hence ``||z - z~*|| <= ||e|| / (1 - rho)``: a certified error
radius with no float solve at all.

Overflow
--------
Before any product is formed, an exact (Python-integer) bound on every intermediate decides the
types: the matmul accumulator ``|C c|_i <= max_i sum_j |C_ij| * max|c|`` runs in int32 when the bound
fits, otherwise in int64 (reported as ``int32_would_overflow``); with ``accumulator="int32"`` (strict
int32 hardware) such a case raises :class:`IntegerOverflowError`. The requantization sum ``N`` is
int64 and its bound is checked likewise. Nothing is ever allowed to wrap silently (torch integer
matmuls do wrap).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from monquant.deploy.fixedpoint import (
    INT64_MAX,
    AccumulatorChoice,
    FixedPointFormat,
    IntegerOverflowError,
    IntWeights,
    choose_accumulator,
    int_matmul,
    matmul_bound,
)
from monquant.errors import ConfigError, MonquantError
from monquant.operators import check_weight
from monquant.solvers import SolverConfig, SolverResult, solve
from monquant.verified import SpectralBounds, modulus_upper_bound, spectral_bounds

__all__ = [
    "Injection",
    "IntFBSolver",
    "IntSolveResult",
    "PowerOfTwoStep",
    "RequantPlan",
    "UncertifiedOperatorError",
    "bias_codes",
    "deployed_bounds",
    "deployed_radius",
    "injection_bound",
    "injection_from_codes",
    "injection_from_float",
    "power_of_two_step",
    "reference_equilibrium",
]


class UncertifiedOperatorError(MonquantError, ValueError):
    """The quantized operator has no certified power-of-two FB step (``margin(W~) <= 0`` or none)."""


# ----------------------------------------------------------------------------------------------
# The power-of-two step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerOfTwoStep:
    """FB step ``a = 2^-shift`` and its certified modulus ``rho = sqrt(1 - 2 a m + a^2 L^2)``."""

    shift: int
    step: float
    rho: float


def power_of_two_step(m: float, L: float, max_shift: int = 60) -> PowerOfTwoStep | None:
    """The certified power-of-two FB step with the smallest modulus (``None`` if none exists).

    ``m`` and ``L`` must be a proved lower bound on ``margin(W~)`` and a proved upper bound on
    ``L(W~)`` (:class:`monquant.verified.SpectralBounds` ``m_lo``, ``L_hi``); the modulus is then a
    proved upper bound (:func:`monquant.verified.modulus_upper_bound`, rounded outward, ``< 1``).

    Rule: FB is a certified contraction iff ``0 < a < 2 m / L^2``. ``rho(a)^2 = 1 - 2 a m + a^2 L^2``
    is a parabola with its minimum at ``m / L^2``, so among the steps ``2^-k`` (``k >= 0``, so that
    ``1 - a >= 0``) the best is one of the two powers of two bracketing ``m / L^2``: ``2^-k1 <= m/L^2
    < 2^-(k1-1)``. Both lie in ``(0, 2 m / L^2]``; the one with the smaller certified modulus wins (the
    larger power is rejected if it reaches ``2 m / L^2``, where ``rho = 1``). Returns ``None`` when
    ``m <= 0`` or ``k1 > max_shift``.
    """
    if not (m > 0 and L > 0 and math.isfinite(m) and math.isfinite(L)):
        return None
    target = m / L**2
    k1 = max(0, math.ceil(-math.log2(target)))
    while k1 > 0 and math.ldexp(1.0, -(k1 - 1)) <= target:  # floating-point guards
        k1 -= 1
    while math.ldexp(1.0, -k1) > target and k1 <= max_shift:
        k1 += 1
    best: PowerOfTwoStep | None = None
    for k in (k1 - 1, k1):
        if not 0 <= k <= max_shift:
            continue
        a = math.ldexp(1.0, -k)
        rho = modulus_upper_bound("fb", a, m, L)
        if rho is not None and (best is None or rho < best.rho):
            best = PowerOfTwoStep(k, a, rho)
    return best


# ----------------------------------------------------------------------------------------------
# Injections q~ = 2^-G Q
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """Per-sample injection ``q~ = 2^-frac_bits Q`` with int64 ``Q`` of shape ``(batch, n)``."""

    Q: torch.Tensor
    frac_bits: int

    def value(self) -> torch.Tensor:
        """``q~`` in float64 (rounded only when ``|Q| >= 2^53``: relative ``1e-16``)."""
        return torch.ldexp(self.Q.to(torch.float64), torch.tensor(-self.frac_bits))

    def max_abs(self) -> int:
        return int(self.Q.abs().max()) if self.Q.numel() else 0


def _max_abs(t: torch.Tensor) -> float | int:
    """``max |t|`` as a Python number (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0


def _round_to_int64(v: torch.Tensor, frac_bits: int, what: str) -> torch.Tensor:
    scaled = torch.round(torch.ldexp(v.detach().to(torch.float64), torch.tensor(frac_bits)))
    if not bool(torch.isfinite(scaled).all()) or _max_abs(scaled) >= 2.0**63:
        raise IntegerOverflowError(f"{what} does not fit int64 at 2^-{frac_bits}")
    return scaled.to(torch.int64)


def injection_from_float(q: torch.Tensor, frac_bits: int) -> Injection:
    """Round a float injection ``q = U x + b`` (``(batch, n)``) to the grid ``2^-frac_bits``."""
    return Injection(_round_to_int64(q, frac_bits, "injection"), int(frac_bits))


def bias_codes(b: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The bias as int64 codes ``round(b 2^G)`` on the injection grid ``2^-G``."""
    return _round_to_int64(b.reshape(-1), frac_bits, "bias")


def injection_bound(U: IntWeights, x_format: FixedPointFormat, b_codes: torch.Tensor) -> int:
    """Exact bound ``max|C_U c_x| max|M_U| + max|c_b|`` on ``|Q|`` over *every* input in range."""
    acc = matmul_bound(U, x_format.max_abs_code)
    return acc * U.scale.max_multiplier + int(_max_abs(b_codes.reshape(-1)))


def injection_from_codes(
    U: IntWeights,
    x_codes: torch.Tensor,
    x_format: FixedPointFormat,
    b_codes: torch.Tensor,
    accumulator: str = "auto",
) -> tuple[Injection, AccumulatorChoice]:
    """Integer injection ``Q = M_U (C_U c_x) + c_b`` on the grid ``2^-G``, ``G = S_U + h``.

    ``x_codes`` are input codes (``(batch, d)``) in ``x_format`` (``h`` fractional bits) and
    ``b_codes`` the bias from :func:`bias_codes` at ``frac_bits = G``. Exactly
    ``q~ = U~ x~ + b~`` with ``U~ = C_U M_U 2^-S_U``, ``x~ = 2^-h c_x``, ``b~ = 2^-G c_b``.
    The matmul accumulator and the int64 sum are checked (:func:`injection_bound`) beforehand.
    """
    if bool((x_codes < x_format.code_min).any()) or bool((x_codes > x_format.code_max).any()):
        raise ConfigError("input codes lie outside their format's range")
    acc = choose_accumulator(matmul_bound(U, x_format.max_abs_code), accumulator, "U x")
    total = injection_bound(U, x_format, b_codes)
    if total > INT64_MAX:
        raise IntegerOverflowError(f"injection M_U (C_U c_x) + c_b can reach {total} > 2^63 - 1")
    Q = int_matmul(x_codes, U, acc) * U.row_multipliers() + b_codes.reshape(-1).to(torch.int64)
    return Injection(Q, U.scale.shift + x_format.frac_bits), acc


# ----------------------------------------------------------------------------------------------
# The integer FB solver
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequantPlan:
    """Shifts of one integer FB step on the common grid ``2^-E`` (see the module docstring).

    ``shift_z = E - k - f``, ``shift_w = E - k - S_W - f``, ``shift_q = E - k - G`` and the
    rounding shift ``r = E - f``; ``bound`` is the exact bound on ``|N| + 2^(r-1)`` and on
    ``c_max << r`` that was checked against ``2^63 - 1``.
    """

    E: int
    shift_z: int
    shift_w: int
    shift_q: int
    round_shift: int
    bound: int

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dataclasses.asdict(self)
        d["bound_log2"] = math.log2(self.bound) if self.bound > 0 else 0.0
        return d


def _requant_plan(
    k: int, f: int, S_w: int, G: int, z_max: int, acc_bound: int, M_max: int, Q_max: int
) -> RequantPlan:
    """Exponents and shifts of ``N`` and the int64 check of its exact bound."""
    E = max(k + f, k + S_w + f, k + G)
    sz, sw, sq, r = E - k - f, E - k - S_w - f, E - k - G, E - f
    t_z = (((1 << k) - 1) * z_max) << sz
    t_w = (M_max * acc_bound) << sw
    t_q = Q_max << sq
    bound = max(t_z + t_w + t_q + ((1 << (r - 1)) if r > 0 else 0), z_max << r)
    if bound > INT64_MAX:
        raise IntegerOverflowError(
            "requantization sum N could overflow int64: bound 2^"
            f"{math.log2(bound):.2f} (terms: (1-a) z 2^{math.log2(max(t_z, 1)):.1f}, "
            f"a W~ z 2^{math.log2(max(t_w, 1)):.1f}, a q 2^{math.log2(max(t_q, 1)):.1f}); "
            "use fewer multiplier, activation or injection bits"
        )
    return RequantPlan(E, sz, sw, sq, r, bound)


def _fallback_shift(L: float) -> int:
    """Power of two at or below ``1 / max(L, 1)^2`` (an uncertified operator has no good step)."""
    return max(0, math.ceil(2.0 * math.log2(max(L, 1.0))))


@dataclass
class IntSolveResult:
    """Outcome of one batched integer FB solve (one entry per sample).

    ``iterations``: map applications until the iterate settled (``c+ = c``) or ``max_iter``;
    ``saturated``: activation entries clipped at the top of the range, summed over steps;
    ``e_max`` / ``e_last``: largest and last per-step error ``||e_j||`` (exact, float64);
    ``cor2_bound``: ``rho^K d_0 + sum_j rho^(K-1-j) ||e_j||`` when an initial distance ``d_0`` was
    given. Radii are ``inf`` when the operator is not certified.
    """

    codes: torch.Tensor
    act: FixedPointFormat
    iterations: torch.Tensor
    settled: torch.Tensor
    saturated: torch.Tensor
    e_max: torch.Tensor
    e_last: torch.Tensor
    rho: float | None
    cor2_bound: torch.Tensor | None
    plan: RequantPlan
    max_iter: int

    @property
    def z(self) -> torch.Tensor:
        """The integer iterate as real numbers ``2^-f c`` (float64)."""
        return self.act.decode(self.codes)

    def _over_gap(self, e: torch.Tensor) -> torch.Tensor:
        if self.rho is None or not self.rho < 1.0:
            return torch.full_like(e, math.inf)
        return e / (1.0 - self.rho)

    @property
    def predicted_radius(self) -> torch.Tensor:
        """Corollary 2's ball for a constant error: ``e_max / (1 - rho)`` per sample."""
        return self._over_gap(self.e_max)

    @property
    def certified_radius(self) -> torch.Tensor:
        """``||e|| / (1 - rho)`` for settled samples (a rigorous bound on ``||z - z~*||``), else inf."""
        r = self._over_gap(self.e_last)
        return torch.where(self.settled, r, torch.full_like(r, math.inf))

    def per_sample(self) -> list[dict[str, Any]]:
        """One plain dict per sample (JSON-ready)."""
        cols = {
            "iterations": self.iterations.tolist(),
            "settled": self.settled.tolist(),
            "saturated": self.saturated.tolist(),
            "e_max": self.e_max.tolist(),
            "e_last": self.e_last.tolist(),
            "certified_radius": self.certified_radius.tolist(),
        }
        return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]

    def summary(self) -> dict[str, Any]:
        it = self.iterations.to(torch.float64)
        return {
            "samples": int(self.codes.shape[0]),
            "rho": self.rho,
            "max_iter": self.max_iter,
            "mean_iterations": float(it.mean()) if it.numel() else 0.0,
            "max_iterations": int(self.iterations.max()) if it.numel() else 0,
            "settled_fraction": float(self.settled.to(torch.float64).mean()) if it.numel() else 1.0,
            "saturated_entries": int(self.saturated.sum()),
            "e_max": float(self.e_max.max()) if it.numel() else 0.0,
        }


@dataclass
class IntFBSolver:
    """Integer forward-backward iteration for a fixed deployed ``W~`` and activation format.

    Build it with :meth:`build`, which certifies the operator, picks the power-of-two step and the
    accumulator type; :meth:`solve` runs the iteration for a batch of injections.
    """

    W: IntWeights
    act: FixedPointFormat
    step: PowerOfTwoStep
    stats: SpectralBounds
    certified: bool
    max_iter: int
    accumulator: AccumulatorChoice

    @property
    def rho(self) -> float | None:
        return self.step.rho if self.certified else None

    @classmethod
    def build(
        cls,
        W: IntWeights,
        act: FixedPointFormat,
        *,
        max_iter: int = 2000,
        step_shift: int | None = None,
        accumulator: str = "auto",
        allow_uncertified: bool = False,
        stats: SpectralBounds | None = None,
    ) -> IntFBSolver:
        """Certify ``W~``, choose the step and the accumulator; refuse an uncertified operator.

        The step is ``2^-step_shift`` when given (then it must itself be certified), else
        :func:`power_of_two_step`. ``allow_uncertified=True`` builds anyway, with ``certified=False``
        and no modulus (every radius is then ``inf``): for experiments that show what happens.
        """
        if act.signed:
            raise ConfigError("the iterate format must be unsigned: relu outputs are >= 0")
        if W.shape[0] != W.shape[1]:
            raise ConfigError(f"W must be square, got {W.shape}")
        if int(max_iter) < 1:
            raise ConfigError("max_iter must be >= 1")
        st = stats if stats is not None else deployed_bounds(W)
        step, certified = cls._select_step(st, step_shift)
        if not certified and not allow_uncertified:
            raise UncertifiedOperatorError(
                f"the quantized operator is not certified: margin(W~) = {st.m:.4g} (proved "
                f"{st.m_lo:.4g} <= margin(W~) <= {st.m_hi:.4g}: {st.verdict}), "
                f"L(W~) <= {st.L_hi:.4g}, "
                + (
                    "no power-of-two step 2^-k < 2 m / L^2 exists"
                    if step_shift is None
                    else f"step 2^-{step_shift} is not below 2 m / L^2"
                )
            )
        acc = choose_accumulator(matmul_bound(W, act.code_max), accumulator, "W z")
        return cls(W, act, step, st, certified, int(max_iter), acc)

    @staticmethod
    def _select_step(st: SpectralBounds, step_shift: int | None) -> tuple[PowerOfTwoStep, bool]:
        if step_shift is None:
            best = power_of_two_step(st.m_lo, st.L_hi)
            if best is not None:
                return best, True
            step_shift = _fallback_shift(st.L_hi)
        if int(step_shift) < 0:
            raise ConfigError(f"step_shift must be >= 0, got {step_shift}")
        a = math.ldexp(1.0, -int(step_shift))
        rho = modulus_upper_bound("fb", a, st.m_lo, st.L_hi)
        ok = rho is not None
        return PowerOfTwoStep(int(step_shift), a, rho if ok else math.inf), ok

    def plan(self, inj: Injection) -> RequantPlan:
        """The shifts for this injection, after the exact int64 overflow check."""
        return self.plan_for(inj.frac_bits, inj.max_abs())

    def plan_for(self, q_frac_bits: int, q_max_abs: int) -> RequantPlan:
        """The shifts for injections on the grid ``2^-q_frac_bits`` with ``|Q| <= q_max_abs``.

        Raises :class:`IntegerOverflowError` when the requantization sum could leave int64.
        """
        return _requant_plan(
            self.step.shift,
            self.act.frac_bits,
            self.W.scale.shift,
            int(q_frac_bits),
            self.act.code_max,
            self.accumulator.bound,
            self.W.scale.max_multiplier,
            int(q_max_abs),
        )

    def report(self) -> dict[str, Any]:
        """Settings and checks (JSON-ready): step, modulus, formats, accumulator."""
        return {
            "certified": self.certified,
            "margin_quantized": self.stats.m,
            "L_quantized": self.stats.L,
            "margin_quantized_lower": self.stats.m_lo,
            "L_quantized_upper": self.stats.L_hi,
            "verdict": self.stats.verdict,
            "step_shift": self.step.shift,
            "step": self.step.step,
            "rho": self.rho,
            "max_iter": self.max_iter,
            "activation_format": self.act.to_dict(),
            "accumulator": self.accumulator.as_dict(),
            "error_per_step_a_priori": math.sqrt(self.W.shape[0]) * self.act.scale / 2.0,
        }

    def _check_batch(self, inj: Injection, init: torch.Tensor | None) -> None:
        n = self.W.shape[0]
        if inj.Q.dim() != 2 or inj.Q.shape[1] != n or inj.Q.dtype != torch.int64:
            raise ConfigError(
                f"injection codes must be int64 (batch, {n}), got {tuple(inj.Q.shape)}"
            )
        if init is not None and (
            init.shape != inj.Q.shape
            or bool((init < 0).any())
            or bool((init > self.act.code_max).any())
        ):
            raise ConfigError("init codes must match the batch and lie in the activation range")

    def step_codes(
        self, c: torch.Tensor, Qs: torch.Tensor, plan: RequantPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One integer FB step: ``(c+, ||e|| per sample, saturated entries per sample)``.

        ``Qs`` is ``Q << shift_q``. ``e = 2^-E ((c+ << r) - max(N, 0))`` is exact.
        """
        k = self.step.shift
        acc = int_matmul(c, self.W, self.accumulator)
        N = ((((1 << k) - 1) * c) << plan.shift_z) + (
            (acc * self.W.row_multipliers()) << plan.shift_w
        )
        N = (N + Qs).clamp_min_(0)
        r = plan.round_shift
        new = ((N + (1 << (r - 1))) >> r) if r > 0 else N.clone()
        sat = new > self.act.code_max
        new = new.clamp_max_(self.act.code_max)
        err = torch.ldexp(((new << r) - N).to(torch.float64), torch.tensor(-plan.E))
        return new, err.norm(dim=1), sat.sum(dim=1)

    def solve(
        self,
        inj: Injection,
        *,
        init: torch.Tensor | None = None,
        initial_distance: torch.Tensor | None = None,
        progress: bool = False,
    ) -> IntSolveResult:
        """Iterate ``c <- requant(T~(2^-f c))`` from ``init`` (default 0) for every sample.

        A sample stops when its codes no longer change (settled: an exact fixed point of the
        integer map) or after ``max_iter`` steps. With ``initial_distance`` (an upper bound on
        ``||z_0 - z~*||`` per sample) the Corollary 2 bound is tracked as
        ``B_{j+1} = rho B_j + ||e_j||``. ``progress`` shows the settled samples on stderr.
        """
        from monquant.progress import progress_bar

        self._check_batch(inj, init)
        plan = self.plan(inj)
        B, dev = inj.Q.shape[0], inj.Q.device
        c = torch.zeros_like(inj.Q) if init is None else init.to(torch.int64).clone()
        Qs = inj.Q << plan.shift_q
        iters = torch.full((B,), self.max_iter, dtype=torch.long, device=dev)
        settled = torch.zeros(B, dtype=torch.bool, device=dev)
        saturated = torch.zeros(B, dtype=torch.long, device=dev)
        e_max = torch.zeros(B, dtype=torch.float64, device=dev)
        e_last = torch.zeros(B, dtype=torch.float64, device=dev)
        rho = self.rho
        track = initial_distance is not None and rho is not None
        bound = initial_distance.to(torch.float64).clone() if track else None
        active = torch.arange(B, device=dev)
        bar = progress_bar(desc="integer solve (settled)", enabled=progress, total=B, unit="img")
        for it in range(1, self.max_iter + 1):
            if active.numel() == 0:
                break
            old = c[active]
            new, enorm, sat = self.step_codes(old, Qs[active], plan)
            c[active] = new
            e_last[active] = enorm
            e_max[active] = torch.maximum(e_max[active], enorm)
            saturated[active] += sat
            if bound is not None:
                bound[active] = rho * bound[active] + enorm
            same = (new == old).all(dim=1)
            iters[active[same]] = it
            settled[active[same]] = True
            active = active[~same]
            bar.update(int(same.sum()))
        bar.close()
        return IntSolveResult(
            c, self.act, iters, settled, saturated, e_max, e_last, rho, bound, plan, self.max_iter
        )


def reference_equilibrium(
    W: IntWeights,
    inj: Injection,
    tol: float = 1e-12,
    max_iter: int = 100_000,
    stats: SpectralBounds | None = None,
) -> SolverResult:
    """Float64 equilibrium ``z~* = relu(W~ z~* + q~)`` of the exact deployed operator.

    Peaceman-Rachford at ``tol`` (default ``1e-12``); its ``error_bound`` is the a-posteriori bound
    on ``||z^ - z~*||`` to be added to any comparison, computed from the proved ``m_lo``, ``L_hi``.
    """
    cfg = SolverConfig(method="pr", tol=tol, max_iter=max_iter)
    st = stats if stats is not None else deployed_bounds(W)
    return solve(W.dequantized(), inj.value(), cfg, stats=st.conservative())


def deployed_radius(W: IntWeights) -> float:
    """Entrywise bound on ``|W~ - W.dequantized()|`` for the exact ``W~ = codes * M 2^-S``.

    :meth:`IntWeights.dequantized` is exact (radius 0) when every ``|code| * M < 2^53``: the integer
    product and its power-of-two scaling are then representable in float64 (barring underflow,
    which needs ``S > 1000``). Otherwise each entry is off by at most ``u |W~_ij| <= 2^-52 max|W~|``.
    """
    if int(W.codes.to(torch.int64).abs().max()) * W.scale.max_multiplier < 2**53:
        return 0.0
    return float(W.dequantized().abs().max()) * 2.0**-52


def deployed_bounds(W: IntWeights) -> SpectralBounds:
    """Proved spectral bounds of the deployed operator ``W~ = codes * M 2^-S`` itself.

    This is the operator the integer program iterates, so its certificate is the deployment's.
    """
    return spectral_bounds(check_weight(W.dequantized()), radius=deployed_radius(W), norm=False)
