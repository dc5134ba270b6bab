"""Certificates: what the weights alone prove about a quantized MonDEQ (SPEC section 3).

Each theorem of the paper is one function named for what it computes; :func:`certify` assembles
them into a :class:`Certificate` for one quantization of one ``W``. Notation: ``m = margin(W)``,
``L = ||I - W||``, ``dW = W~ - W`` and ``||.||`` the spectral norm. Three tiers of evidence that the
quantized network still has a unique equilibrium and a convergent solver, from cheapest to sharpest:

- a-priori: ``n D_b / 2 < m`` — needs no quantization to be carried out (pre-deployment check);
- Weyl (Theorem 2): ``||dW|| < m`` — needs ``||dW||``;
- exact: ``margin(W~) > 0`` — one symmetric eigenvalue problem.

a-priori => Weyl => exact; the converse implications fail in general.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from monquant.operators import check_weight, spectral_norm, spectral_stats
from monquant.quantize import check_bits, quantize
from monquant.solvers import contraction_modulus, default_step

__all__ = [
    "JSON_KEYS",
    "TIERS",
    "Certificate",
    "a_priori_dW_bound",
    "a_priori_min_bits",
    "backward_certificate",
    "certify",
    "certify_sweep",
    "condition_numbers",
    "displacement_bound",
    "iterate_error_bound",
    "iterate_error_radius",
    "lipschitz_perturbation_bounds",
    "min_certified_bits",
    "quantized_contraction_modulus",
    "relative_displacement_bound",
    "rigorous_displacement_check",
    "weyl_margin_bound",
]

TIERS: tuple[str, ...] = ("a_priori", "weyl", "exact")

#: Keys every certificate's JSON form carries (other tools parse ``monquant certify --json``).
JSON_KEYS: tuple[str, ...] = (
    "bits",
    "step",
    "dW_norm",
    "margin",
    "L",
    "margin_quantized",
    "weyl_bound",
    "a_priori_bound",
    "certified_a_priori",
    "certified_weyl",
    "certified_exact",
)


def weyl_margin_bound(m: float, dW_norm: float) -> float:
    """Theorem 2 (margin perturbation): ``margin(W~) >= m - ||dW||``.

    Weyl's inequality for the symmetric parts: ``lmin(sym(I - W~)) >= lmin(sym(I - W)) - ||sym(dW)||``
    and ``||sym(dW)|| <= ||dW||``. ``||dW|| < m`` therefore certifies a unique equilibrium.
    """
    return m - dW_norm


def lipschitz_perturbation_bounds(L: float, dW_norm: float) -> tuple[float, float]:
    """Theorem 2 (Lipschitz part): ``L - ||dW|| <= L(W~) <= L + ||dW||`` (triangle inequality)."""
    return (max(L - dW_norm, 0.0), L + dW_norm)


def quantized_contraction_modulus(
    method: str, step: float, m: float, L: float, dW_norm: float
) -> float | None:
    """Corollary 1: modulus of the quantized solver with step ``a`` when ``||dW|| < m``.

    Substitutes the certified bounds ``m - ||dW||`` and ``L + ||dW||`` into the method's modulus,
    e.g. FB ``sqrt(1 - 2 a (m - ||dW||) + a^2 (L + ||dW||)^2)``. ``None`` when not certified.
    """
    if dW_norm >= m:
        return None
    return contraction_modulus(method, step, m - dW_norm, L + dW_norm)


def displacement_bound(
    dW_norm: float, z_tilde_norm: torch.Tensor | float, m: float, injection_shift: Any = 0.0
) -> torch.Tensor | float:
    """Theorem 3 (displacement): ``||z* - z~*|| <= (||dW|| ||z~*|| + ||dU x + db||) / m``.

    Valid whenever the quantized equilibrium ``z~*`` exists (``margin(W~) > 0``) and ``m > 0``:
    ``z~*`` is the float network's equilibrium for the shifted injection ``q + dW z~* + dU x + db``
    and the float equilibrium map is ``1/m``-Lipschitz in the injection. ``z_tilde_norm`` may be a
    per-sample tensor; ``injection_shift`` is ``||dU x + db||`` (0 when only ``W`` is quantized).
    """
    if m <= 0:
        raise ValueError("Theorem 3 needs a monotone float operator (m > 0)")
    return (dW_norm * z_tilde_norm + injection_shift) / m


def rigorous_displacement_check(
    empirical: torch.Tensor,
    dW_norm: float,
    z_tilde_norm: torch.Tensor,
    m: float,
    err_float: torch.Tensor,
    err_quant: torch.Tensor,
    injection_shift: Any = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 3 compared against computed equilibria, with the solver errors accounted for.

    With computed ``z^``, ``z~^`` and a-posteriori errors ``e1 >= ||z^ - z*||``, ``e2 >= ||z~^ - z~*||``:
    ``||z^ - z~^|| <= ||z* - z~*|| + e1 + e2 <= (||dW|| (||z~^|| + e2) + shift) / m + e1 + e2``.
    Returns ``(bound, holds)`` per sample; the theorem says ``holds`` is true everywhere.
    """
    bound = displacement_bound(dW_norm, z_tilde_norm + err_quant, m, injection_shift)
    bound = bound + err_float + err_quant
    return bound, empirical <= bound


