"""Single-convolution MonDEQ modules: the equilibrium layer and an MNIST-style classifier.

    W = (1 - m) I - A^T A + B - B^T     (A, B circular k x k convolutions on a c x H x W state)
    z* = relu(W z* + U * x + b),        logits = C pool(z*) + c

``A`` (``rank x c x k x k``) and ``B`` (``c x c x k x k``) are circular convolutions, so ``W`` is
monotone with margin ``>= m`` for any parameters (:class:`~monquant.operators.conv.ConvWKOperator`),
and PR's resolvent is one ``c x c`` inverse per 2-D frequency. ``U`` is an ordinary zero-padded
``k x k`` convolution of the input with bias ``b``.

The analogue of the dense layer's weight matrix is the **composite kernel** ``K`` of ``W``: one
``c x c x (2k - 1) x (2k - 1)`` kernel whose circular convolution is ``W`` (the identity, ``A^T A``
and ``B - B^T`` taps together). :meth:`ConvMonDEQLayer.weight` returns it (differentiable), a
``weight_transform`` (STE fake quantization for QAT) maps it before the solve, and
``forward(x, W=K~)`` evaluates a quantized kernel through the same solver path, exactly as the
dense layer does with ``W~``. The module knows nothing of MNIST.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from monquant.errors import ConfigError
from monquant.implicit import EquilibriumSolver
from monquant.model import check_margin_settings, default_solver, register_margin, softplus_inverse
from monquant.operators.conv import (
    CircularConvOperator,
    ConvWKOperator,
    check_kernel,
    fourier_blocks,
)
from monquant.operators.matrix import OperatorError
from monquant.solvers import SolverConfig

__all__ = ["ConvMonDEQClassifier", "ConvMonDEQConfig", "ConvMonDEQLayer", "conv_margin_tensor"]


@dataclass
class ConvMonDEQConfig:
    """Architecture and solver settings of a single-convolution MonDEQ (stored in checkpoints).

    ``arch`` is always ``"conv"``: it tells a checkpoint's reader which model to build.
    ``pool``: the classifier's average pooling before its linear head (``H`` and ``W`` must be
    multiples of it); ``init_scale``: ``A`` and ``B`` start as ``init_scale / (k sqrt(c))`` times
    standard normal entries.
    """

    in_channels: int = 1
    image: tuple[int, int] = (28, 28)
    channels: int = 16
    kernel: int = 3
    rank: int | None = None
    out_features: int = 10
    pool: int = 4
    margin_init: float = 0.5
    learn_margin: bool = True
    margin_floor: float = 0.0
    init_scale: float = 0.1
    solver: dict = field(default_factory=lambda: SolverConfig().as_dict())
    backward: str = "splitting"
    backward_tol: float | None = None
    arch: str = "conv"

    def __post_init__(self) -> None:
        if self.arch != "conv":
            raise ConfigError(f"a ConvMonDEQConfig has arch 'conv', got {self.arch!r}")
        try:
            self.image = (int(self.image[0]), int(self.image[1]))
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"image must be (H, W), got {self.image!r}") from None
        for name in ("in_channels", "channels", "out_features", "pool"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.kernel) < 1:
            raise ConfigError(f"kernel must be >= 1, got {self.kernel}")
        k = int(self.kernel)  # odd, and no larger than the image (one-line OperatorErrors)
        check_kernel(torch.zeros(1, 1, k, k), self.image)
        if self.image[0] % self.pool or self.image[1] % self.pool:
            raise ConfigError(f"pool {self.pool} must divide the image {self.image[0]}x{self.image[1]}")
        if self.rank is not None and not 1 <= int(self.rank) <= int(self.channels):
            raise ConfigError(f"rank must be in [1, channels={self.channels}], got {self.rank}")
        check_margin_settings(self.margin_init, self.margin_floor, self.init_scale)
        if self.backward not in ("splitting", "direct"):
            raise ConfigError(f"backward must be 'splitting' or 'direct', got {self.backward!r}")
        if self.backward == "direct":
            raise ConfigError("a convolutional MonDEQ has no dense direct backward: use "
                              "backward='splitting'")  # fmt: skip

    @property
    def in_features(self) -> int:
        """Entries of one flattened input image (``in_channels * H * W``)."""
        return self.in_channels * self.image[0] * self.image[1]

    @property
    def state_size(self) -> int:
        """Entries of one equilibrium state (``channels * H * W``)."""
        return self.channels * self.image[0] * self.image[1]

    def solver_config(self) -> SolverConfig:
        return SolverConfig.from_dict(self.solver)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image"] = list(self.image)
        return d


def conv_margin_tensor(kernel: torch.Tensor, image: tuple[int, int]) -> torch.Tensor:
    """``margin(W) = min_w lmin(I - (K^(w) + K^(w)^*) / 2)`` of the circular convolution by
    ``kernel`` on ``image`` (the exact float64 value through the Fourier blocks), differentiable in
    ``kernel``: the conv analogue of :func:`monquant.operators.matrix.margin_tensor`, for the
    margin-aware penalty."""
    Kh = fourier_blocks(kernel, image, differentiable=True)
    c = int(kernel.shape[0])
    eye = torch.eye(c, dtype=Kh.dtype, device=Kh.device)
    Hs = eye - 0.5 * (Kh + Kh.conj().transpose(-1, -2))
    return torch.linalg.eigvalsh(Hs).min().to(kernel.dtype)


class ConvMonDEQLayer(nn.Module):
    """Equilibrium layer ``z* = relu(W z* + U * x + b)`` on a ``channels x H x W`` state (see the
    module docstring). ``x`` has shape ``(batch, in_channels, H, W)`` (or is flattened to
    ``(batch, in_channels * H * W)``); ``z*`` has shape ``(batch, channels, H, W)``.

    Hooks, as on the dense :class:`~monquant.model.MonDEQLayer`: ``weight_transform(K)`` maps the
    composite kernel before every solve (STE QAT); ``factor_transform(name, tensor)`` maps ``A``,
    ``B``, ``U``, ``b`` before they are used (ProxQuant / lazy quantization of the factors).
    """

    def __init__(self, config: ConvMonDEQConfig, solver: EquilibriumSolver | None = None) -> None:
        super().__init__()
        self.config = config
        c, k = config.channels, config.kernel
        r = config.rank or c
        self.U = nn.Conv2d(config.in_channels, c, k, padding=k // 2)
        scale = config.init_scale / (k * c**0.5)
        self.A = nn.Parameter(scale * torch.randn(r, c, k, k))
        self.B = nn.Parameter(scale * torch.randn(c, c, k, k))
        m_raw = torch.tensor(softplus_inverse(config.margin_init - config.margin_floor))
        register_margin(self, m_raw, config.learn_margin)
        self.solver = solver or default_solver(config)
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.factor_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    @property
    def image(self) -> tuple[int, int]:
        return self.config.image

    @property
    def free(self) -> bool:
        return False

    def margin(self) -> torch.Tensor:
        """``m = softplus(m_raw) + margin_floor``: a lower bound on margin(W) by construction."""
        return F.softplus(self.m_raw) + self.config.margin_floor

    def factor(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (``A``, ``B``, ``U`` or ``b``) after ``factor_transform``, if any."""
        t = self.U.weight if name == "U" else self.U.bias if name == "b" else getattr(self, name)
        return self.factor_transform(name, t) if self.factor_transform is not None else t

    def operator(self) -> ConvWKOperator:
        """The float ``W`` as a :class:`~monquant.operators.conv.ConvWKOperator` (differentiable)."""
        return ConvWKOperator(self.factor("A"), self.factor("B"), self.margin(), self.image,
                              checked=True)  # fmt: skip

    def weight(self) -> torch.Tensor:
        """The composite kernel ``K`` of the float ``W`` (``c x c x (2k-1) x (2k-1)``,
        differentiable in ``A``, ``B`` and ``m``)."""
        return self.operator().composite_kernel(differentiable=True)

    def reference_weight(self) -> torch.Tensor:
        """The float composite kernel, detached, computed in float64 from the stored factors: the
        reference a quantized kernel is certified against (and the kernel PTQ quantizes)."""
        return self.operator().composite_kernel()

    def effective_weight(self) -> torch.Tensor:
        """The kernel the forward pass uses: ``weight_transform(K)`` if one is installed."""
        K = self.weight()
        return self.weight_transform(K) if self.weight_transform is not None else K

    def operator_of(self, kernel: torch.Tensor) -> CircularConvOperator:
        """The operator ``z -> K * z`` (circular) of a kernel, e.g. a quantized ``K~``."""
        if tuple(kernel.shape[:2]) != (self.config.channels,) * 2:
            raise OperatorError(f"a kernel for this layer maps {self.config.channels} channels "
                                f"to themselves; got shape {tuple(kernel.shape)}")  # fmt: skip
        return CircularConvOperator(kernel, self.image)

    def used_operator(self, W: torch.Tensor | None = None):
        """The operator the forward solve uses: ``W`` (a kernel) if given, the transformed composite
        kernel under a ``weight_transform``, else the factored float operator (cheaper to apply)."""
        if W is not None:
            return self.operator_of(W)
        if self.weight_transform is not None:
            return CircularConvOperator(self.effective_weight(), self.image, checked=True)
        return self.operator()

    def margin_of(self, kernel: torch.Tensor) -> torch.Tensor:
        """The exact ``margin`` of the kernel's operator, differentiable (:func:`conv_margin_tensor`)."""
        return conv_margin_tensor(kernel, self.image)

    def injection(self, x: torch.Tensor, U: torch.Tensor | None = None,
                  b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``q = U * x + b`` of shape ``(batch, channels, H, W)``."""
        c = self.config
        if x.dim() == 2 and x.shape[1] == c.in_features:
            x = x.reshape(x.shape[0], c.in_channels, *c.image)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, *c.image):
            raise ConfigError(f"input must have shape (batch, {c.in_channels}, {c.image[0]}, "
                              f"{c.image[1]}), got {tuple(x.shape)}")  # fmt: skip
        U_ = self.factor("U") if U is None else U
        b_ = self.factor("b") if b is None else b
        return F.conv2d(x, U_.to(x.dtype), b_.to(x.dtype), padding=c.kernel // 2)

    def forward(self, x: torch.Tensor, W: torch.Tensor | None = None,
                U: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        q = self.injection(x, U, b)
        op = self.used_operator(W)
        # under a weight_transform (QAT) the float operator's constants cap the training solves' step
        ref = self.operator() if W is None and self.weight_transform is not None else None
        return self.solver(op.to(dtype=q.dtype) if op.dtype != q.dtype else op, q, step_from=ref)


class ConvMonDEQClassifier(nn.Module):
    """Convolutional equilibrium layer + average pooling + linear head:
    ``logits = C avgpool_p(z*) + c``. Takes flattened images ``(batch, in_channels * H * W)``
    (as :mod:`monquant.data` yields them) or ``(batch, in_channels, H, W)``."""

    def __init__(self, config: ConvMonDEQConfig | None = None) -> None:
        super().__init__()
        self.config = config or ConvMonDEQConfig()
        c = self.config
        self.layer = ConvMonDEQLayer(c)
        pooled = c.channels * (c.image[0] // c.pool) * (c.image[1] // c.pool)
        self.head = nn.Linear(pooled, c.out_features)

    @property
    def solver(self) -> EquilibriumSolver:
        return self.layer.solver

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The head's input: ``avgpool_p(z)`` flattened (a linear map of ``z``)."""
        return F.avg_pool2d(z, self.config.pool).flatten(1)

    def forward(self, x: torch.Tensor, W: torch.Tensor | None = None,
                U: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        z = self.layer(x, W=W, U=U, b=b)
        f = self.features(z)
        return F.linear(f, self.head.weight.to(f.dtype), self.head.bias.to(f.dtype))
