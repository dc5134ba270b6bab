"""The monotone-operator protocol that every solver, the implicit backward and certificates use.

A MonDEQ layer's linear part is an operator ``W`` acting on a state of shape ``state_shape`` per
sample; samples are the leading (batch) dimension. Solvers only need

- ``apply(z)`` = ``W z`` and ``apply_T(z)`` = ``W^T z`` (batched);
- ``resolvent(a)``: an object applying ``J = (I + a (I - W))^{-1}`` and ``J^T``, built once per
  solve (factored or inverted by the operator kind in whatever way is cheapest for it);
- ``fb_map(a)``: the forward-backward affine part ``v -> (1 - a) v + a W v``;
- ``spectral_stats()``: ``m``, ``L``, ``||W||`` with a flag saying whether they are exact or
  one-sided estimates (an estimate never decides a certificate);
- ``parameters()``: the tensors gradients flow into (through :meth:`apply`, by autograd);
- ``minus(other)``: ``||W - other||`` for two operators of the same kind, computed by the kind;
- ``transpose()``: the operator ``W^T`` (the adjoint problem of Theorem 5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from monquant.operators.matrix import SpectralStats

__all__ = ["LinearMap", "MonotoneOperator"]


class LinearMap(ABC):
    """A fixed linear map ``v -> M v`` on batched states, with its transpose (row layout)."""

    @abstractmethod
    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``M v`` for every sample (row) of ``v``."""

    def addmm(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``c + M v`` (dense kinds fuse this into one BLAS call)."""
        return c + self.matmul(v)

    @property
    @abstractmethod
    def T(self) -> LinearMap:
        """The transpose ``M^T`` (same kind)."""


class MonotoneOperator(ABC):
    """The linear part ``W`` of a MonDEQ layer (see the module docstring for the protocol)."""

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample's state (``(n,)`` for a dense layer)."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def size(self) -> int:
        """Number of state entries per sample (the operator is ``size x size``)."""
        out = 1
        for d in self.state_shape:
            out *= int(d)
        return out

    @abstractmethod
    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``W z`` for a batch ``z`` of shape ``(batch, *state_shape)`` (differentiable)."""

    @abstractmethod
    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        """``W^T z`` for a batch ``z`` (differentiable)."""

    @abstractmethod
    def resolvent(self, a: float) -> LinearMap | None:
        """``(I + a (I - W))^{-1}`` as a :class:`LinearMap`, or ``None`` when it is singular."""

    @abstractmethod
    def fb_map(self, a: float) -> LinearMap:
        """The forward-backward affine part ``v -> (1 - a) v + a W v``."""

    @abstractmethod
    def spectral_stats(self) -> SpectralStats:
        """``m = margin(W)``, ``L = ||I - W||``, ``||W||``; ``exact=False`` for estimates."""

    @abstractmethod
    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The tensors that :meth:`apply` is built from (gradients flow into these)."""

    @abstractmethod
    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> MonotoneOperator:
        """The same kind of operator built from other tensors (e.g. detached copies)."""

    @abstractmethod
    def transpose(self) -> MonotoneOperator:
        """The operator ``W^T`` (same margin and ``L``)."""

    @abstractmethod
    def minus(self, other: MonotoneOperator) -> float:
        """``||W - W_other||`` (spectral norm) for an operator of the same kind and shape."""

    @abstractmethod
    def to(self, dtype: torch.dtype | None = None, device=None) -> MonotoneOperator:
        """The operator with its tensors cast (``dtype``) and moved (``device``)."""

    def detach(self) -> MonotoneOperator:
        """The operator built from detached parameters (no autograd graph)."""
        return self.with_parameters(tuple(p.detach() for p in self.parameters()))

    def dense(self) -> torch.Tensor:
        """The ``size x size`` matrix of ``W`` (by applying it to basis vectors; small sizes)."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        cols = self.apply(eye.reshape(self.size, *self.state_shape)).reshape(self.size, -1)
        return cols.T.contiguous()