def relative_displacement_bound(dW_norm: float, m: float) -> float:
    """Corollary 3 (relative): ``||z* - z~*|| / ||z*|| <= r / (1 - r)``, ``r = ||dW|| / m < 1``.

    Returns ``inf`` when ``r >= 1`` (nothing is certified).
    """
    r = dW_norm / m if m > 0 else math.inf
    return r / (1.0 - r) if r < 1.0 else math.inf


def condition_numbers(m: float, norm_W: float) -> dict[str, float]:
    """Theorem 4 (conditioning) of the map ``W -> z*``.

    Absolute condition number ``<= ||z*|| / m`` (returned as the factor ``1/m``, to be multiplied by
    ``||z*||``); relative condition number ``<= ||W|| / m``.
    """
    if m <= 0:
        return {"absolute_factor": math.inf, "relative": math.inf}
    return {"absolute_factor": 1.0 / m, "relative": norm_W / m}


def iterate_error_bound(rho: float, k: int, initial_error: float, errors: list[float]) -> float:
    """Corollary 2 (iterate errors): for ``z_{j+1} = T~(z_j) + e_j`` with ``T~`` a rho-contraction,

    ``||z_k - z~*|| <= rho^k ||z_0 - z~*|| + sum_{j<k} rho^(k-1-j) ||e_j||``.
    ``errors`` holds ``||e_0||, ..., ||e_{k-1}||`` (only the first ``k`` are used).
    """
    acc = rho**k * initial_error
    for j, e in enumerate(errors[:k]):
        acc += rho ** (k - 1 - j) * e
    return acc


def iterate_error_radius(e: float, rho: float) -> float:
    """Corollary 2 with a constant per-step error ``e``: the limit ball radius ``e / (1 - rho)``."""
    return e / (1.0 - rho) if rho < 1.0 else math.inf


def a_priori_dW_bound(step: torch.Tensor | float, n_cols: int) -> float:
    """A-priori bound ``||dW|| <= ||dW||_F <= n D_b / 2`` (no quantization needed).

    Every entry of ``dW`` is at most ``D/2`` in magnitude. With one step per row (per-channel) the
    Frobenius bound is ``sqrt(n_cols * sum_i (D_i / 2)^2)``, which is ``n D / 2`` for a square
    ``n x n`` matrix with a single step.
    """
    s = torch.as_tensor(step, dtype=torch.float64).reshape(-1)
    if s.numel() == 1:
        return float(s[0]) * n_cols / 2.0 if n_cols else 0.0
    return math.sqrt(n_cols * float((s / 2.0).square().sum()))


