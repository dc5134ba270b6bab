"""Multi-tier convolutional MonDEQ modules: the equilibrium layer and an MNIST-style classifier.

    z* = relu(W z* + q),   q_0 = U * x + b_0 (tier 0),  q_i = b_i (tier i > 0),
    logits = C z*_{T-1} + c   (the coarsest tier, flattened)

``W`` is the multi-tier Winston-Kolter form of
:class:`~monquant.operators.multitier.MultiTierWKOperator`: ``T`` tiers of ``c_i`` channels on
``H / 2^i x W / 2^i`` images, circular ``k x k`` convolutions on each tier and stride-2 couplings
from each tier to the next, block lower bidiagonal, monotone with margin ``>= m`` by construction.
PR's resolvent is a forward substitution over the tiers (one ``c_i x c_i`` inverse per frequency
of each tier); the backward is the implicit adjoint solve through the operator protocol.

A multi-tier layer has no single weight tensor: its quantization acts on the operator's composite
kernels (one per diagonal block and per coupling). :meth:`MultiTierMonDEQLayer.reference_weight`
therefore returns the float *operator*, and ``forward(x, W=op)`` evaluates any operator on the same
tiers (e.g. a quantized :class:`~monquant.operators.multitier.MultiTierConvOperator`). The module
knows nothing of MNIST.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from monquant.errors import ConfigError
from monquant.implicit import EquilibriumSolver
from monquant.model import check_margin_settings, default_solver, register_margin, softplus_inverse
from monquant.operators.conv import check_kernel
from monquant.operators.matrix import OperatorError
from monquant.operators.multitier import (
    MultiTierConvOperator,
    MultiTierWKOperator,
    TieredOperator,
    split_tiers,
    tier_images,
)
from monquant.solvers import SolverConfig

__all__ = ["MultiTierMonDEQClassifier", "MultiTierMonDEQConfig", "MultiTierMonDEQLayer"]


@dataclass
class MultiTierMonDEQConfig:
    """Architecture and solver settings of a multi-tier MonDEQ (stored in checkpoints).

    ``arch`` is always ``"multitier"``. ``tier_channels``: the channels of each tier (two or
    more tiers; the image must be divisible by ``2^(tiers - 1)`` and the coarsest tier at least
    ``2k - 1`` wide, so that the composite kernels do not alias). ``init_scale``: the factors start
    as ``init_scale / (k sqrt(c_i))`` times standard normal entries. ``output``: what the layer
    returns (``last``: the coarsest tier; ``all``: the flattened state).
    """

    in_channels: int = 1
    image: tuple[int, int] = (28, 28)
    tier_channels: tuple[int, ...] = (8, 16, 32)
    kernel: int = 3
    rank: int | None = None
    out_features: int = 10
    margin_init: float = 0.5
    learn_margin: bool = True
    margin_floor: float = 0.0
    init_scale: float = 0.1
    output: str = "last"
    solver: dict = field(default_factory=lambda: SolverConfig().as_dict())
    backward: str = "splitting"
    backward_tol: float | None = None
    arch: str = "multitier"

    def __post_init__(self) -> None:
        if self.arch != "multitier":
            raise ConfigError(f"a MultiTierMonDEQConfig has arch 'multitier', got {self.arch!r}")
        try:
            self.image = (int(self.image[0]), int(self.image[1]))
            self.tier_channels = tuple(int(c) for c in self.tier_channels)
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"image must be (H, W) and tier_channels integers, got {self.image!r}, "
                              f"{self.tier_channels!r}") from None  # fmt: skip
        if len(self.tier_channels) < 2 or min(self.tier_channels) < 1:
            raise ConfigError("tier_channels needs two or more positive counts, got "
                              f"{list(self.tier_channels)}")  # fmt: skip
        for name in ("in_channels", "out_features", "kernel"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        k = int(self.kernel)
        for img in tier_images(self.image, len(self.tier_channels)):
            check_kernel(torch.zeros(1, 1, 2 * k - 1, 2 * k - 1), img)  # composite kernels fit
        if self.rank is not None and int(self.rank) < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        check_margin_settings(self.margin_init, self.margin_floor, self.init_scale)
        if self.output not in ("last", "all"):
            raise ConfigError(f"output must be 'last' or 'all', got {self.output!r}")
        if self.backward != "splitting":
            raise ConfigError("a multi-tier MonDEQ has no dense direct backward: use backward='splitting'")

    @property
    def images(self) -> list[tuple[int, int]]:
        return tier_images(self.image, len(self.tier_channels))

    @property
    def in_features(self) -> int:
        """Entries of one flattened input image (``in_channels * H * W``)."""
        return self.in_channels * self.image[0] * self.image[1]

    @property
    def state_size(self) -> int:
        """Entries of one equilibrium state (all tiers)."""
        return sum(c * h * w for c, (h, w) in zip(self.tier_channels, self.images, strict=True))

    @property
    def output_size(self) -> int:
        """Entries of the layer's output per sample (the coarsest tier, or the whole state)."""
        h, w = self.images[-1]
        return self.tier_channels[-1] * h * w if self.output == "last" else self.state_size

    def solver_config(self) -> SolverConfig:
        return SolverConfig.from_dict(self.solver)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image"] = list(self.image)
        d["tier_channels"] = list(self.tier_channels)
        return d


