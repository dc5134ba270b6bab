"""What the certificates say about a quantized MonDEQ's *predictions*, per input (issue 15).

Two guarantees, both proved from one float64 solve of the float model and bounds from
:mod:`monquant.verified` (docs/theory.md section 4):

- **Prediction agreement.** With ``z*`` the float equilibrium and ``z~*`` the quantized one, the
  swapped form of Theorem 3 gives ``||z* - z~*|| <= (||dW z*|| + ||q - q~||) / margin(W~)``
  (:func:`swapped_displacement_bound`). With the pairwise logit margins of the float solution,
  the quantized model provably predicts the float model's class ``k`` when every
  ``(C~_k - C~_j) z^ + c~_k - c~_j > ||C~_k - C~_j|| (e + D)`` (``e`` the solve's a-posteriori
  error, ``D`` the displacement bound).
- **Robustness.** The equilibrium is ``||U|| / m``-Lipschitz in the input (for relu, or any
  proximal activation: :func:`equilibrium_lipschitz`), so a class is certified at input ``x`` for
  every ``x'`` with ``||x' - x|| < r(x) = min_j margin_kj / (||C_k - C_j|| ||U|| / m)``
  (computed by :func:`agreement`); for the quantized model ``m`` is replaced by the proved
  ``margin(W~)`` and ``U``, ``C`` by their quantized versions.

Inputs are in the model's input space (for MNIST: normalised pixels). Every bound decides from
proved quantities only; the computed values are reported beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from monquant.solvers import SolverConfig, solve
from monquant.verified import (
    UNIT_ROUNDOFF,
    SpectralBounds,
    gamma,
    norm2_bounds,
    quantized_bounds,
    spectral_bounds,
    up,
)

__all__ = [
    "AgreementReport",
    "FloatReference",
    "ModelWeights",
    "agreement",
    "equilibrium_lipschitz",
    "pairwise_margins",
    "swapped_displacement_bound",
]


def swapped_displacement_bound(dWz_norm: Any, q_shift_norm: Any, m_tilde: float) -> Any:
    """Theorem 3 with the roles of the operators swapped: ``||z* - z~*|| <= (||dW z*|| +
    ||q - q~||) / margin(W~)``.

    Proof: ``z*`` solves the quantized inclusion perturbed by ``-dW z* + (q~ - q)``, and
    ``(I - W~) + N`` is ``margin(W~)``-strongly monotone. It needs only the float equilibrium.
    Returns ``inf`` unless ``m_tilde > 0`` (pass a proved lower bound).
    """
    if not m_tilde > 0:
        return torch.full_like(torch.as_tensor(dWz_norm, dtype=torch.float64), math.inf)
    return (dWz_norm + q_shift_norm) / m_tilde * (1.0 + 8 * UNIT_ROUNDOFF)


def equilibrium_lipschitz(U_norm: float, m: float) -> float:
    """Input Lipschitz constant of ``x -> z*(x)``: ``||U|| / m`` (``inf`` unless ``m > 0``).

    ``m ||z1 - z2||^2 <= <U (x1 - x2), z1 - z2>`` by strong monotonicity of ``(I - W) + N`` (any
    proximal activation), so ``||z1 - z2|| <= ||U|| ||x1 - x2|| / m``. Pass proved bounds.
    """
    return up(up(U_norm / m) * (1.0 + 4 * UNIT_ROUNDOFF)) if m > 0 else math.inf


def pairwise_margins(C: torch.Tensor, c: torch.Tensor, z: torch.Tensor, k: torch.Tensor):
    """``(margins, row_norms_hi)``: ``(C_k - C_j) z + c_k - c_j`` for every class ``j`` (a lower
    bound in exact arithmetic, the rounding of the dot products subtracted) and proved upper
    bounds on ``||C_k - C_j||``; the entry ``j = k`` is ``+inf``. Shapes ``(N, classes)``."""
    C64, c64, z64 = C.to(torch.float64), c.to(torch.float64), z.to(torch.float64)
    Ck = C64[k]  # (N, n)
    D = Ck[:, None, :] - C64[None, :, :]  # (N, K, n): rows C_k - C_j
    dc = c64[k][:, None] - c64[None, :]
    val = torch.einsum("nkd,nd->nk", D, z64) + dc
    n = z64.shape[1]
    # |fl(D) - D| <= u |D| and the dot product of n + 1 terms errs by gamma_{n+2} sum |terms|
    slack = gamma(n + 3) * (torch.einsum("nkd,nd->nk", D.abs(), z64.abs()) + dc.abs())
    margins = val - slack * (1.0 + 4 * UNIT_ROUNDOFF)
    norms = torch.linalg.vector_norm(D, dim=2) * (1.0 + gamma(n + 4))
    same = torch.arange(C64.shape[0], device=k.device)[None, :] == k[:, None]
    margins = torch.where(same, torch.full_like(margins, math.inf), margins)
    return margins, norms


@dataclass
class ModelWeights:
    """The tensors of one fully connected MonDEQ classifier, as deployed."""

    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor
    C: torch.Tensor
    c: torch.Tensor

    @classmethod
    def of(cls, model: Any, **replace: torch.Tensor | None) -> ModelWeights:
        """From a :class:`monquant.model.MonDEQClassifier`, optionally with replaced tensors."""
        layer = model.layer
        base = {"W": layer.weight(), "U": layer.U.weight, "b": layer.U.bias,
                "C": model.head.weight, "c": model.head.bias}  # fmt: skip
        base.update({k: v for k, v in replace.items() if v is not None})
        return cls(**{k: v.detach().to(torch.float64) for k, v in base.items()})


@dataclass
class AgreementReport:
    """Per input: the float prediction, whether agreement is certified, the radii (0: none)."""

    float_prediction: torch.Tensor
    certified_agreement: torch.Tensor
    float_certified: torch.Tensor  # the float prediction itself is proved (solver error covered)
    radius_float: torch.Tensor
    radius_quantized: torch.Tensor
    displacement_bound: torch.Tensor
    constants: dict[str, float]
    #: agreement proved by Theorem 3 alone (one float solve; ``certified_agreement`` may also use
    #: the quantized model's own solve and its a-posteriori error)
    agreement_theorem3: torch.Tensor | None = None

    def summary(self, labels: torch.Tensor | None = None, eps: tuple[float, ...] = ()) -> dict:
        n = int(self.float_prediction.numel())
        t3 = self.agreement_theorem3 if self.agreement_theorem3 is not None else self.certified_agreement
        out: dict[str, Any] = {
            "samples": n,
            "certified_agreement_rate": float(self.certified_agreement.double().mean()),
            "certified_agreement_rate_theorem3": float(t3.double().mean()),
            **self.constants,
        }
        if labels is not None:
            correct = self.float_prediction == labels
            for e in eps:
                out[f"certified_accuracy_float@{e:g}"] = float(
                    (correct & self.float_certified & (self.radius_float > e)).double().mean()
                )
                out[f"certified_accuracy_quantized@{e:g}"] = float(
                    (correct & self.certified_agreement & (self.radius_quantized > e)).double().mean()
                )
        return out


def _injection_error(U: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample, a bound on ``||fl(U x + b) - (U x + b)||`` (float64 matmul of ``d`` terms)."""
    d = U.shape[1]
    return gamma(d + 2) * torch.linalg.vector_norm(x.abs() @ U.abs().T + b.abs(), dim=1) * 2.0


