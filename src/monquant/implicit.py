"""Implicit differentiation of the MonDEQ equilibrium (docs/theory.md section 1, Theorem 5).

At the equilibrium ``z* = relu(W z* + q)`` let ``D = diag(1[W z* + q > 0])``. The implicit function
theorem gives ``dz* = (I - D W)^{-1} D (dW z* + dq)``, so for a loss gradient ``g = dl/dz*``

    v = (I - W^T D)^{-1} g,     y = D v,     dl/dq = y,     dl/dW = y z*^T

(summed over the batch). ``y`` is itself the equilibrium of an adjoint MonDEQ,

    y = P_D(W^T y + g),         P_D(v) = D v (a projection, i.e. the prox of a subspace indicator),

whose linear part ``I - W^T`` has the same margin and Lipschitz constant as the forward problem, so
the same splitting method with the same step converges with the same modulus (Theorem 5). Both
backward modes are offered: ``"splitting"`` (the path the theory covers) and ``"direct"`` (a batched
dense linear solve, exact, for small ``n``). Gradients reach ``W`` and ``q`` and, through autograd,
whatever built them (A, B, m_raw, U, b, x).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from monquant.operators import DenseOperator, MonotoneOperator, as_operator
from monquant.solvers import (
    SolverConfig,
    SolverResult,
    StepEstimates,
    first_check_after,
    get_solver,
    mask_prox,
    solve,
    solver_step,
)

__all__ = ["BackwardMode", "EquilibriumSolver", "SolveCounters", "direct_adjoint"]

BackwardMode = Literal["splitting", "direct"]


def direct_adjoint(W: torch.Tensor, active: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Exact adjoint ``y = D (I - W^T D)^{-1} g`` per sample by a batched dense solve.

    ``active`` is the ``(batch, n)`` 0/1 pattern of ``D``; rows of ``g`` are samples.
    """
    n = W.shape[0]
    d = active.to(g.dtype)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    M = eye - W.T.to(g.dtype).unsqueeze(0) * d.unsqueeze(1)  # I - W^T diag(d_b), per sample
    v = torch.linalg.solve(M, g.unsqueeze(-1)).squeeze(-1)
    return d * v


@dataclass
class SolveCounters:
    """Running totals over solves: how many samples were solved and how many did not converge."""

    forward_samples: int = 0
    forward_unconverged: int = 0
    forward_iterations: int = 0
    forward_max_iterations: int = 0
    backward_samples: int = 0
    backward_unconverged: int = 0
    backward_iterations: int = 0

    def add_forward(self, r: SolverResult) -> None:
        self.forward_samples += r.z.shape[0]
        self.forward_unconverged += r.n_unconverged
        self.forward_iterations += int(r.sample_iterations.sum())
        self.forward_max_iterations = max(
            self.forward_max_iterations, int(r.sample_iterations.max())
        )

    def add_backward(self, r: SolverResult) -> None:
        self.backward_samples += r.z.shape[0]
        self.backward_unconverged += r.n_unconverged
        self.backward_iterations += int(r.sample_iterations.sum())

    def summary(self) -> dict[str, float]:
        fs, bs = max(self.forward_samples, 1), max(self.backward_samples, 1)
        return {
            "forward_samples": self.forward_samples,
            "forward_iterations": self.forward_iterations,
            "forward_unconverged": self.forward_unconverged,
            "forward_mean_iterations": self.forward_iterations / fs,
            "forward_max_iterations": self.forward_max_iterations,
            "backward_samples": self.backward_samples,
            "backward_unconverged": self.backward_unconverged,
            "backward_mean_iterations": self.backward_iterations / bs,
        }


