"""MonDEQ modules: the equilibrium layer (Winston-Kolter parameterization) and a classifier.

    W = (1 - m) I - A^T A + B - B^T,   m = softplus(m_raw) + floor   (or a fixed m)
    z* = relu(W z* + U x + b),         logits = C z* + c

The equilibrium is computed for *any* given weight: ``forward(x, W=W~)`` evaluates a quantized or
imported ``W~`` through exactly the same solver path as the float ``W``. A ``weight_transform``
(e.g. STE fake quantization for QAT) may be installed to map ``W`` before every solve. The module
knows nothing of MNIST.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from monquant.errors import ConfigError
from monquant.implicit import EquilibriumSolver
from monquant.operators import DenseOperator, margin, margin_tensor, wk_weight
from monquant.solvers import SolverConfig

__all__ = [
    "MonDEQClassifier",
    "MonDEQConfig",
    "MonDEQLayer",
    "default_solver",
    "register_margin",
    "softplus_inverse",
]


def check_margin_settings(margin_init: float, margin_floor: float, init_scale: float | None = None) -> None:
    """The margin parameterization's settings, checked for every layer config: ``margin_init > 0``,
    ``0 <= margin_floor < margin_init`` and (where a config has one) ``init_scale > 0``."""
    if not margin_init > 0:
        raise ConfigError(f"margin_init must be positive, got {margin_init}")
    if not 0 <= margin_floor < margin_init:
        raise ConfigError(f"margin_floor must be in [0, margin_init={margin_init}), got {margin_floor}")
    if init_scale is not None and not init_scale > 0:
        raise ConfigError(f"init_scale must be positive, got {init_scale}")


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    if y <= 0:
        raise ConfigError(f"softplus takes only positive values, got {y}")
    return y + math.log(-math.expm1(-y))


@dataclass
class MonDEQConfig:
    """Architecture and solver settings (stored in checkpoints)."""

    in_features: int = 784
    hidden: int = 100
    out_features: int = 10
    rank: int | None = None
    margin_init: float = 1.0
    learn_margin: bool = True
    margin_floor: float = 0.0
    solver: dict = field(default_factory=lambda: SolverConfig().as_dict())
    backward: str = "splitting"
    backward_tol: float | None = None
    parameterization: str = "wk"
    #: ``uniform``: A, B ~ U(+-1/sqrt(n)), U and b as ``nn.Linear``; ``paper``: the paper's code,
    #: A, B (its S) and U ~ 0.01 N(0, 1), b = 0.
    init: str = "uniform"

    def __post_init__(self) -> None:
        if self.parameterization not in ("wk", "free"):
            raise ConfigError(
                f"parameterization must be 'wk' or 'free', got {self.parameterization!r}"
            )
        for name in ("in_features", "hidden", "out_features"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.rank is not None and not 1 <= int(self.rank) <= int(self.hidden):
            raise ConfigError(f"rank must be in [1, hidden={self.hidden}], got {self.rank}")
        check_margin_settings(self.margin_init, self.margin_floor)
        if self.init not in ("uniform", "paper"):
            raise ConfigError(f"init must be 'uniform' or 'paper', got {self.init!r}")
        if self.backward not in ("splitting", "direct"):
            raise ConfigError(f"backward must be 'splitting' or 'direct', got {self.backward!r}")

    def solver_config(self) -> SolverConfig:
        return SolverConfig.from_dict(self.solver)

    def as_dict(self) -> dict:
        return asdict(self)


def register_margin(layer: nn.Module, m_raw: torch.Tensor, learn: bool) -> None:
    """``m_raw`` on ``layer``: a parameter when the margin is learned, else a buffer."""
    if learn:
        layer.m_raw = nn.Parameter(m_raw)
    else:
        layer.register_buffer("m_raw", m_raw)


def default_solver(config: Any) -> EquilibriumSolver:
    """The equilibrium solver a layer's config describes (forward settings, backward mode)."""
    return EquilibriumSolver(forward_config=config.solver_config(),
                             backward=config.backward, backward_tol=config.backward_tol)  # fmt: skip


