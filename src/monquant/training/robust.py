"""Lipschitz-margin training: a loss that raises the *certified* L2 radius of the deployed model.

The certificate of :mod:`monquant.behaviour` proves the class ``k`` at every ``x'`` with
``||x' - x|| < r(x) = min_j (z_k - z_j) / L_kj`` where ``z`` are the logits and

    ``L_kj = ||C_k - C_j|| * ||U|| / margin(W)``

is a Lipschitz constant of the logit difference ``x -> (C_k - C_j) z*(x)`` (docs/theory.md
section 4: the equilibrium is ``||U|| / margin(W)``-Lipschitz in the input). Following the
Lipschitz-margin training of Tsuzuku, Sato and Sugiyama (2018), every wrong logit is raised by
``eps * L_kj`` before the cross-entropy:

    ``loss = CE(z + eps * L[k, :], k)``  (``L[k, k] = 0``, so the true logit is untouched),

so a sample whose adjusted prediction is right has ``r(x) > eps``. The constants are computed
from the tensors the forward pass uses (``Q_b(W)`` and ``Q_b(U)`` under QAT, with straight-through
gradients), so at a given bit-width the loss rewards what the *quantized* certificate will see:
a larger ``margin(W~)``, a smaller ``||U||`` and head rows that are not needlessly far apart.
The margin enters through a differentiable smallest eigenvalue, clamped below at
``margin_floor`` so that a non-monotone iterate gives a large, finite penalty, not ``inf``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from monquant.operators import margin_tensor

__all__ = ["MARGIN_FLOOR", "lipschitz_margin_loss", "logit_lipschitz"]

#: The smallest margin the loss divides by (a non-monotone ``W_used`` counts as this margin).
MARGIN_FLOOR = 1e-3


def logit_lipschitz(model: torch.nn.Module, margin_floor: float = MARGIN_FLOOR) -> torch.Tensor:
    """``L`` of shape ``(classes, classes)``: ``L_kj = ||C_k - C_j|| ||U|| / max(margin(W), floor)``.

    Differentiable in every parameter; uses the weights of the forward pass
    (``effective_weight()`` and ``factor("U")`` of a :class:`monquant.model.MonDEQClassifier`).
    An estimate for training only: certificates recompute the same constants as proved bounds.
    """
    layer = model.layer  # type: ignore[attr-defined]
    m = margin_tensor(layer.effective_weight()).clamp_min(margin_floor)
    u_norm = torch.linalg.matrix_norm(layer.factor("U"), ord=2)
    C = model.head.weight  # type: ignore[attr-defined]
    diff = C[:, None, :] - C[None, :, :]
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    # sqrt(s + 1) - 1 on the diagonal (s = 0 there) keeps the gradient finite at ||0||
    row_norms = torch.sqrt((diff * diff).sum(dim=2) + eye) - eye
    return row_norms * (u_norm / m)


def lipschitz_margin_loss(
    model: torch.nn.Module, logits: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """``CE(logits + eps * L[y], y)``: the cross-entropy with every wrong logit raised by the
    most an ``eps``-perturbation of the input can move it toward the true one (see the module
    docstring). ``eps = 0`` is the plain cross-entropy."""
    if eps == 0:
        return F.cross_entropy(logits, y)
    L = logit_lipschitz(model).to(logits.dtype)
    return F.cross_entropy(logits + eps * L[y], y)