def check_qat_parts(parts: tuple[str, ...] | list[str]) -> None:
    """A multi-tier model quantizes ``W`` (its composite kernels) and nothing else."""
    if tuple(parts) != ("W",):
        raise ConfigError(f"a multi-tier model quantizes W (its composite kernels) only, got {list(parts)}")


def fake_quant_tiers(op: Any, bits: int, granularity: str = "per-tensor", step_rule: str = "paper") -> Any:
    """A multi-tier operator's composite kernels (differentiable in its factors) fake-quantized,
    each on its own grid, with straight-through gradients: the ``W~`` that PTQ deploys from the
    same weights (:func:`monquant.certify_multitier.quantize_kernels`), up to the dtype the kernels
    are formed in."""
    from monquant.quant.uniform import fake_quant

    kernels = op.composite(differentiable=True).kernels()
    return MultiTierConvOperator.from_kernels(
        [fake_quant(K, bits, granularity, step_rule=step_rule) for K in kernels], op.image, checked=True)


class MultiTierMonDEQLayer(nn.Module):
    """Equilibrium layer on a multi-tier state (module docstring). ``x`` has shape ``(batch,
    in_channels, H, W)`` (or is flattened to ``(batch, in_channels * H * W)``).

    Hooks, as on the dense and convolutional layers: ``weight_transform(op)`` maps the float
    operator to the one the forward solve uses (STE QAT: every composite kernel fake-quantized,
    :func:`monquant.training.loop.install_qat`); ``factor_transform`` is unused here.
    """

    def __init__(self, config: MultiTierMonDEQConfig, solver: EquilibriumSolver | None = None) -> None:
        super().__init__()
        self.config = config
        ch, k = config.tier_channels, config.kernel
        ranks = [config.rank or c for c in ch]
        g = [config.init_scale / (k * c**0.5) for c in ch]
        self.P = nn.ParameterList([nn.Parameter(g[i] * torch.randn(ranks[i], c, k, k))
                                   for i, c in enumerate(ch)])  # fmt: skip
        self.Q = nn.ParameterList([nn.Parameter(g[i] * torch.randn(ranks[i], ch[i + 1], k, k))
                                   for i in range(len(ch) - 1)])  # fmt: skip
        self.B = nn.ParameterList([nn.Parameter(g[i] * torch.randn(c, c, k, k)) for i, c in enumerate(ch)])
        self.U = nn.Conv2d(config.in_channels, ch[0], k, padding=k // 2)
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in ch[1:]])
        m_raw = torch.tensor(softplus_inverse(config.margin_init - config.margin_floor))
        register_margin(self, m_raw, config.learn_margin)
        self.solver = solver or default_solver(config)
        self.weight_transform: Callable[[Any], Any] | None = None
        self.factor_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    @property
    def channels(self) -> tuple[int, ...]:
        return self.config.tier_channels

    @property
    def images(self) -> list[tuple[int, int]]:
        return self.config.images

    @property
    def image(self) -> tuple[int, int]:
        return self.config.image

    @property
    def kernel(self) -> int:
        return self.config.kernel

    @property
    def free(self) -> bool:
        return False

    def margin(self) -> torch.Tensor:
        """``m = softplus(m_raw) + margin_floor``: a lower bound on margin(W) by construction."""
        m_raw = self.m_raw
        assert isinstance(m_raw, torch.Tensor)
        return F.softplus(m_raw) + self.config.margin_floor

    def operator(self) -> MultiTierWKOperator:
        """The float ``W`` (differentiable in the factors and ``m``)."""
        return MultiTierWKOperator(list(self.P), list(self.Q), list(self.B), self.margin(), self.image,
                                   checked=True)  # fmt: skip

    def reference_weight(self) -> MultiTierWKOperator:
        """The float operator, detached: what a quantized operator is certified against (a
        multi-tier layer has no single weight tensor; module docstring)."""
        return self.operator().detach()

    def operator_of(self, W: Any) -> TieredOperator:
        """``W`` itself, checked to be an operator on this layer's tiers."""
        if not isinstance(W, TieredOperator) or W.channels != self.channels or W.images != self.images:
            raise OperatorError(f"an operator for this layer has tiers {list(self.channels)} on "
                                f"{self.image[0]}x{self.image[1]}; got {W!r}")  # fmt: skip
        return W

    def used_operator(self, W: Any = None) -> TieredOperator:
        """The operator the forward solve uses: ``W`` (an operator on the same tiers) if given,
        else the float one, mapped by ``weight_transform`` when one is installed."""
        if W is not None:
            return self.operator_of(W)
        op = self.operator()
        return self.weight_transform(op) if self.weight_transform is not None else op

    def effective_weight(self) -> TieredOperator:
        """The operator the forward pass uses (the training loop's name for it)."""
        return self.used_operator()

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        """``q``: ``U * x + b_0`` on tier 0 and ``b_i`` on tier ``i``, flattened ``(batch, n)``."""
        c = self.config
        if x.dim() == 2 and x.shape[1] == c.in_features:
            x = x.reshape(x.shape[0], c.in_channels, *c.image)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, *c.image):
            raise ConfigError(f"input must have shape (batch, {c.in_channels}, {c.image[0]}, "
                              f"{c.image[1]}), got {tuple(x.shape)}")  # fmt: skip
        bias = self.U.bias
        assert bias is not None
        q0 = F.conv2d(x, self.U.weight.to(x.dtype), bias.to(x.dtype), padding=c.kernel // 2)
        tiers = [q0] + [b.to(x.dtype)[None, :, None, None].expand(x.shape[0], -1, *img)
                        for b, img in zip(self.bias, self.images[1:], strict=True)]  # fmt: skip
        return torch.cat([t.flatten(1) for t in tiers], dim=1)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The tiers ``(batch, c_i, H_i, W_i)`` of a flattened state."""
        return split_tiers(z, self.channels, self.images)

    def solve(
        self, x: torch.Tensor, op: TieredOperator, step_from: TieredOperator | None = None
    ) -> torch.Tensor:
        """The equilibrium with operator ``op``: the coarsest tier, or the flattened state
        (``step_from``: the float operator whose constants cap a training solve's step when
        ``op`` is its fake-quantized version, :class:`~monquant.implicit.EquilibriumSolver`)."""
        q = self.injection(x)
        z = self.solver(op.to(dtype=q.dtype) if op.dtype != q.dtype else op, q, step_from=step_from)
        return z if self.config.output == "all" else self.split(z)[-1]

    def forward(self, x: torch.Tensor, W: Any = None) -> torch.Tensor:
        ref = self.operator() if W is None and self.weight_transform is not None else None
        return self.solve(x, self.used_operator(W), step_from=ref)


class MultiTierMonDEQClassifier(nn.Module):
    """Multi-tier equilibrium layer + linear head on its coarsest tier: ``logits = C z*_{T-1} + c``.
    Takes flattened images ``(batch, in_channels * H * W)`` (as :mod:`monquant.data` yields them)
    or ``(batch, in_channels, H, W)``."""

    def __init__(self, config: MultiTierMonDEQConfig | None = None) -> None:
        super().__init__()
        self.config = config or MultiTierMonDEQConfig()
        self.layer = MultiTierMonDEQLayer(self.config)
        self.head = nn.Linear(self.config.output_size, self.config.out_features)

    @property
    def solver(self) -> EquilibriumSolver:
        return self.layer.solver

    def forward(self, x: torch.Tensor, W: Any = None, U: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if U is not None or b is not None:
            raise ConfigError("a multi-tier MonDEQ quantizes W (its composite kernels) only, not U or b")
        f = self.layer(x, W=W).flatten(1)
        return F.linear(f, self.head.weight.to(f.dtype), self.head.bias.to(f.dtype))