class MonDEQLayer(nn.Module):
    """Equilibrium layer ``z* = relu(W z* + U x + b)``.

    ``parameterization="wk"`` (default): ``W`` in Winston-Kolter form from ``A``, ``B``, ``m_raw``
    (monotone with margin >= m by construction). ``"free"``: ``W`` itself is the parameter
    (initialised in W-K form); nothing keeps it monotone, so only a certificate can vouch for it
    (used for ProxQuant on the assembled ``W``).

    Hooks: ``weight_transform(W)`` maps the assembled weight before every solve (STE QAT; the
    training solves' step is then at most that of ``W``'s estimated constants, as the solver says);
    ``factor_transform(name, tensor)`` maps ``A``, ``B`` (and ``U``) before they are used (lazy
    quantization of the factors).
    """

    def __init__(self, config: MonDEQConfig, solver: EquilibriumSolver | None = None) -> None:
        super().__init__()
        self.config = config
        n, d = config.hidden, config.in_features
        r = config.rank or n
        self.U = nn.Linear(d, n)
        if config.init == "paper":
            A, B = 0.01 * torch.randn(r, n), 0.01 * torch.randn(n, n)
            with torch.no_grad():
                self.U.weight.copy_(0.01 * torch.randn(n, d))
                self.U.bias.zero_()
        else:
            bound = 1.0 / math.sqrt(n)
            A = torch.empty(r, n).uniform_(-bound, bound)
            B = torch.empty(n, n).uniform_(-bound, bound)
        # m = softplus(m_raw) + floor starts at margin_init
        m_raw = torch.tensor(softplus_inverse(config.margin_init - config.margin_floor))
        if config.parameterization == "free":
            self.W = nn.Parameter(wk_weight(A, B, F.softplus(m_raw)).detach())
        else:
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(B)
            register_margin(self, m_raw, config.learn_margin)
        self.solver = solver or default_solver(config)
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.factor_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    @property
    def free(self) -> bool:
        return self.config.parameterization == "free"

    def margin(self) -> torch.Tensor:
        """The parameterized margin ``m = softplus(m_raw) + floor`` (a lower bound on margin(W)).

        For the free parameterization: the exact ``margin(W)`` (no gradient).
        """
        if self.free:
            return torch.tensor(margin(self.W), dtype=self.W.dtype)
        return F.softplus(self.m_raw) + self.config.margin_floor

    def factor(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (``A``, ``B``, ``U`` or ``b``) after ``factor_transform``, if any."""
        t = self.U.weight if name == "U" else self.U.bias if name == "b" else getattr(self, name)
        return self.factor_transform(name, t) if self.factor_transform is not None else t

    def weight(self) -> torch.Tensor:
        """The float weight ``W = (1 - m) I - A^T A + B - B^T`` (or the free ``W``)."""
        if self.free:
            return self.W
        return wk_weight(self.factor("A"), self.factor("B"), self.margin())

    def reference_weight(self) -> torch.Tensor:
        """The float ``W``, detached: the reference a quantized ``W~`` is certified against."""
        return self.weight().detach()

    def operator_of(self, W: torch.Tensor) -> DenseOperator:
        """The operator of a weight matrix (e.g. a quantized ``W~``)."""
        return DenseOperator(W)

    def margin_of(self, W: torch.Tensor) -> torch.Tensor:
        """The exact ``margin(W) = lmin(sym(I - W))``, differentiable."""
        return margin_tensor(W)

    def effective_weight(self) -> torch.Tensor:
        """The weight used by the forward pass: ``weight_transform(W)`` if one is installed."""
        W = self.weight()
        return self.weight_transform(W) if self.weight_transform is not None else W

    def float64_problem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, q)`` in float64 without a graph: the operator and injections for ``x``.

        For certification-grade solves (tolerances down to 1e-12).
        """
        with torch.no_grad():
            W = self.weight().detach().double()
            q = self.injection(x.double(), self.U.weight.double(), self.U.bias.double())
        return W, q

    def injection(
        self, x: torch.Tensor, U: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``q = U x + b`` (rows), optionally with replacement ``U`` / ``b``."""
        U_ = self.factor("U") if U is None else U
        b_ = self.factor("b") if b is None else b
        return F.linear(x, U_.to(x.dtype), b_.to(x.dtype))

    def forward(
        self,
        x: torch.Tensor,
        W: torch.Tensor | None = None,
        U: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.injection(x, U, b)
        if W is not None:
            return self.solver(W.to(q.dtype), q)
        Wf = self.weight()
        W_ = self.weight_transform(Wf) if self.weight_transform is not None else Wf
        # a transformed W~ (QAT): the float W's constants cap the training solves' step (solver docs)
        return self.solver(W_.to(q.dtype), q, step_from=Wf if W_ is not Wf else None)


class MonDEQClassifier(nn.Module):
    """Injection + equilibrium layer + linear head: ``logits = C z* + c``."""

    def __init__(self, config: MonDEQConfig | None = None) -> None:
        super().__init__()
        self.config = config or MonDEQConfig()
        self.layer = MonDEQLayer(self.config)
        self.head = nn.Linear(self.config.hidden, self.config.out_features)

    @property
    def solver(self) -> EquilibriumSolver:
        return self.layer.solver

    def forward(
        self,
        x: torch.Tensor,
        W: torch.Tensor | None = None,
        U: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z = self.layer(x, W=W, U=U, b=b)
        return F.linear(z, self.head.weight.to(z.dtype), self.head.bias.to(z.dtype))
