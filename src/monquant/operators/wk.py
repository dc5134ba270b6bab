"""``WKOperator``: the Winston-Kolter form ``W = (1 - m) I - A^T A + B - B^T`` without forming ``W``.

``sym(I - W) = m I + A^T A``, so ``margin(W) >= m`` by construction. Applying it costs
``2 r n + 2 n^2`` products per sample (``A`` is ``r x n``) against ``n^2`` for the assembled ``W``:
cheaper only for ``r < n / 2`` together with a structured ``B``; it exists so that solvers and the
implicit backward are written against the protocol, and gradients reach ``A``, ``B`` and ``m``
through :meth:`apply` (autograd) instead of through a dense ``dl/dW``. The resolvent is formed from
the assembled matrix (``n x n``, inverted once per solve).
"""

from __future__ import annotations

import torch

from monquant.operators.base import MonotoneOperator
from monquant.operators.dense import DenseOperator, MatrixMap
from monquant.operators.matrix import OperatorError, SpectralStats, spectral_norm, wk_weight

__all__ = ["WKOperator"]


class WKOperator(MonotoneOperator):
    """``W = (1 - m) I - A^T A + B - B^T`` (``transposed=True``: its transpose ``W^T``)."""

    def __init__(
        self, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor | float, transposed: bool = False
    ):
        if A.dim() != 2 or B.dim() != 2 or B.shape[0] != B.shape[1] or A.shape[1] != B.shape[0]:
            raise OperatorError(
                f"WKOperator needs A (r x n) and B (n x n), got {tuple(A.shape)}, {tuple(B.shape)}"
            )
        self.A, self.B = A, B
        self.m = m if isinstance(m, torch.Tensor) else torch.tensor(float(m), dtype=B.dtype)
        self.transposed = transposed

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.B.shape[0]),)

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    @property
    def device(self) -> torch.device:
        return self.B.device

    def _apply(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        skew = z @ self.B - z @ self.B.T  # row layout: (B^T - B) z for W^T, (B - B^T) z for W
        if not transpose:
            skew = -skew
        return (1 - self.m) * z - (z @ self.A.T) @ self.A + skew

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply(z, self.transposed)

    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply(z, not self.transposed)

    def assembled(self) -> torch.Tensor:
        """The dense ``W`` (or ``W^T``)."""
        W = wk_weight(self.A, self.B, self.m)
        return W.T if self.transposed else W

    def _dense_op(self) -> DenseOperator:
        return DenseOperator(self.assembled().detach())

    def resolvent(self, a: float) -> MatrixMap | None:
        return self._dense_op().resolvent(a)

    def fb_map(self, a: float) -> MatrixMap:
        return self._dense_op().fb_map(a)

    def spectral_stats(self) -> SpectralStats:
        return self._dense_op().spectral_stats()

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.A, self.B, self.m)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> WKOperator:
        A, B, m = params
        return WKOperator(A, B, m, self.transposed)

    def transpose(self) -> WKOperator:
        return WKOperator(self.A, self.B, self.m, not self.transposed)

    def minus(self, other: MonotoneOperator) -> float:
        if not isinstance(other, WKOperator) or other.state_shape != self.state_shape:
            raise OperatorError("minus needs a Winston-Kolter operator of the same size")
        d = self.assembled().detach().to(torch.float64) - other.assembled().detach().to(
            torch.float64
        )
        return spectral_norm(d)

    def to(self, dtype: torch.dtype | None = None, device=None) -> WKOperator:
        dt, dev = dtype or self.dtype, device or self.device
        return WKOperator(
            self.A.to(dtype=dt, device=dev),
            self.B.to(dtype=dt, device=dev),
            self.m.to(dtype=dt, device=dev),
            self.transposed,
        )

    def dense(self) -> torch.Tensor:
        return self.assembled()

    def __repr__(self) -> str:
        r, n = self.A.shape
        t = ", transposed" if self.transposed else ""
        return f"WKOperator(n={n}, rank={r}, m={float(self.m):.4g}{t})"