@dataclass
class EquilibriumSolver:
    """The differentiable equilibrium map ``(W, q) -> z*`` with its solver settings and a log.

    ``forward_config`` configures the forward solve; the splitting backward uses the same method
    and step with ``backward_tol`` (default: the forward tolerance). ``last_forward`` /
    ``last_backward`` keep the latest :class:`SolverResult`; ``counters`` accumulates totals so that
    unconverged solves are counted and reported, never hidden. Under ``spectral="estimate"`` the
    forward solves take their ``m`` and ``L`` from ``estimates``, which follows
    the weights from one solve to the next (:class:`~monquant.solvers.StepEstimates`), and, under
    ``check_every="auto"``, each forward (adjoint) solve makes its first residual check at nine
    tenths of the iterations of the previous forward (adjoint) solve (``first_check`` of
    :func:`~monquant.solvers.solve`): consecutive training batches need about as many
    iterations, so the probes at iterations 1 and 3 are spared. Only the schedule moves: every
    verdict is still the full test at a checked iteration. :meth:`reset` forgets both (the
    training loop resets at each epoch). A solve given ``step_from`` (:meth:`__call__`) follows
    that operator's constants in ``reference_estimates`` the same way.
    """

    forward_config: SolverConfig = field(default_factory=SolverConfig)
    backward: BackwardMode = "splitting"
    backward_tol: float | None = None
    counters: SolveCounters = field(default_factory=SolveCounters)
    last_forward: SolverResult | None = None
    last_backward: SolverResult | None = None
    estimates: StepEstimates = field(default_factory=StepEstimates, repr=False, compare=False)
    reference_estimates: StepEstimates = field(default_factory=StepEstimates, repr=False, compare=False)
    #: under ``spectral="estimate"``: the iterations of the last forward / adjoint solve
    last_iterations: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __call__(
        self,
        W: torch.Tensor | MonotoneOperator,
        q: torch.Tensor,
        step_from: torch.Tensor | MonotoneOperator | None = None,
    ) -> torch.Tensor:
        """Equilibrium ``z*`` of ``z = relu(W z + q)``, differentiable in ``W`` (a matrix or any
        operator's parameters) and ``q``.

        ``step_from``: under ``spectral="estimate"``, an operator whose estimated ``m`` and ``L``
        cap the step: the solve takes the smaller of the steps that ``W``'s constants and
        ``step_from``'s give. The layers pass the float operator while their forward pass solves
        with its fake-quantized ``W~ = Q_b(W)``: rounding can take the estimated ``margin(W~)``
        to 0+, where ``1/sqrt(m~ L~)`` grows without bound, while PR, whose step sets only the
        speed, converges on ``W~`` about as fast as on ``W`` (docs/theory.md, "Step policies").
        It moves the step only: the solve is of ``W``, and exact constants (every other solve)
        are always ``W``'s own."""
        if isinstance(W, DenseOperator):
            W = W.W
        if step_from is not None:  # no gradient flows to it
            step_from = step_from.detach()
        if isinstance(W, MonotoneOperator):
            params = W.parameters()
            wants = q.requires_grad or any(p.requires_grad for p in params)
            if torch.is_grad_enabled() and wants:
                return _OperatorEquilibrium.apply(q, self, W, step_from, *params)
        elif torch.is_grad_enabled() and (W.requires_grad or q.requires_grad):
            return _Equilibrium.apply(W, q, self, step_from)
        result = self._solve_forward(W, q, step_from)
        self._record_forward(result)
        return result.z

    @contextmanager
    def configured(self, config: SolverConfig) -> Iterator[EquilibriumSolver]:
        """Solve with ``config`` inside the block (forward solves, and the adjoint solves that
        follow them), and with the solver's own settings again after it, whatever happens."""
        saved = self.forward_config
        self.forward_config = config
        try:
            yield self
        finally:
            self.forward_config = saved

    def reset(self) -> None:
        """Forget what follows the weights from solve to solve (:attr:`estimates`,
        :attr:`reference_estimates`, :attr:`last_iterations`): the next solve starts cold, so a
        resumed run repeats an epoch exactly."""
        self.estimates.reset()
        self.reference_estimates.reset()
        self.last_iterations.clear()

    def _first_check(self, side: str, cfg: SolverConfig) -> int | None:
        """The first check of a ``side`` solve (``"forward"`` or ``"adjoint"``) under ``cfg``:
        nine tenths of the previous such solve's iterations, under ``spectral="estimate"``."""
        k = self.last_iterations.get(side) if cfg.spectral == "estimate" else None
        return None if k is None else first_check_after(k)

    def _stopped(self, side: str, cfg: SolverConfig, result: SolverResult) -> None:
        if cfg.spectral == "estimate":
            self.last_iterations[side] = result.iterations

    def _solve_forward(
        self,
        W: torch.Tensor | MonotoneOperator,
        q: torch.Tensor,
        step_from: torch.Tensor | MonotoneOperator | None = None,
    ) -> SolverResult:
        """The forward solve; under ``spectral="estimate"`` its constants come from
        :attr:`estimates` (PR, DR), its step is at most that of ``step_from``'s constants
        (:attr:`reference_estimates`), and its first check comes from :attr:`last_iterations`."""
        cfg = self.forward_config
        stats = None
        method = get_solver(cfg.method)
        if cfg.spectral == "estimate" and method.uses_resolvent:
            stats = self.estimates(W.detach().to(dtype=q.dtype, device=q.device))
            if step_from is not None and cfg.step is None:
                ref = self.reference_estimates(step_from.to(dtype=q.dtype, device=q.device))
                cap = solver_step(method, cfg.step_policy, ref.m, ref.L)
                if cap < solver_step(method, cfg.step_policy, stats.m, stats.L):
                    cfg = replace(cfg, step=cap)
        result = solve(W, q, cfg, stats=stats, first_check=self._first_check("forward", cfg))
        self._stopped("forward", cfg, result)
        return result

    def _record_forward(self, result: SolverResult) -> None:
        self.last_forward = result
        self.counters.add_forward(result)

    def adjoint(
        self,
        W: torch.Tensor | MonotoneOperator,
        q: torch.Tensor,
        z: torch.Tensor,
        g: torch.Tensor,
        forward: SolverResult | None = None,
    ) -> torch.Tensor:
        """``y = D (I - W^T D)^{-1} g`` by the configured backward mode.

        The splitting mode solves the adjoint problem on the transposed operator; ``forward`` is
        the forward solve's result: its step, spectral constants and resolvent are reused.
        """
        op = as_operator(W)
        active = (op.apply(z) + q) > 0
        if self.backward == "direct":
            return direct_adjoint(op.dense(), active, g)
        fwd = forward
        stats = fwd.stats if fwd is not None else op.spectral_stats()
        cfg = self.forward_config
        bcfg = replace(  # every other setting (method, cap, checks, step policy) as the forward's
            cfg,
            step=fwd.step if fwd is not None else cfg.step,
            tol=self.backward_tol if self.backward_tol is not None else cfg.tol,
        )
        K = fwd.resolvent if fwd is not None else None
        result = solve(
            op.transpose(),
            g,
            bcfg,
            prox=mask_prox(active),
            stats=stats,
            resolvent=None if K is None else K.T,
            first_check=self._first_check("adjoint", bcfg),
        )
        self._stopped("adjoint", bcfg, result)
        self.last_backward = result
        self.counters.add_backward(result)
        return result.z