def a_priori_min_bits(n: int, w_max: float, m: float) -> int | None:
    """Pre-deployment check: ``n D_b / 2 < m  <=>  b > log2(1 + n w_max / m)`` (per-tensor).

    Returns the smallest such integer ``b`` in ``[2, 32]``, or ``None`` (not monotone, or beyond 32).
    """
    if m <= 0:
        return None
    b = max(2, math.floor(math.log2(1.0 + n * w_max / m)) + 1)
    while b <= 32 and n * w_max / (2**b - 1) >= m:  # guard the floating-point boundary
        b += 1
    return b if b <= 32 else None


def backward_certificate(forward_certified: bool, forward_modulus: float | None) -> dict[str, Any]:
    """Theorem 5 (backward): a certified forward pass certifies the adjoint solve, same modulus.

    The adjoint ``y = P_D(W~^T y + g)`` has linear part ``I - W~^T`` with the same margin and
    Lipschitz constant as the forward problem.
    """
    return {
        "backward_certified": bool(forward_certified and forward_modulus is not None),
        "backward_modulus": forward_modulus if forward_certified else None,
    }


@dataclass
class Certificate:
    """Everything the weights prove about one quantization ``W -> W~`` (JSON round-trip).

    Float operator: ``margin`` (= m), ``L``, ``norm_W``, ``kappa``. Quantization: ``bits``,
    ``granularity``, ``step`` (largest step ``D_b``), ``dW_norm`` (exact, float64),
    ``dW_over_m``, ``a_priori_bound``. Theorem 2: ``weyl_bound = m - ||dW||``, ``L_quantized_bounds``.
    Exact: ``margin_quantized``, ``L_quantized``. Verdicts: ``certified_a_priori``,
    ``certified_weyl``, ``certified_exact``. Corollary 1: ``rho_fb_cor1`` / ``rho_pr_cor1`` (at the
    steps those bounds certify); exact moduli of the quantized operator at its own steps:
    ``rho_fb_exact`` / ``rho_pr_exact``. Corollary 3: ``relative_displacement_bound``.
    Theorem 4: ``cond_relative``, ``cond_absolute_factor``. Theorem 5: ``backward_certified``,
    ``backward_modulus``. ``None``/``inf`` mean "not certified".
    """

    bits: int | None
    granularity: str
    n: int
    step: float
    w_max: float
    margin: float
    L: float
    norm_W: float
    kappa: float
    dW_norm: float
    dW_over_m: float
    a_priori_bound: float
    weyl_bound: float
    L_quantized_bounds: tuple[float, float]
    margin_quantized: float
    L_quantized: float
    certified_a_priori: bool
    certified_weyl: bool
    certified_exact: bool
    rho_fb_cor1: float | None
    rho_pr_cor1: float | None
    rho_fb_exact: float | None
    rho_pr_exact: float | None
    relative_displacement_bound: float
    cond_relative: float
    cond_absolute_factor: float
    backward_certified: bool
    backward_modulus: float | None
    monotone: bool

    @property
    def tier(self) -> str:
        """The strongest tier that holds: ``a_priori``, ``weyl``, ``exact`` or ``none``."""
        for t in TIERS:
            if getattr(self, f"certified_{t}"):
                return t
        return "none"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["L_quantized_bounds"] = list(self.L_quantized_bounds)
        d["tier"] = self.tier
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Certificate:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k not in names:
                continue
            if isinstance(v, str) and v in ("inf", "-inf", "nan"):
                v = float(v)
            kw[k] = v
        kw["L_quantized_bounds"] = tuple(kw["L_quantized_bounds"])
        return cls(**kw)


