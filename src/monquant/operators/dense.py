"""``DenseOperator``: a square weight matrix ``W`` (the paper's fully connected layer).

Samples are rows, so ``W z`` is ``z @ W.T``. The resolvent ``(I + a (I - W))^{-1}`` is inverted once
and applied as one matrix product (``K = J^T`` in row layout), exactly as the solvers always did.
"""

from __future__ import annotations

import torch

from monquant.operators.base import LinearMap, MonotoneOperator
from monquant.operators.matrix import (
    OperatorError,
    SpectralStats,
    all_finite,
    check_weight,
    spectral_norm,
    spectral_stats,
)

__all__ = ["DenseOperator", "MatrixMap"]


class MatrixMap(LinearMap):
    """``v -> v K`` in row layout, i.e. the map ``M = K^T`` on column vectors."""

    def __init__(self, K: torch.Tensor, reflected: torch.Tensor | None = None):
        self.K = K
        self._reflected = reflected

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self.K

    def addmm(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.addmm(c, v, self.K)

    def reflected(self) -> torch.Tensor:
        """``R = 2 K - I``: for a resolvent ``J`` (``K = J^T``), the reflected resolvent
        ``2 J - I`` in row layout, which PR and DR apply once per iteration. Formed on the first
        call and kept; the transpose :attr:`T` shares it (``(2 K - I)^T = 2 K^T - I``, the same
        numbers), so the adjoint solve of a training step does not form it again."""
        if self._reflected is None:
            R = self.K.mul(2.0)
            R.diagonal().sub_(1.0)
            self._reflected = R
        return self._reflected

    @property
    def T(self) -> MatrixMap:
        return MatrixMap(self.K.T, None if self._reflected is None else self._reflected.T)


class DenseOperator(MonotoneOperator):
    """A dense ``n x n`` weight ``W`` (any square matrix: float, quantized, imported)."""

    def __init__(self, W: torch.Tensor, *, checked: bool = False):
        self.W = W if checked else check_weight(W)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.W.shape[0]),)

    @property
    def dtype(self) -> torch.dtype:
        return self.W.dtype

    @property
    def device(self) -> torch.device:
        return self.W.device

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T

    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W

    def resolvent(self, a: float) -> MatrixMap | None:
        n = self.W.shape[0]
        eye = torch.eye(n, dtype=self.W.dtype, device=self.W.device)
        Minv, info = torch.linalg.inv_ex(eye + a * (eye - self.W))
        if int(info) != 0 or not all_finite(Minv):
            return None  # I + a (I - W) singular: only possible when margin(W) <= 0
        return MatrixMap(Minv.T.contiguous())

    def fb_map(self, a: float) -> MatrixMap:
        n = self.W.shape[0]
        eye = torch.eye(n, dtype=self.W.dtype, device=self.W.device)
        return MatrixMap(((1.0 - a) * eye + a * self.W).T.contiguous())

    def spectral_stats(self) -> SpectralStats:
        return spectral_stats(self.W)

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.W,)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> DenseOperator:
        (W,) = params
        return DenseOperator(W)

    def transpose(self) -> DenseOperator:
        return DenseOperator(self.W.T, checked=True)

    def minus(self, other: MonotoneOperator) -> float:
        if not isinstance(other, DenseOperator) or other.W.shape != self.W.shape:
            raise OperatorError("minus needs a dense operator of the same shape")
        return spectral_norm(self.W.to(torch.float64) - other.W.to(torch.float64))

    def to(self, dtype: torch.dtype | None = None, device=None) -> DenseOperator:
        W = self.W.to(dtype=dtype or self.W.dtype, device=device or self.device)
        # a cast may overflow to inf, so a new tensor is checked; the same tensor is not
        return self if W is self.W else DenseOperator(W)

    def detach(self) -> DenseOperator:
        return DenseOperator(self.W.detach(), checked=True)  # the same (checked) values

    def dense(self) -> torch.Tensor:
        return self.W

    def __repr__(self) -> str:
        return f"DenseOperator(n={self.W.shape[0]}, dtype={self.W.dtype})"
