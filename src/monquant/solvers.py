"""Operator-splitting solvers for the MonDEQ equilibrium ``z = prox(W z + q)``, one contract for all.

The equilibrium solves the monotone inclusion ``0 in F(z) + G(z)`` with the affine operator
``F(z) = (I - W) z - q`` (``q = U x + b``, the injection) and ``G`` a maximal monotone operator whose
resolvent is the activation ``prox`` (``relu``: the normal cone of the non-negative orthant). Every
sample is a row: ``z`` and ``q`` are ``(batch, n)`` and ``W`` acts as ``z @ W.T``.

Methods (step ``a``; ``m = margin(W)``, ``L = ||I - W||``):

- ``fb`` forward-backward  ``z+ = prox((1 - a) z + a (W z + q))``;
  contraction for ``0 < a < 2 m / L^2`` with ``rho = sqrt(1 - 2 a m + a^2 L^2)``; default ``a = m/L^2``.
- ``pr`` Peaceman-Rachford ``u+ = R_G R_F u`` with ``R = 2 J - I``,
  ``J_F(v) = (I + a (I - W))^{-1} (v + a q)`` (factored once per solve), ``J_G = prox``;
  ``rho = sqrt(1 - 4 a m / (1 + a L)^2)`` for every ``a > 0``; default ``a = 1/L``; ``z = prox(R_F u)``.
- ``dr`` Douglas-Rachford ``u+ = (u + R_G R_F u) / 2``; ``rho = (1 + rho_PR) / 2``; default ``1/L``.

Step policies (``SolverConfig.step_policy``, used when no ``step`` is given): ``bound`` (default)
takes the steps above, which minimise the proved modulus (FB's rate bound at ``m/L^2``; PR's at ``1/L``,
where ``rho^2 = 1 - m/L``). ``geometric`` takes ``a = 1/sqrt(m L)`` for PR and DR, the step that
minimises PR's contraction factor ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` when ``I - W`` is
symmetric (Giselsson and Boyd, IEEE TAC 62 (2017) 532-544). Its proved modulus is larger
(``rho^2 = 1 - 4 / (sqrt(kappa) (1 + sqrt(kappa))^2)``), but on the networks measured it needs
fewer iterations (docs/theory.md); FB keeps ``m/L^2``, and without a positive ``m`` (nor an
estimate of it) PR and DR fall back to ``1/L``. PR and DR converge at every step ``a > 0``. (A
QAT training solve of a fake-quantized ``W~`` takes at most the step of the float ``W``'s
constants: :class:`~monquant.implicit.EquilibriumSolver`, ``step_from``.)

Stopping: per sample the relative residual ``||z_{k+1} - z_k|| / ||z_{k+1}||`` below ``tol`` (with a
floor at machine precision, ``||z_{k+1} - z_k||^2 <= tol^2 ||z_{k+1}||^2 + (8 eps)^2 ||q||^2``, so that
``z* = 0`` reached through cancellation is recognised); the batch
stops when every sample is done (converged or diverged) or at ``max_iter``. A sample that has not met
the tolerance is reported ``converged=False`` — never silently passed off as a solution.

Checks (``SolverConfig.check_every``): the test runs every ``K``-th iteration, or with ``"auto"`` at
scheduled iterations: the first two checks are at iterations 1 and 3; after each later one, with
``r`` the largest ratio ``||dz||^2 / (tol^2 ||z||^2 + floor)`` over the samples still running (the
test passes at ``r <= 1``) and ``r'`` its value at the check before, the next check comes when
that ratio, decaying as it did between the two checks, would reach 1: after
``ceil(log r / log(r' / r) * gap)`` iterations, from 1 to :data:`AUTO_CHECK_MAX_GAP` (1 when ``r``
did not fall). ``solve(..., first_check=h)`` moves the first check to iteration ``h`` (a hint from
a solve of a similar problem: the training solves take nine tenths of the previous batch's
iterations, :class:`~monquant.implicit.EquilibriumSolver`) and the second to ``max(h // 8, 1)``
iterations after it; the schedule goes on as above. A test is never skipped at ``max_iter``, and
the verdict is the same test, so a solve never stops short of the tolerance; it may run past the
iteration that first met it (a smaller residual). An unchecked iteration is two tensor
operations for dense PR with the relu (or the adjoint's mask), written into buffers that the
solve allocates once, and three otherwise; a check, about seven more and a synchronization.

A-posteriori bound (for a certified contraction of the iterated variable ``s`` — ``z`` for FB, ``u``
for PR/DR — and because ``J_F`` is non-expansive): ``||z_k - z*|| <= rho / (1 - rho) ||s_k - s_{k-1}||``.

Safeguarded Anderson acceleration (``SolverConfig(anderson=M)``, ``M >= 1``; off by default). Write
``T`` for the method's fixed-point map on ``s`` and ``g(s) = T(s) - s``. Every iteration evaluates
``T`` at one point ``p`` per sample (one resolvent or ``fb_map`` application, as a plain iteration).
The point is either the plain step ``T(b)`` from the last accepted point ``b``, or the type-II
Anderson candidate ``T(b) - dF gamma`` with ``gamma = argmin ||g(b) - dG gamma||`` over the last
``M`` differences of accepted ``(T, g)`` pairs (Tikhonov-regularised normal equations, per sample).
Safeguard: a candidate is accepted only if ``||g(p)|| <= theta ||g(b)||`` (``theta`` =
:data:`ANDERSON_SAFEGUARD` ``< 1``); otherwise the next point is the plain step ``T(b)``, which is
always accepted. For a ``rho``-contraction ``||g(T(b))|| <= rho ||g(b)||``, so ``||g(b)||`` falls by
at least ``max(theta, rho)`` every two iterations, and ``||b - s*|| <= ||g(b)|| / (1 - rho)``: the
accelerated solver converges whenever the plain one is certified to, at worst at the rate
``max(theta, rho)`` per two iterations (twice the plain count when every candidate is rejected),
to the same unique equilibrium (which does not depend on the path). The
returned state is ``T(b)`` with ``s_prev = b``, so the a-posteriori bound above and the stopping
test (on ``z(T(b))`` against ``z(b)``) hold unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from monquant.errors import MonquantError
from monquant.names import SPLITTING_METHODS
from monquant.operators import (
    DenseOperator,
    LinearMap,
    MatrixMap,
    MonotoneOperator,
    SpectralStats,
    as_operator,
    step_constants,
)

__all__ = [
    "ANDERSON_SAFEGUARD",
    "AUTO_CHECK_MAX_GAP",
    "METHODS",
    "STEP_POLICIES",
    "SolverConfig",
    "SolverError",
    "SolverResult",
    "SplittingMap",
    "SplittingMethod",
    "StepEstimates",
    "certified_step_range",
    "contraction_modulus",
    "default_step",
    "estimate_lipschitz",
    "estimate_margin_dense",
    "first_check_after",
    "get_solver",
    "mask_prox",
    "register_solver",
    "solve",
    "solver_names",
    "solver_step",
]

Method = Literal["fb", "pr", "dr"]
METHODS: tuple[str, ...] = SPLITTING_METHODS
Prox = Callable[[torch.Tensor], torch.Tensor]

#: Anderson safeguard ``theta``: a candidate is kept only if it shrinks the fixed-point residual of
#: the last accepted point by this factor (``< 1``, so that accepted candidates alone converge too).
#: Measured against a summable envelope (Zhang, O'Donoghue & Boyd 2020) with ``D = 1e4``, which
#: let forward-backward stall for 50,000 iterations on ill-conditioned operators.
ANDERSON_SAFEGUARD = 0.99

#: The most iterations between two checks under ``check_every="auto"`` (bounds how far a solve
#: can run past convergence when the residual starts falling faster than predicted).
AUTO_CHECK_MAX_GAP = 16

#: How a solve picks its step when none is given (module docstring): ``bound`` minimises the
#: proved modulus, ``geometric`` takes ``1/sqrt(m L)`` for PR and DR.
STEP_POLICIES = ("bound", "geometric")


class SolverError(MonquantError, ValueError):
    """Invalid solver settings or inputs (unknown method, bad step, mismatched shapes)."""


@dataclass
class SolverConfig:
    """Settings shared by every splitting method.

    ``step=None`` picks the operator's own step (FB ``m/L^2``, PR/DR ``1/L``). ``check_every`` sets
    how often the residual is evaluated: every ``K``-th iteration (1 = every one), or ``"auto"``:
    at iterations predicted from the residual's observed decay (module docstring, "Checks").
    ``diverge_at`` is the iterate norm (relative to ``1 + max|q|``) treated as divergence.
    ``spectral="estimate"`` skips the exact ``m``, ``L`` (eigen/singular values) for speed: PR/DR
    then step from estimates (they converge at any step) and report no modulus.
    ``anderson=M`` turns on safeguarded Anderson acceleration with memory ``M`` (0 = plain
    iteration; the residual is then checked every iteration whatever ``check_every`` says).
    ``step_policy`` picks the step when ``step`` is None (:data:`STEP_POLICIES`, :func:`solver_step`).
    """

    method: str = "pr"
    step: float | None = None
    tol: float = 1e-4
    max_iter: int = 2000
    check_every: int | str = "auto"
    diverge_at: float = 1e8
    spectral: str = "exact"
    anderson: int = 0
    step_policy: str = "bound"

    def __post_init__(self) -> None:
        get_solver(self.method)  # raises SolverError for a name that is not registered
        if self.step is not None and not (math.isfinite(self.step) and self.step > 0):
            raise SolverError(f"step must be a positive finite number, got {self.step}")
        if not (self.tol > 0):
            raise SolverError(f"tol must be positive, got {self.tol}")
        if int(self.max_iter) < 1:
            raise SolverError("max_iter must be >= 1")
        ce = self.check_every
        if ce != "auto" and (isinstance(ce, (bool, str)) or int(ce) != ce or int(ce) < 1):
            raise SolverError(f"check_every must be an integer >= 1 or 'auto', got {ce!r}")
        if self.spectral not in ("exact", "estimate"):
            raise SolverError(f"spectral must be 'exact' or 'estimate', got {self.spectral!r}")
        if isinstance(self.anderson, bool) or int(self.anderson) != self.anderson or not (
            0 <= int(self.anderson) <= 50
        ):
            raise SolverError(f"anderson must be an integer memory in 0..50, got {self.anderson!r}")
        self.anderson = int(self.anderson)
        if self.step_policy not in STEP_POLICIES:
            raise SolverError(f"step_policy must be one of {STEP_POLICIES}, got {self.step_policy!r}")

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "step": self.step,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "check_every": self.check_every,
            "diverge_at": self.diverge_at,
            "spectral": self.spectral,
            "anderson": self.anderson,
            "step_policy": self.step_policy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SolverConfig:
        """Inverse of :meth:`as_dict` (unknown keys refused, missing keys take their defaults)."""
        names = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - names)
        if bad:
            raise SolverError(f"unknown solver settings {bad}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass
class SolverResult:
    """Outcome of one batched solve.

    ``iterations`` is the batch's iteration count; ``sample_iterations`` the iteration of the
    first check at which each sample met the tolerance (with a check at every iteration, the first
    iteration that met it; ``max_iter`` when it never did); ``residual`` the final
    relative residual per sample; ``modulus`` the certified contraction modulus (``None`` when the
    step/operator is not certified); ``error_bound`` the a-posteriori bound on ``||z - z*||`` per
    sample (``inf`` when not certified).
    """

    z: torch.Tensor
    iterations: int
    sample_iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    modulus: float | None
    error_bound: torch.Tensor
    method: str
    step: float
    stats: SpectralStats
    tol: float
    max_iter: int
    state: torch.Tensor = field(repr=False)
    resolvent: LinearMap | None = field(default=None, repr=False)
    #: the residual checks the solve made
    checks: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def n_unconverged(self) -> int:
        return int((~self.converged).sum())

    def summary(self) -> dict[str, object]:
        """Plain-number summary (JSON-ready)."""
        it = self.sample_iterations.to(torch.float64)
        return {
            "method": self.method,
            "step": self.step,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "iterations": self.iterations,
            "mean_iterations": float(it.mean()),
            "max_iterations": int(self.sample_iterations.max()),
            "converged": int(self.converged.sum()),
            "unconverged": self.n_unconverged,
            "diverged": int(self.diverged.sum()),
            "max_residual": float(self.residual.max()),
            "modulus": self.modulus,
            "certified_step_range": self.certified_range,
            "step_certified": self.modulus is not None,
            "max_error_bound": float(self.error_bound.max()),
        }

    @property
    def certified_range(self) -> tuple[float, float] | None:
        """Steps for which this method is a certified contraction on this ``W`` (None if unknown)."""
        if math.isnan(self.stats.m) or not self.stats.exact:
            return None
        return get_solver(self.method).certified_range(self.stats.m, self.stats.L)


def mask_prox(mask: torch.Tensor) -> Prox:
    """Prox of the indicator of the subspace ``{v : v_i = 0 where mask_i = 0}``: ``v -> mask * v``.

    This is the activation of the adjoint (backward) problem: ``D`` is the relu's Clarke Jacobian
    at the equilibrium. It is a projection, hence the resolvent of a maximal monotone operator.
    Its reflection ``2 mask v - v`` is ``reflect`` (:func:`reflected_prox`).
    """
    return _MaskProjection(mask)


class _MaskProjection:
    """``v -> mask * v`` and its reflection ``v -> (2 mask - 1) * v``, one product each; the
    factors are cast once per dtype."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._factors: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _of(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._factors.get(dtype)
        if f is None:
            m = self.mask.to(dtype)
            f = self._factors[dtype] = (m, m.mul(2.0).sub_(1.0))
        return f

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return v * self._of(v.dtype)[0]

    def reflect(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.mul(v, self._of(v.dtype)[1], out=out)


def reflected_prox(prox: Prox) -> Callable[..., torch.Tensor] | None:
    """``R_G = 2 prox - I`` in one operation where one is known, else ``None``: ``|v|`` for the
    relu, ``(2 mask - 1) v`` for a mask projection (:func:`mask_prox`). Each equals PR's
    ``lerp(v, prox(v), 2)`` for every finite ``v``, bit for bit: the kept entries come back as
    ``v`` and the zeroed ones as ``-v``, both exact. Each takes ``out=`` (a buffer to write)."""
    if prox is torch.relu:
        return torch.abs
    return getattr(prox, "reflect", None)


def default_step(method: str, m: float, L: float) -> float:
    """The operator's own step: FB ``m / L^2`` (optimal rate bound), PR/DR ``1 / L``."""
    if method == "fb":
        if m <= 0:
            # No certified step exists; fall back to a tiny but finite step so the solve still
            # runs (and reports what happens) rather than failing.
            return 1.0 / max(L, 1.0) ** 2
        return m / L**2
    return 1.0 / max(L, 1e-12)


def solver_step(method: SplittingMethod, policy: str, m: float, L: float) -> float:
    """The step a solve takes when none is given: the method's own (``policy == "bound"``), or
    ``1/sqrt(m L)`` (``"geometric"``) for a resolvent method (PR, DR) when ``m > 0`` is known or
    estimated (module docstring). PR and DR converge at every step, so an estimated ``m`` or ``L``
    changes the speed of a solve, never its correctness."""
    if policy == "geometric" and method.uses_resolvent and m > 0 and math.isfinite(m) and L > 0:
        return 1.0 / math.sqrt(m * L)
    return method.default_step(m, L)


def certified_step_range(method: str, m: float, L: float) -> tuple[float, float] | None:
    """Open interval of steps for which the method is a certified contraction (None if ``m <= 0``).

    FB: ``(0, 2 m / L^2)``; PR and DR: ``(0, inf)``.
    """
    if m <= 0:
        return None
    if method == "fb":
        return (0.0, 2.0 * m / L**2)
    return (0.0, math.inf)


def contraction_modulus(method: str, step: float, m: float, L: float) -> float | None:
    """Contraction modulus of one iteration of ``method`` (docs/theory.md section 1; Corollary 1's formulas).

    FB: ``sqrt(1 - 2 a m + a^2 L^2)``; PR: ``sqrt(1 - 4 a m / (1 + a L)^2)``;
    DR: ``(1 + rho_PR) / 2``. Returns ``None`` when not certified (``m <= 0`` or the FB step is out
    of range).
    """
    if m <= 0 or step <= 0:
        return None
    if method == "fb":
        r2 = 1.0 - 2.0 * step * m + step**2 * L**2
        if step >= 2.0 * m / L**2 or r2 >= 1.0:
            return None
        return math.sqrt(max(r2, 0.0))
    rho_pr = math.sqrt(max(1.0 - 4.0 * step * m / (1.0 + step * L) ** 2, 0.0))
    if method == "pr":
        return rho_pr
    return 0.5 * (1.0 + rho_pr)


#: the dtypes a solve runs in (the operator is cast to the injection's)
SOLVE_DTYPES = (torch.float32, torch.float64)


def _check_inputs(op: MonotoneOperator, q: torch.Tensor) -> None:
    if q.dim() != 1 + len(op.state_shape) or tuple(q.shape[1:]) != op.state_shape:
        raise SolverError(
            f"injection must be (batch, {', '.join(map(str, op.state_shape))}) to match the "
            f"operator, got {tuple(q.shape)}"
        )
    if q.dtype not in SOLVE_DTYPES:
        # below float32 the stopping test's rounding floor (8 eps ||q||: 6% of ||q|| in
        # bfloat16) passes before the iterates have moved, and PR/DR's resolvent has no routine
        raise SolverError(
            f"a solve runs in float32 or float64, got an injection of {q.dtype}: cast it (the "
            "operator follows its dtype), e.g. q.float()"
        )


class SplittingMap:
    """One splitting method on a fixed ``(W, q, a, prox)``; ``W`` a matrix or any operator.

    The iterated variable ``s`` is ``z`` for FB and ``u`` for PR/DR; ``aux`` (what ``start``
    returns) is the reflected resolvent ``y = R_F(u) = 2 J_F(u) - u`` for PR/DR. ``read`` returns
    the equilibrium estimate ``z = prox(y)`` belonging to ``s`` (for FB ``z = s``); ``advance``
    performs one iteration: PR ``u+ = R_G(y) = 2 z - y``, DR ``u+ = (u + R_G(y)) / 2``. FB applies
    the operator's ``fb_map(a)`` (``v -> (1 - a) v + a W v``); PR/DR apply its resolvent
    ``J = (I + a (I - W))^{-1}``, built once (or passed in: the adjoint problem's resolvent is the
    forward one transposed), with ``J_F(v) = J v + c``, ``c = a J q``. For a dense ``W`` each
    iteration is one matrix product: ``v K`` for FB, and for PR/DR ``y = u R + 2c`` with the
    reflection folded into ``R = 2 K - I`` (row layout ``K = J^T``), formed once per resolvent
    (:meth:`~monquant.operators.MatrixMap.reflected`; the adjoint solve's transposed resolvent
    shares the forward's). Reading ``z`` through ``prox`` makes it exactly feasible (relu: exact
    zeros).
    """

    def __init__(
        self,
        method: str,
        W: torch.Tensor | MonotoneOperator,
        q: torch.Tensor,
        a: float,
        prox: Prox,
        resolvent: torch.Tensor | LinearMap | None = None,
    ):
        op = as_operator(W)
        self.method, self.prox = method, prox
        self.ok = True
        self.reflect_prox: Callable[..., torch.Tensor] | None = None  # dense PR: R_G in one operation
        self.affine_start = True  # start(s) is affine in s (Anderson mixes it with the points)
        if method == "fb":
            self.map: LinearMap = op.fb_map(a)
            self.c = a * q
            self._K = self.map.K if isinstance(self.map, MatrixMap) else None
            return
        if resolvent is None:
            J = op.resolvent(a)
            if J is None:
                self.ok = False  # I + a (I - W) singular: only possible when margin(W) <= 0
                return
            resolvent = J
        if isinstance(resolvent, torch.Tensor):
            resolvent = MatrixMap(resolvent.to(q))
        self.map = resolvent
        self._K = None
        if isinstance(resolvent, MatrixMap):  # the dense fast path: y = u R + 2c in one BLAS call
            # 2c = (q K)(2a): the same numbers as 2 (a (q K)), the doubling being exact
            self._K, self.c = resolvent.reflected(), resolvent.matmul(q).mul_(2.0 * a)
            if method == "pr":
                self.reflect_prox = reflected_prox(prox)
        else:
            self.c = a * resolvent.matmul(q)

    @property
    def K(self) -> torch.Tensor:
        """The dense iteration matrix (row layout) when the operator is dense: the FB matrix, or
        the reflected resolvent ``R = 2 K_J - I`` for PR/DR."""
        if self._K is None:
            raise SolverError("this operator's splitting map has no dense matrix")
        return self._K

    def apply(self, s: torch.Tensor) -> torch.Tensor:
        """One full iteration ``s -> T(s)`` of the splitting map (the contraction variable)."""
        x = self.start(s)
        z, y = self.read(s, x)
        return self.advance(s, x, z, y)[0]

    def equilibrium_estimate(self, s: torch.Tensor) -> torch.Tensor:
        """The ``z`` belonging to state ``s`` (``z = s`` for FB, ``prox(R_F u)`` for PR/DR)."""
        return self.read(s, self.start(s))[0]

    def start(self, s: torch.Tensor) -> torch.Tensor | None:
        """``y = R_F(s)`` for PR/DR (``None`` for FB)."""
        if self.method == "fb":
            return None
        return self._reflect(s)

    def start_zero(self) -> torch.Tensor | None:
        """``start`` at ``s = 0`` without its product: ``R_F(0) = 2 J_F(0) = 2c``."""
        if self.method == "fb":
            return None
        return self.c.clone() if self._K is not None else self.c.mul(2.0)  # dense: c doubled

    def _reflect(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``R_F(u)``; on the dense fast path written into ``out`` when one is given."""
        K = self._K  # the dense fast path is inlined: this runs once per iteration
        if K is not None:
            return torch.addmm(self.c, u, K, out=out)
        return torch.lerp(u, self.map.addmm(self.c, u), 2.0)  # 2 J_F(u) - u

    def read(self, s: torch.Tensor, y: torch.Tensor | None):
        if y is None:
            return s, None
        return self.prox(y), y

    def advance(self, s, y, z, _y=None):
        if self.method == "fb":
            K = self._K
            lin = torch.addmm(self.c, s, K) if K is not None else self.map.addmm(self.c, s)
            return self.prox(lin), None
        # PR: u+ = R_G(y) = 2 z - y;  DR: u+ = (u + R_G(y)) / 2 = z + (u - y) / 2
        u = torch.lerp(y, z, 2.0) if self.method == "pr" else torch.add(z, s - y, alpha=0.5)
        return u, self._reflect(u)


@dataclass(frozen=True)
class SplittingMethod:
    """A registered splitting method: how to build its iteration, its step and its modulus.

    ``build(op, q, a, prox, resolvent)`` returns an object with ``ok``, ``start``, ``read`` and
    ``advance`` (see :class:`SplittingMap`) and optionally ``map`` (a resolvent to reuse);
    ``default_step(m, L)``, ``modulus(a, m, L)`` (``None`` when not certified) and
    ``certified_range(m, L)`` give the theory. ``uses_resolvent`` says whether the adjoint solve
    may reuse the forward resolvent transposed.
    """

    name: str
    build: Callable[..., Any]
    default_step: Callable[[float, float], float]
    modulus: Callable[[float, float, float], float | None]
    certified_range: Callable[[float, float], tuple[float, float] | None]
    uses_resolvent: bool = True


_REGISTRY: dict[str, SplittingMethod] = {}


def register_solver(method: SplittingMethod, *, replace: bool = False) -> SplittingMethod:
    """Make a splitting method available by name to :func:`solve`, ``SolverConfig`` and the CLI."""
    if method.name in _REGISTRY and not replace:
        raise SolverError(f"a solver named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def get_solver(name: str) -> SplittingMethod:
    """The registered splitting method ``name`` (raises :class:`SolverError` if unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SolverError(
            f"unknown solver method {name!r}; choose one of {tuple(_REGISTRY)}"
        ) from None


def solver_names() -> tuple[str, ...]:
    """Names of every registered splitting method."""
    return tuple(_REGISTRY)


for _name in METHODS:
    register_solver(
        SplittingMethod(
            name=_name,
            build=lambda op, q, a, prox, resolvent, _n=_name: SplittingMap(
                _n, op, q, a, prox, resolvent
            ),
            default_step=lambda m, L, _n=_name: default_step(_n, m, L),
            modulus=lambda a, m, L, _n=_name: contraction_modulus(_n, a, m, L),
            certified_range=lambda m, L, _n=_name: certified_step_range(_n, m, L),
            uses_resolvent=_name != "fb",
        )
    )


def _failed_result(
    q: torch.Tensor, cfg: SolverConfig, a: float, rho: float | None, st: SpectralStats
) -> SolverResult:
    """Result for a solve that could not start (singular resolvent): every sample diverged."""
    B = q.shape[0]
    nan = torch.full_like(q, math.nan)
    inf = torch.full((B,), math.inf, dtype=q.dtype, device=q.device)
    return SolverResult(
        z=nan,
        iterations=0,
        sample_iterations=torch.full((B,), cfg.max_iter, dtype=torch.long, device=q.device),
        residual=inf,
        converged=torch.zeros(B, dtype=torch.bool, device=q.device),
        diverged=torch.ones(B, dtype=torch.bool, device=q.device),
        modulus=rho,
        error_bound=inf,
        method=cfg.method,
        step=a,
        stats=st,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        state=nan,
    )


def _dominant_column(P: torch.Tensor) -> torch.Tensor:
    """``P``'s column of largest norm, scaled to unit norm (a power-iteration vector)."""
    v = P[:, int(P.square().sum(dim=0).argmax())]
    return v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(P.dtype).tiny)


def _squared_power(P: torch.Tensor, squarings: int) -> torch.Tensor:
    """The unit dominant column of ``P^(2^squarings)`` (each square rescaled by its Frobenius
    norm): ``2^squarings`` power iterations in ``squarings`` matrix products."""
    tiny = torch.finfo(P.dtype).tiny
    for _ in range(squarings):
        P = P / torch.linalg.matrix_norm(P).clamp_min(tiny)
        P = P @ P
    return _dominant_column(P)


def _parts(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = I - W`` and ``S = sym(M)`` of a detached ``W``."""
    M = torch.eye(W.shape[0], dtype=W.dtype, device=W.device) - W.detach()
    return M, torch.add(M, M.T).mul_(0.5)


def _lipschitz_at(M: torch.Tensor, v: torch.Tensor) -> float:
    """``||M v||`` for a unit ``v``: the Rayleigh quotient of ``M^T M``, square-rooted (``<= L``)."""
    return float(torch.linalg.vector_norm(M @ v))


def _margin_at(S: torch.Tensor, v: torch.Tensor) -> float:
    """``v^T S v`` for a unit ``v``: the Rayleigh quotient of ``S`` (``>= lmin(S)``)."""
    return float(v @ (S @ v))


def _cold_lipschitz(M: torch.Tensor, squarings: int = 5) -> tuple[float, torch.Tensor]:
    """:func:`estimate_lipschitz` of ``M = I - W``, with its power-iteration vector."""
    v = _squared_power(M.T @ M, squarings)
    return _lipschitz_at(M, v), v


def _cold_margin(S: torch.Tensor, L: float, squarings: int = 4) -> tuple[float, torch.Tensor]:
    """:func:`estimate_margin_dense` of ``S = sym(I - W)``, with its power-iteration vector."""
    P = S.neg()
    P.diagonal().add_(L)
    v = _squared_power(P, squarings)
    return _margin_at(S, v), v


def estimate_lipschitz(W: torch.Tensor, squarings: int = 5) -> float:
    """Estimate of ``L = ||I - W||_2`` from below (cheap; used only for steps, never certified).

    Power iteration by repeated squaring: ``P = G^(2^squarings)`` for ``G = (I - W)^T (I - W)``
    (each square rescaled by its Frobenius norm), then the Rayleigh quotient of ``G`` at ``P``'s
    largest column, which is ``<= lmax(G) = L^2``. Five squarings are 32 power iterations in six
    matrix products instead of thirty matrix-vector products, each a separate dispatch. PR and DR
    converge for every step ``a > 0``, so an estimated ``1/L`` is a safe step.
    """
    return _cold_lipschitz(_parts(W)[0], squarings)[0]


def estimate_margin_dense(W: torch.Tensor, L: float, squarings: int = 4) -> float:
    """Estimate of ``margin(W) = lmin(S)``, ``S = sym(I - W)``, from above (cheap; it only places
    a step, never certified).

    Power iteration by repeated squaring on ``P = L I - S`` (positive semidefinite once
    ``L >= lmax(S)``, which ``L = ||I - W||`` ensures; an estimate of ``L`` from below leaves at
    most a small negative eigenvalue, far from the dominant ``L - m``), then the Rayleigh quotient
    of ``S`` at ``P``'s largest column: ``>= lmin(S)``. Four squarings are 16 power iterations;
    eigenvalues of ``S`` close to ``m`` blend in, so the estimate lies a little above ``m``.
    """
    return _cold_margin(_parts(W)[1], L, squarings)[0]


@dataclass
class StepEstimates:
    """Estimates of ``m`` and ``L`` that follow a slowly changing operator (the training weights)
    from one solve to the next, for the step only (they certify nothing).

    The first call, and any call after :meth:`reset` or on an operator of another kind, shape,
    dtype or device, starts cold, keeping the power-iteration vectors: for a dense ``W``
    :func:`estimate_lipschitz` and :func:`estimate_margin_dense`, for any other operator
    :func:`~monquant.operators.step_constants` (50 power iterations each). Later calls continue
    the two power iterations from the vectors of the previous call, ``steps`` products each: for a
    dense ``W`` a few dozen microseconds instead of ten matrix products, for a convolution a few
    applications instead of two hundred. ``L`` stays a Rayleigh quotient of
    ``(I - W)^T (I - W)`` (from below) and ``m`` one of ``sym(I - W)`` (from above), as cold.
    """

    steps: int = 2
    _v: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _kind: tuple[Any, ...] | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Forget the vectors: the next call starts cold (a training epoch starts so, which keeps
        a resumed run identical to an uninterrupted one)."""
        self._v = None

    def __call__(self, W: torch.Tensor | MonotoneOperator) -> SpectralStats:
        dense = isinstance(W, torch.Tensor)
        kind = (type(W), tuple(W.shape) if dense else W.state_shape, W.dtype, W.device)
        warm = self._v is not None and self._kind == kind
        if dense:
            L, m, v = self._dense(W, self._v if warm else None)
        else:
            L, m, v = step_constants(W, self.steps if warm else 50, self._v if warm else None)
        finite = math.isfinite(L) and math.isfinite(m)
        self._v, self._kind = (v, kind) if finite else (None, None)  # a non-finite W: cold again
        return SpectralStats(m=m, L=L, norm_W=math.nan, exact=False)

    def _dense(
        self, W: torch.Tensor, v: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
        M, S = _parts(W)
        if v is None:
            L, vL = _cold_lipschitz(M)
            m, vm = _cold_margin(S, L)
        else:
            vL, vm = v
            for _ in range(self.steps):
                w = M.T @ (M @ vL)
                vL = w / torch.linalg.vector_norm(w).clamp_min(torch.finfo(w.dtype).tiny)
            L = _lipschitz_at(M, vL)
            for _ in range(self.steps):
                w = torch.sub(vm, S @ vm, alpha=1.0 / L) if L > 0 else vm  # (L I - S) v / L
                vm = w / torch.linalg.vector_norm(w).clamp_min(torch.finfo(w.dtype).tiny)
            m = _margin_at(S, vm)
        return L, m, (vL, vm)


def solve(
    W: torch.Tensor | MonotoneOperator,
    q: torch.Tensor,
    config: SolverConfig | None = None,
    *,
    prox: Prox = torch.relu,
    stats: SpectralStats | None = None,
    init: torch.Tensor | None = None,
    resolvent: torch.Tensor | LinearMap | None = None,
    first_check: int | None = None,
) -> SolverResult:
    """Solve ``z = prox(W z + q)`` for every sample (leading dimension) of ``q``.

    ``W`` is any :class:`~monquant.operators.MonotoneOperator` or a square matrix (a
    :class:`~monquant.operators.DenseOperator`: float, quantized, imported); it is cast to ``q``'s
    dtype and device. The method is looked up in the solver registry (:func:`get_solver`).
    ``stats`` (``m``, ``L`` of this ``W``) may be passed to skip their computation; with
    ``config.spectral == "estimate"`` and no ``stats``, only an estimate of ``L`` is formed (PR/DR;
    under the ``geometric`` step policy also one of ``m``; :class:`StepEstimates` carries such
    estimates from solve to solve) and the result carries no modulus.
    Stats flagged ``exact=False`` never give a modulus either
    (nothing is certified by an estimate). ``init`` warm-starts the iterated variable (``z`` for FB,
    ``u`` for PR/DR); ``resolvent`` is a precomputed resolvent for PR/DR (a :class:`LinearMap`, or
    the dense row-layout matrix ``K``). ``first_check`` moves the first residual check of the
    ``"auto"`` schedule to that iteration (module docstring, "Checks"; without effect for a fixed
    ``check_every`` or Anderson). Runs without autograd. Never raises for non-convergence:
    it is reported per sample in the result.
    """
    cfg = config or SolverConfig()
    method = get_solver(cfg.method)
    op = as_operator(W)
    _check_inputs(op, q)
    op = op.detach().to(dtype=q.dtype, device=q.device)
    q = q.detach()
    if stats is not None:
        st = stats
    elif cfg.spectral == "estimate" and method.uses_resolvent:
        geometric = cfg.step is None and cfg.step_policy == "geometric"
        if isinstance(op, DenseOperator):
            L_est = estimate_lipschitz(op.W)
            m_est = estimate_margin_dense(op.W, L_est) if geometric else math.nan
        else:  # the estimates of estimate_stats without its ||W||, which no step needs
            L_est, m_est, _ = step_constants(op)
            m_est = m_est if geometric else math.nan
        st = SpectralStats(m=m_est, L=L_est, norm_W=math.nan, exact=False)
    else:
        st = op.spectral_stats()
    a = float(cfg.step) if cfg.step is not None else solver_step(method, cfg.step_policy, st.m, st.L)
    rho = None if (math.isnan(st.m) or not st.exact) else method.modulus(a, st.m, st.L)
    with torch.no_grad():
        it = method.build(op, q, a, prox, resolvent)
        if not it.ok:
            return _failed_result(q, cfg, a, rho, st)
        s0 = torch.zeros_like(q) if init is None else init.detach().to(q).clone()
        if cfg.anderson:
            res = _iterate_anderson(it, s0, q, cfg, init is None)
        else:
            res = _iterate(it, s0, q, cfg, init is None, first_check)
    s, s_prev, z, k, checks, pending, checked, dz2, zn2, ok, diverged = res
    B = q.shape[0]
    converged = ok & ~diverged
    residual = (dz2 / zn2.clamp_min(torch.finfo(q.dtype).tiny)).sqrt_()  # 0 where dz2 = 0
    # a sample's iteration: that of the first check it passed (`pending` checks failed before);
    # `checked` lists the checked iterations of a schedule, None when they were every `every`-th
    if checked is None:
        every = 1 if cfg.anderson else int(cfg.check_every)  # Anderson checks every iteration
        sample_it = pending.add(1).mul_(every).clamp_(max=k)
    else:
        at = torch.tensor([*checked, k], dtype=torch.long, device=q.device)
        sample_it = at.index_select(0, pending)
    sample_it.masked_fill_(~converged, cfg.max_iter)
    if rho is not None and rho < 1.0:
        error_bound = _flat_norm(s - s_prev).mul_(rho / (1.0 - rho)).masked_fill_(diverged, math.inf)
    else:
        error_bound = torch.full((B,), math.inf, dtype=q.dtype, device=q.device)
    return SolverResult(
        z=z,
        iterations=k,
        sample_iterations=sample_it,
        residual=residual,
        converged=converged,
        diverged=diverged,
        modulus=rho,
        error_bound=error_bound,
        method=cfg.method,
        step=a,
        stats=st,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        state=s,
        resolvent=getattr(it, "map", None) if method.uses_resolvent else None,
        checks=checks,
    )


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm over every non-batch dimension (``t`` may be overwritten)."""
    if t.dim() == 2:
        return t.square().sum(dim=1)
    return t.reshape(t.shape[0], -1).square().sum(dim=1)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _limits(q: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The stopping floor ``(8 eps)^2 ||q||^2`` per sample and the squared divergence limit, a
    0-dimensional tensor of ``q``'s dtype (at most the dtype's largest finite number, so that
    ``x <= limit2`` fails for ``inf``; a comparison with a Python number rounds it to the
    tensor's dtype just the same, but dispatches more slowly)."""
    fin = torch.finfo(q.dtype)
    floor = (8.0 * fin.eps) ** 2 * _sq(q)
    big = float(q.abs().max()) if q.numel() else 0.0
    if not math.isfinite(big):  # the limit comes from the finite entries; a bad sample diverges
        good = q[torch.isfinite(q)]
        big = float(good.abs().max()) if good.numel() else 0.0
    limit2 = min((cfg.diverge_at * (1.0 + big)) ** 2, fin.max)
    return floor, torch.full((), limit2, dtype=q.dtype, device=q.device)


def _diverging(s: torch.Tensor, limit2: torch.Tensor) -> torch.Tensor:
    """Samples whose iterate is non-finite or beyond the divergence limit (a NaN or infinite
    squared norm fails ``<= limit2``, a finite limit)."""
    return ~(_sq(s) <= limit2)


def _finished(
    ok: torch.Tensor, diverged: torch.Tensor, s: torch.Tensor, limit2: torch.Tensor, full: bool
) -> tuple[bool, torch.Tensor]:
    """Whether every sample is done; a ``full`` check (every 16th, and the last) also looks for
    divergence, which the cheap checks between skip."""
    if full:
        diverged = diverged | _diverging(s, limit2)
        return bool((ok | diverged).all()), diverged
    return bool(ok.all()), diverged


def _final(
    ok: torch.Tensor, diverged: torch.Tensor, s: torch.Tensor, dz2: torch.Tensor, limit2: torch.Tensor,
    tested: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of a loop: a non-finite residual or iterate is divergence, never convergence.
    ``tested``: the loop's last check already tested this ``s`` (its verdicts are in
    ``diverged``)."""
    fin = torch.isfinite(dz2)  # a squared norm is never negative: NaN or +inf is the failure
    return ok & fin, (diverged if tested else diverged | _diverging(s, limit2)) | ~fin


def _first(it: SplittingMap, s: torch.Tensor, cold: bool) -> torch.Tensor | None:
    """The method's ``start(s)``; at a cold start (``s = 0``) without a product where it can."""
    start_zero = getattr(it, "start_zero", None) if cold else None
    return start_zero() if start_zero is not None else it.start(s)


def first_check_after(iterations: int) -> int:
    """The first check of a solve under ``check_every="auto"`` that follows a solve of a similar
    problem which took ``iterations``: nine tenths of them (at least 1). The training solves use
    it (:class:`~monquant.implicit.EquilibriumSolver`; module docstring, "Checks")."""
    return max(9 * int(iterations) // 10, 1)


def _next_gap(previous: tuple[int, float], k: int, worst: float) -> int:
    """Iterations from a scheduled check after the first to the next one (``check_every="auto"``,
    module docstring, "Checks"): ``worst`` is this check's largest ratio
    ``||dz||^2 / (tol^2 ||z||^2 + floor)`` over the running samples, ``previous`` the
    ``(iteration, ratio)`` of the check before."""
    k0, w0 = previous
    if not (1.0 < worst < w0 and math.isfinite(w0)):
        return 1  # not falling (or about to pass): look again at the next iteration
    need = math.log(worst) / math.log(w0 / worst) * (k - k0)
    return int(min(max(math.ceil(need), 1), AUTO_CHECK_MAX_GAP))


def _iterate(
    it: SplittingMap, s: torch.Tensor, q: torch.Tensor, cfg: SolverConfig, cold: bool = False,
    first_check: int | None = None,
):
    """The shared iteration loop with per-sample stopping (lean: an unchecked dense PR iteration is
    two tensor operations when its prox has a known reflection, :func:`reflected_prox`, three
    otherwise; a residual test adds about seven).

    A sample is done when ``||dz||^2 <= tol^2 ||z||^2 + (8 eps)^2 ||q||^2``: the relative residual
    test, with a floor at machine precision relative to the injection so that ``z* = 0`` reached
    through cancellation is recognised. Checks come every ``check_every``-th iteration or, with
    ``"auto"``, where :func:`_next_gap` schedules them (from ``first_check`` when given).
    Divergence (non-finite or exploding iterates) is checked every 16 fixed checks, at every
    scheduled one and at the end. Returns,
    with the loop's state, the iterations checked on a schedule (``None`` for every ``K``-th).
    """
    B = q.shape[0]
    tol2 = cfg.tol**2
    floor, limit2 = _limits(q, cfg)
    auto = cfg.check_every == "auto"
    every = 1 if auto else int(cfg.check_every)
    # The common (dense) layout tests ||dz||^2 - tol^2 ||z||^2 = (1 - tol^2) <z - a zp, z - b zp>
    # with a = 1/(1 - tol), b = 1/(1 + tol): one reduction and two fused subtractions per check.
    fused = q.dim() == 2 and cfg.tol < 0.5 and not auto
    if fused:
        a_m, a_p = 1.0 / (1.0 - cfg.tol), 1.0 / (1.0 + cfg.tol)
        floor_f = floor / (1.0 - tol2)
    aux = _first(it, s, cold)
    z, y = it.read(s, aux)
    s_prev = s
    # PR on a dense operator with a known reflection: u+ = R_G(y) in one operation, and z = prox(y)
    # only where a check reads it (z_prev too, unless the iteration before was checked)
    lazy = getattr(it, "reflect_prox", None)
    zk = 0  # the iteration of the z held
    bufs = [torch.empty_like(q) for _ in range(4)] if lazy is not None else []  # s and y, two each
    # each check's verdicts, one row per check (a copy per check; summed once at the end); the
    # table doubles when full, so its size follows the checks made, not the iteration cap
    seen = torch.empty((min(64, cfg.max_iter // every + 1), B), dtype=torch.bool, device=q.device)
    diverged = torch.zeros(B, dtype=torch.bool, device=q.device)
    ok: torch.Tensor  # these three are set at every check, and the last iteration is checked
    dz2: torch.Tensor
    zn: torch.Tensor

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 2 else t.reshape(B, -1)

    tiny = torch.finfo(q.dtype).tiny
    checked: list[int] | None = [] if auto else None
    previous: tuple[int, float] | None = None
    k = checks = 0
    due, first_gap = every, 2  # under "auto": the first check, and the gap to the second
    if auto and first_check is not None:
        due = min(max(int(first_check), 1), cfg.max_iter)
        first_gap = max(due // 8, 1)
    tested = -1  # the last iteration whose iterate was tested for divergence
    while k < cfg.max_iter:
        k += 1
        if lazy is not None:  # into the buffers of two iterations ago, which nothing reads now
            s_prev, s, y_prev = s, lazy(y, out=bufs[k & 1]), y
            y = it._reflect(s, out=bufs[2 + (k & 1)])
            if k < due and k < cfg.max_iter:
                continue
            z_prev = z if zk == k - 1 else it.prox(y_prev)
            z, zk = it.prox(y), k
        else:
            s_prev, z_prev = s, z
            s, aux = it.advance(s, aux, z, y)
            z, y = it.read(s, aux)
            if k < due and k < cfg.max_iter:
                continue
        checks += 1
        if checked is not None:
            checked.append(k)
        if checks > seen.shape[0]:
            seen = torch.cat([seen, torch.empty_like(seen)])
        if fused:  # four dispatches before the bookkeeping: the loop's overhead on small states
            e = torch.linalg.vecdot(torch.sub(z, z_prev, alpha=a_m), torch.sub(z, z_prev, alpha=a_p))
            ok = torch.le(e, floor_f, out=seen[checks - 1])  # a non-finite e fails, as below
        else:
            dz2 = torch.linalg.vector_norm(flat(z - z_prev), dim=1).square_()
            zn = torch.linalg.vector_norm(flat(z), dim=1)
            bound = torch.addcmul(floor, zn, zn, value=tol2)
            ok = torch.le(dz2, bound, out=seen[checks - 1])  # the verdicts go straight into the table
        if auto:  # one synchronization: the worst running sample's ratio (0 when none runs)
            diverged, tested = diverged | _diverging(s, limit2), k
            worst = float(dz2.div(bound.clamp_min_(tiny)).masked_fill_(ok | diverged, 0.0).max())
            if worst == 0.0:
                break
            due = k + (_next_gap(previous, k, worst) if previous is not None else first_gap)
            previous = (k, worst)
            continue
        due = k + every
        full = checks % 16 == 0 or k == cfg.max_iter
        done, diverged = _finished(ok, diverged, s, limit2, full)
        tested = k if full else tested
        if done:
            break
    if fused and checks:  # the residual terms of the last check, for the result
        dz2 = torch.linalg.vector_norm(z - z_prev, dim=1).square_()
        zn = torch.linalg.vector_norm(z, dim=1)
    ok, diverged = _final(ok, diverged, s, dz2, limit2, tested == k)
    passed = seen[:checks].sum(dim=0)
    return s, s_prev, z, k, checks, checks - passed, checked, dz2, zn.square(), ok, diverged


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample mask shaped to broadcast over ``like`` (batch first)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class _AndersonHistory:
    """The last ``M`` differences of accepted ``(T(b), g(b), x(T(b)))``, per sample, in place.

    Differences live in ``(batch, M, N)`` ring buffers; a slot not yet written, or written for a
    sample whose point was not accepted (a repeated entry), is a zero column, which the Tikhonov
    term sends to ``gamma_j = 0``, so every sample solves its own least-squares problem in one
    batched call.
    """

    def __init__(self, memory: int, like: torch.Tensor, with_x: bool) -> None:
        B = like.shape[0]
        N = like[0].numel()
        z = like.new_zeros
        self.M, self.slot = memory, 0
        self.dF, self.dG = z(B, memory, N), z(B, memory, N)
        self.dX = z(B, memory, N) if with_x else None
        self.last: tuple[torch.Tensor, ...] | None = None
        self.eye = torch.eye(memory, dtype=like.dtype, device=like.device)

    def push(self, F: torch.Tensor, G: torch.Tensor, X: torch.Tensor | None) -> bool:
        """Record an accepted triple; returns whether a difference is available."""
        B = F.shape[0]
        new = tuple(t.reshape(B, -1) for t in (F, G, X) if t is not None)
        if self.last is not None:
            i = self.slot % self.M
            bufs = [buf for buf in (self.dF, self.dG, self.dX) if buf is not None]
            for buf, a, b in zip(bufs, new, self.last, strict=True):
                torch.sub(a, b, out=buf[:, i])
            self.slot += 1
        self.last = new  # the loop never writes into F, G, X in place: no copies needed
        return self.slot > 0

    def mix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The type-II Anderson point ``F - dF gamma``, ``gamma = argmin ||G - dG gamma||``.

        Normal equations with ``lam = 1000 eps * mean(diag)`` (plus the smallest normal number);
        a singular system gives non-finite values, which the safeguard rejects.
        """
        assert self.last is not None
        F, G = self.last[0], self.last[1]
        gram = torch.bmm(self.dG, self.dG.transpose(1, 2))
        rhs = torch.bmm(self.dG, G.unsqueeze(-1))
        fin = torch.finfo(G.dtype)
        lam = 1e3 * fin.eps * gram.diagonal(dim1=1, dim2=2).mean(dim=1) + fin.tiny
        gamma, _ = torch.linalg.solve_ex(gram + lam[:, None, None] * self.eye, rhs)
        gT = gamma.transpose(1, 2)  # (B, 1, M)
        point = torch.baddbmm(F.unsqueeze(1), gT, self.dF, alpha=-1.0).squeeze(1)
        if self.dX is None:
            return point, None
        return point, torch.baddbmm(self.last[2].unsqueeze(1), gT, self.dX, alpha=-1.0).squeeze(1)


def _iterate_anderson(
    it: SplittingMap, s: torch.Tensor, q: torch.Tensor, cfg: SolverConfig, cold: bool = False
):
    """The safeguarded Anderson loop (module docstring); same outputs as :func:`_iterate`.

    ``b`` is the last accepted point, ``F = T(b)``, ``X`` the method's ``x`` of ``F``; every
    iteration evaluates ``T`` at ``p`` (the Anderson candidate, or ``F`` after a rejection).
    """
    B, shape = q.shape[0], s.shape
    tol2 = cfg.tol**2
    theta2 = ANDERSON_SAFEGUARD**2
    floor, limit2 = _limits(q, cfg)
    affine = bool(getattr(it, "affine_start", False))
    p, x = s, _first(it, s, cold)
    hist = _AndersonHistory(cfg.anderson, s, x is not None and affine)
    candidate = torch.zeros(B, dtype=torch.bool, device=q.device)  # p is an Anderson point
    b = F = zF = s
    X = x
    r2 = torch.full((B,), math.inf, dtype=q.dtype, device=q.device)  # ||g(b)||^2
    dz2 = torch.full((B,), math.inf, dtype=q.dtype, device=q.device)
    zn2 = torch.ones(B, dtype=q.dtype, device=q.device)
    pending = torch.zeros(B, dtype=torch.long, device=q.device)
    ok = torch.zeros(B, dtype=torch.bool, device=q.device)
    diverged = torch.zeros(B, dtype=torch.bool, device=q.device)
    k = 0
    while k < cfg.max_iter:
        k += 1
        zp, y = it.read(p, x)
        Tp, xT = it.advance(p, x, zp, y)
        zT, _ = it.read(Tp, xT)
        g = Tp - p
        rp2 = _sq(g)
        acc = ~candidate | (rp2 <= theta2 * r2)  # the safeguard; NaN candidates fail it
        r2 = torch.where(acc, rp2, r2)
        every = bool(acc.all())  # the common case: no per-sample selection
        a_s = _rows(acc, s)
        if every:
            b, F, X, zF, G = p, Tp, xT, zT, g
        else:
            b, F, zF = torch.where(a_s, p, b), torch.where(a_s, Tp, F), torch.where(a_s, zT, zF)
            G = F - b  # g where accepted (F - b = Tp - p there), the kept g(b) elsewhere
            X = None if xT is None or X is None else torch.where(a_s, xT, X)
        dz2 = torch.where(acc, _sq(zT - zp), dz2)
        zn2 = torch.where(acc, _sq(zT), zn2)
        ok = dz2 <= torch.add(floor, zn2, alpha=tol2)
        pending += ~ok
        done, diverged = _finished(ok, diverged, F, limit2, k % 16 == 0 or k == cfg.max_iter)
        if done:
            break
        # G = g(b): the new residual where accepted, a repeated entry (zero difference) elsewhere
        if not hist.push(F, G, X if hist.dX is not None else None):
            p, x, candidate = F, X, torch.zeros_like(acc)
            continue
        point, xm = hist.mix()
        point = point.reshape(shape)
        xm = it.start(point) if xm is None else xm.reshape(shape)
        p = point if every else torch.where(a_s, point, F)
        x = xm if every or X is None or xm is None else torch.where(a_s, xm, X)
        candidate = acc
    ok, diverged = _final(ok, diverged, F, dz2, limit2)
    return F, b, zF, k, k, pending, None, dz2, zn2, ok, diverged
