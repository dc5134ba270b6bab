"""Monotone operators: the protocol (``base``), its kinds (``dense``, ``wk``, ``conv``,
``multitier``), dense spectral constants (``matrix``) and iterative, explicitly inexact estimates
(``spectral``)."""

from monquant.operators.base import LinearMap, MonotoneOperator
from monquant.operators.conv import (
    CircularConvOperator,
    ConvWKOperator,
    FourierBlockMap,
    FourierOperator,
)
from monquant.operators.dense import DenseOperator, MatrixMap
from monquant.operators.matrix import (
    OperatorError,
    SpectralStats,
    check_weight,
    lipschitz,
    margin,
    margin_tensor,
    spectral_norm,
    spectral_stats,
    wk_weight,
)
from monquant.operators.multitier import (
    MultiTierConvOperator,
    MultiTierWKOperator,
    TieredOperator,
)
from monquant.operators.spectral import estimate_stats, step_constants
from monquant.operators.wk import WKOperator

__all__ = [
    "CircularConvOperator",
    "ConvWKOperator",
    "DenseOperator",
    "FourierBlockMap",
    "FourierOperator",
    "LinearMap",
    "MatrixMap",
    "MonotoneOperator",
    "MultiTierConvOperator",
    "MultiTierWKOperator",
    "OperatorError",
    "SpectralStats",
    "TieredOperator",
    "WKOperator",
    "as_operator",
    "check_weight",
    "estimate_stats",
    "lipschitz",
    "margin",
    "margin_tensor",
    "spectral_norm",
    "spectral_stats",
    "step_constants",
    "wk_weight",
]


def as_operator(W_or_op) -> MonotoneOperator:
    """A :class:`MonotoneOperator` from an operator (returned as is) or a square matrix (dense)."""
    if isinstance(W_or_op, MonotoneOperator):
        return W_or_op
    return DenseOperator(W_or_op)