def certify(
    W: torch.Tensor,
    bits: int | None = None,
    granularity: str = "per-tensor",
    W_tilde: torch.Tensor | None = None,
) -> Certificate:
    """Certify the quantization of ``W``: at ``bits`` with ``granularity``, or an explicit ``W~``.

    Everything is computed in float64 from the weights alone; no solver runs. A ``W`` that is not
    monotone (``m <= 0``) gets a certificate with every verdict false.
    """
    check_weight(W)
    W64 = W.detach().to(torch.float64)
    n = W.shape[0]
    if W_tilde is None:
        if bits is None:
            raise ValueError("certify needs bits or an explicit W_tilde")
        q = quantize(W64, check_bits(bits), granularity)
        Wt = q.dequantized()
        step_t, w_max = q.step, float(q.w_max.max())
    else:
        check_weight(W_tilde, "W_tilde")
        if W_tilde.shape != W.shape:
            raise ValueError(f"W_tilde shape {tuple(W_tilde.shape)} != W shape {tuple(W.shape)}")
        Wt = W_tilde.detach().to(torch.float64)
        dW_abs = (Wt - W64).abs().max()
        step_t, w_max = 2.0 * dW_abs, float(W64.abs().max())
        granularity = "explicit"
    st = spectral_stats(W64)
    st_q = spectral_stats(Wt)
    m, L = st.m, st.L
    dW = spectral_norm(Wt - W64)
    apb = a_priori_dW_bound(step_t, n)
    monotone = m > 0
    cert_ap = monotone and apb < m
    cert_weyl = monotone and dW < m
    cert_exact = st_q.m > 0
    m_lo, L_hi = m - dW, L + dW
    rho_fb_c = rho_pr_c = None
    if cert_weyl:
        rho_fb_c = quantized_contraction_modulus("fb", default_step("fb", m_lo, L_hi), m, L, dW)
        rho_pr_c = quantized_contraction_modulus("pr", default_step("pr", m_lo, L_hi), m, L, dW)
    rho_fb_x = rho_pr_x = None
    if cert_exact:
        rho_fb_x = contraction_modulus("fb", default_step("fb", st_q.m, st_q.L), st_q.m, st_q.L)
        rho_pr_x = contraction_modulus("pr", default_step("pr", st_q.m, st_q.L), st_q.m, st_q.L)
    cond = condition_numbers(m, st.norm_W)
    back = backward_certificate(cert_exact, rho_pr_x)
    return Certificate(
        bits=bits if W_tilde is None else None,
        granularity=granularity,
        n=n,
        step=float(torch.as_tensor(step_t).max()),
        w_max=w_max,
        margin=m,
        L=L,
        norm_W=st.norm_W,
        kappa=st.kappa,
        dW_norm=dW,
        dW_over_m=dW / m if monotone else math.inf,
        a_priori_bound=apb,
        weyl_bound=weyl_margin_bound(m, dW),
        L_quantized_bounds=lipschitz_perturbation_bounds(L, dW),
        margin_quantized=st_q.m,
        L_quantized=st_q.L,
        certified_a_priori=cert_ap,
        certified_weyl=cert_weyl,
        certified_exact=cert_exact,
        rho_fb_cor1=rho_fb_c,
        rho_pr_cor1=rho_pr_c,
        rho_fb_exact=rho_fb_x,
        rho_pr_exact=rho_pr_x,
        relative_displacement_bound=relative_displacement_bound(dW, m) if monotone else math.inf,
        cond_relative=cond["relative"],
        cond_absolute_factor=cond["absolute_factor"],
        backward_certified=back["backward_certified"],
        backward_modulus=back["backward_modulus"],
        monotone=monotone,
    )


def certify_sweep(
    W: torch.Tensor, bits_list: list[int], granularity: str = "per-tensor"
) -> list[Certificate]:
    """One :class:`Certificate` per bit-width."""
    return [certify(W, b, granularity) for b in bits_list]


def min_certified_bits(
    W: torch.Tensor, granularity: str = "per-tensor", bits_range: range = range(2, 33)
) -> dict[str, int | None]:
    """The smallest bit-width certified by each tier (``None`` if none in ``bits_range``).

    A tier's verdict need not be monotone in ``b`` for the exact tier; the smallest ``b`` for which
    the tier holds is reported, together with whether it also holds for every larger ``b`` checked
    (key ``<tier>_monotone_from_min``).
    """
    certs = certify_sweep(W, list(bits_range), granularity)
    out: dict[str, Any] = {}
    for t in TIERS:
        ok = [getattr(c, f"certified_{t}") for c in certs]
        first = next((i for i, v in enumerate(ok) if v), None)
        out[t] = certs[first].bits if first is not None else None
        out[f"{t}_monotone_from_min"] = bool(first is not None and all(ok[first:]))
    return out