def _proved_solve(w: ModelWeights, x64: torch.Tensor, st: Any, cfg: SolverConfig):
    """``(z^, e, unconverged)``: a float64 solve of ``w``'s equilibrium at ``x``, a proved bound
    ``e >= ||z^ - z*||`` per sample (solver a-posteriori error from proved constants, plus the
    injection's rounding through the ``1/m`` Lipschitz constant; ``inf`` where not proved), and
    how many solves hit the cap (``None``: no solve, the operator is not proved monotone)."""
    if not st.m_lo > 0:
        z = torch.zeros(x64.shape[0], w.W.shape[0], dtype=torch.float64, device=x64.device)
        inf = torch.full((x64.shape[0],), math.inf, dtype=torch.float64, device=x64.device)
        return z, inf, None
    res = solve(w.W, x64 @ w.U.T + w.b, cfg, stats=st.conservative())
    err = res.error_bound + _injection_error(w.U, w.b, x64) / st.m_lo
    return res.z, torch.where(res.converged, err, torch.full_like(err, math.inf)), res.n_unconverged


@dataclass
class FloatReference:
    """The float model's side of :func:`agreement`, computed once for any number of ``W~``:
    its proved bounds, the solve ``z^`` with its error ``e``, its class and pairwise margins."""

    weights: ModelWeights
    x64: torch.Tensor
    bounds: SpectralBounds
    config: SolverConfig
    z: torch.Tensor
    err: torch.Tensor
    k: torch.Tensor
    margins: torch.Tensor
    row_norms: torch.Tensor
    certified: torch.Tensor
    U_norm_upper: float
    lipschitz: float
    radius: torch.Tensor
    unconverged: int | None

    @classmethod
    def solve(cls, f: ModelWeights, x: torch.Tensor, tol: float = 1e-10,
              max_iter: int = 100_000) -> FloatReference:  # fmt: skip
        x64 = x.to(torch.float64)
        st = spectral_bounds(f.W)
        cfg = SolverConfig(method="pr", tol=tol, max_iter=max_iter)
        z, err, unconverged = _proved_solve(f, x64, st, cfg)  # ||z^ - z*|| <= err
        k = (z @ f.C.T + f.c).argmax(dim=1)
        mf, nf = pairwise_margins(f.C, f.c, z, k)
        ok = (mf - nf * err[:, None] > 0).all(dim=1)
        U_hi, _ = norm2_bounds(f.U)
        lip = equilibrium_lipschitz(U_hi, st.m_lo)
        r = ((mf - nf * err[:, None]) / (nf * lip)).min(dim=1).values
        r = torch.where(ok & torch.isfinite(r), r.clamp_min(0), torch.zeros_like(r))
        return cls(f, x64, st, cfg, z, err, k, mf, nf, ok, U_hi, lip, r, unconverged)


