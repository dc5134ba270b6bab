"""Straight-through estimators (STE): the shared primitives behind QAT and the binary-network study.

The STE replaces the almost-everywhere-zero derivative of a piecewise-constant map (rounding, sign)
by a surrogate in the backward pass:

- ``ste_round(x)``: forward ``round(x)``, backward ``d/dx := 1``.
- ``ste_sign(x)``: forward ``sign(x)`` with ``sign(0) = +1``, backward ``d/dx := 1`` (identity
  surrogate) or ``d/dx := 1[|x| <= 1]`` (hard-tanh surrogate, ``clipped=True``).

Each is its own ``torch.autograd.Function`` so the surrogate does not depend on how torch defines
the gradient of ``round``/``clamp`` at their kinks (which has changed between releases).
"""

from __future__ import annotations

import torch

__all__ = ["binary_sign", "ste_round", "ste_sign"]


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign`` with ``sign(0) = +1``: maps every real to {-1, +1}."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _STERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _STESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clipped: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.clipped = clipped
        if clipped:
            ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.clipped:
            (x,) = ctx.saved_tensors
            grad = grad * (x.abs() <= 1).to(grad.dtype)
        return grad, None


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer; the backward pass is the identity (straight-through)."""
    return _STERound.apply(x)


def ste_sign(x: torch.Tensor, clipped: bool = False) -> torch.Tensor:
    """Binary sign (``sign(0) = +1``) with a straight-through backward pass.

    ``clipped=False`` passes the gradient unchanged (identity surrogate); ``clipped=True`` zeroes it
    where ``|x| > 1`` (hard-tanh surrogate).
    """
    return _STESign.apply(x, clipped)