def _kept(result: SolverResult) -> tuple[torch.Tensor, SolverResult]:
    """The equilibrium to return from an autograd function, and the result to keep with a
    detached alias of it (same storage): the returned tensor becomes a graph node, and a kept
    graph node would make the layer impossible to ``copy.deepcopy`` and tie ``ctx`` in a cycle."""
    return result.z, replace(result, z=result.z.detach())


class _Equilibrium(torch.autograd.Function):
    """Forward: solve without a graph. Backward: adjoint equilibrium (Theorem 5)."""

    @staticmethod
    def forward(ctx, W: torch.Tensor, q: torch.Tensor, owner: EquilibriumSolver,  # type: ignore[override]
                step_from: torch.Tensor | MonotoneOperator | None):  # fmt: skip
        z, result = _kept(owner._solve_forward(W, q, step_from))
        owner._record_forward(result)
        Wq = W.detach().to(q.dtype)
        ctx.owner = owner
        ctx.result = result
        ctx.save_for_backward(Wq, q.detach(), z)
        ctx.w_dtype = W.dtype
        return z

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        W, q, z = ctx.saved_tensors
        y = ctx.owner.adjoint(W, q, z, g, forward=ctx.result)
        grad_W = (y.T @ z).to(ctx.w_dtype) if ctx.needs_input_grad[0] else None
        grad_q = y if ctx.needs_input_grad[1] else None
        return grad_W, grad_q, None, None


class _OperatorEquilibrium(torch.autograd.Function):
    """The same map for any operator: parameter gradients by a vector-Jacobian product.

    ``dl/dtheta = d/dtheta <y, W(theta) z*>`` with ``y`` the adjoint equilibrium, i.e. one
    ``torch.autograd.grad`` of :meth:`MonotoneOperator.apply` at ``z*`` (for a dense ``W`` this is
    ``y z*^T``).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, owner: EquilibriumSolver, op: MonotoneOperator,  # type: ignore[override]
                step_from: torch.Tensor | MonotoneOperator | None, *params):  # fmt: skip
        opd = op.with_parameters(tuple(p.detach() for p in params))
        z, result = _kept(owner._solve_forward(opd, q, step_from))
        owner._record_forward(result)
        ctx.owner, ctx.result, ctx.op = owner, result, op
        ctx.save_for_backward(q.detach(), z, *params)
        return z

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        q, z, *params = ctx.saved_tensors
        op = ctx.op.with_parameters(tuple(p.detach() for p in params)).to(dtype=q.dtype)
        y = ctx.owner.adjoint(op, q, z, g, forward=ctx.result)
        grads: list[torch.Tensor | None] = [None] * len(params)
        need = [i for i, p in enumerate(params) if ctx.needs_input_grad[4 + i]]
        if need:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) for p in params]
                out = ctx.op.with_parameters(tuple(leaves)).apply(z.to(leaves[0].dtype))
                found = torch.autograd.grad(
                    out, [leaves[i] for i in need], grad_outputs=y.to(out.dtype), allow_unused=True
                )
            for i, gi in zip(need, found, strict=True):
                grads[i] = torch.zeros_like(params[i]) if gi is None else gi
        grad_q = y if ctx.needs_input_grad[0] else None
        return (grad_q, None, None, None, *grads)