def agreement(
    float_model: ModelWeights | FloatReference,
    quant_model: ModelWeights,
    x: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 100_000,
    quantized_solve: bool = True,
) -> AgreementReport:
    """Certified prediction agreement and certified radii for a batch ``x``.

    ``float_model`` is the float weights (then ``x`` is needed) or a :class:`FloatReference`
    already solved for ``x`` (so several ``W~`` share one float solve). Theorem 3 (swapped) needs
    only the float solve (``agreement_theorem3``); with ``quantized_solve`` the quantized model's
    own solve and its proved a-posteriori error give a second lower bound on each quantized logit
    margin, and the larger of the two decides. A sample counts as certified only when every bound
    is proved: both operators proved monotone, finite solver errors, and every pairwise margin
    clears its bound.
    """
    ref = (float_model if isinstance(float_model, FloatReference)
           else FloatReference.solve(float_model, _required(x), tol, max_iter))  # fmt: skip
    f, g, x64, z, err, k = ref.weights, quant_model, ref.x64, ref.z, ref.err, ref.k
    stq, dW_hi, _ = quantized_bounds(g.W, f.W)
    # ||dW z*|| <= ||dW z^|| + ||dW||_hi e, with ||dW z^|| bounded through the computed
    # Dz = fl(fl(W~ - W) z^): |fl(W~ - W) - dW| <= u |fl(W~ - W)| and the matvec errs by
    # gamma_n |fl(W~ - W)| |z^| entrywise (both covered by 2 gamma_{n+2}); capped by ||dW||_hi ||z^||
    n = f.W.shape[0]
    Dm = g.W - f.W
    Dz = z @ Dm.T
    slack = 2.0 * gamma(n + 2) * torch.linalg.vector_norm(z.abs() @ Dm.abs().T, dim=1)
    dWz_hat = (torch.linalg.vector_norm(Dz, dim=1) + slack) * (1.0 + gamma(n + 2))
    dWz_hat = torch.minimum(dWz_hat, dW_hi * torch.linalg.vector_norm(z, dim=1) * (1 + gamma(n + 2)))
    dWz_hi = dWz_hat + dW_hi * err
    # ||q - q~|| with its rounding (0 when the injection is not quantized)
    if bool((g.U == f.U).all()) and bool((g.b == f.b).all()):
        dq_hi = torch.zeros_like(err)
    else:
        dq = x64 @ (g.U - f.U).T + (g.b - f.b)
        dq_hi = torch.linalg.vector_norm(dq, dim=1) + _injection_error(g.U - f.U, g.b - f.b, x64)
    D = swapped_displacement_bound(dWz_hi, dq_hi, stq.m_lo)
    mq, nq = pairwise_margins(g.C, g.c, z, k)
    float_ok = ref.certified
    quant_margin = mq - nq * (err + D)[:, None]
    agree_t3 = float_ok & (quant_margin > 0).all(dim=1)
    q_unconverged = None
    if quantized_solve:
        zq, errq, q_unconverged = _proved_solve(g, x64, stq, ref.config)
        mq2, _ = pairwise_margins(g.C, g.c, zq, k)  # same rows of C~, same norms nq
        quant_margin = torch.maximum(quant_margin, mq2 - nq * errq[:, None])  # both lower bounds
    agree = float_ok & (quant_margin > 0).all(dim=1)
    Uq_hi, _ = norm2_bounds(g.U)
    lip_q = equilibrium_lipschitz(Uq_hi, stq.m_lo)
    r_q = (quant_margin / (nq * lip_q)).min(dim=1).values
    r_q = torch.where(agree & torch.isfinite(r_q), r_q.clamp_min(0), torch.zeros_like(r_q))
    constants = {"m_lower": ref.bounds.m_lo, "margin_quantized_lower": stq.m_lo,
                 "dW_norm_upper": dW_hi, "U_norm_upper": ref.U_norm_upper,
                 "lipschitz_float": ref.lipschitz, "lipschitz_quantized": lip_q,
                 "max_solver_error": float(err.max()),
                 # solves that hit the cap (their inputs are not certified); None: not run
                 "float_solves_unconverged": ref.unconverged,
                 "quantized_solves_unconverged": q_unconverged}  # fmt: skip
    return AgreementReport(k, agree, float_ok, ref.radius, r_q, D, constants, agree_t3)


def _required(x: torch.Tensor | None) -> torch.Tensor:
    if x is None:
        from monquant.errors import ConfigError

        raise ConfigError("agreement needs the inputs x (or a FloatReference solved for them)")
    return x
