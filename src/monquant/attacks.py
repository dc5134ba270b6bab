"""Empirical attacks: L2 projected gradient descent through the implicit layer (issue 15).

The gradient of the loss with respect to the input comes from the implicit backward (Theorem 5's
adjoint solve), so the attack sees the equilibrium exactly as training does. PGD finds
adversarial examples; it proves nothing: its robust accuracy is an *upper* bound on the true
robust accuracy, while a certified radius gives a *lower* bound.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["pgd_l2"]


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(delta, dim=1, keepdim=True).clamp_min(1e-30)
    return delta * torch.clamp(eps / norms, max=1.0)


def pgd_l2(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    restarts: int = 2,
    step_size: float | None = None,
    seed: int = 0,
    **weights: torch.Tensor | None,
) -> torch.Tensor:
    """Per input, ``True`` when no attack within the L2 ball ``||x' - x|| <= eps`` changed the
    prediction away from ``y`` (and the clean input is classified correctly). An adversarial
    example counts only where its forward solve converged, so every one counted is real.

    Each restart starts from a random point of the ball (the first from ``x`` itself) and takes
    ``steps`` normalised-gradient ascent steps of ``step_size`` (default ``2.5 eps / steps``) on
    the cross-entropy, projecting back onto the ball. ``weights`` (``W``, ``U``, ``b``) replace the
    model's own, e.g. a quantized ``W~``. No box constraint: the ball lives in the model's input
    space (normalised pixels for MNIST), as the certified radii do.
    """
    was_training = model.training
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(seed)
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    with torch.no_grad():
        robust = model(x, **weights).argmax(dim=1) == y
    for r in range(restarts):
        if r == 0 or eps == 0:
            delta = torch.zeros_like(x)
        else:
            noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            delta = _project(noise * eps, eps)
        for _ in range(steps if eps > 0 else 0):
            delta = delta.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x + delta, **weights), y)
            (grad,) = torch.autograd.grad(loss, delta)
            gn = torch.linalg.vector_norm(grad, dim=1, keepdim=True).clamp_min(1e-30)
            delta = _project(delta.detach() + alpha * grad / gn, eps)
            with torch.no_grad():
                wrong = model(x + delta, **weights).argmax(dim=1) != y
                done = getattr(getattr(model, "solver", None), "last_forward", None)
                if done is not None:  # an example counts only where its solve converged
                    wrong &= done.converged.reshape(-1)
                robust &= ~wrong
    model.train(was_training)
    return robust
