"""Certificates: what the weights alone prove about a quantized MonDEQ (docs/theory.md section 3).

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

from monquant.errors import ConfigError
from monquant.names import TIERS
from monquant.operators import MonotoneOperator, OperatorError, check_weight
from monquant.quant.uniform import check_bits, quantize, step_size
from monquant.solvers import contraction_modulus, default_step
from monquant.verified import (
    UNIT_ROUNDOFF,
    SpectralBounds,
    down,
    inflate,
    modulus_upper_bound,
    quantized_bounds,
    spectral_bounds,
    unit_roundoff,
    up,
)

__all__ = [
    "JSON_KEYS",
    "TIERS",
    "Certificate",
    "a_priori_dW_bound",
    "a_priori_entry_bound",
    "a_priori_min_bits",
    "backward_certificate",
    "certificate_from_bounds",
    "certify",
    "certify_operator",
    "certify_sweep",
    "condition_numbers",
    "displacement_bound",
    "iterate_error_bound",
    "iterate_error_radius",
    "lipschitz_perturbation_bounds",
    "min_bits_of",
    "min_certified_bits",
    "quantized_contraction_modulus",
    "quantized_operator",
    "relative_displacement_bound",
    "rigorous_displacement_check",
    "weyl_margin_bound",
]


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
        raise ConfigError("Theorem 3 needs a monotone float operator (m > 0)")
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
    Returns ``(bound, holds)`` per sample; the theorem says ``holds`` is true everywhere. Pass
    proved constants (``dW_norm`` an upper bound, ``m`` a lower bound: :mod:`monquant.verified`);
    the few roundings of this formula are covered by a relative ``64 u`` widening.
    """
    bound = displacement_bound(dW_norm, z_tilde_norm + err_quant, m, injection_shift)
    bound = (bound + err_float + err_quant) * (1.0 + 64.0 * UNIT_ROUNDOFF)
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


def a_priori_dW_bound(entry: torch.Tensor | float, n_cols: int) -> float:
    """A-priori bound ``||dW|| <= ||dW||_F <= n D_b / 2`` (no quantization needed), proved.

    ``entry`` bounds every ``|dW_ij|``: one number (per-tensor; ``D_b / 2`` in exact arithmetic,
    :func:`a_priori_entry_bound` for the stored ``W~``) or one per row (per-channel). The bound is
    ``n_cols * e``, or ``sqrt(n_cols * sum_i e_i^2)`` with one ``e_i`` per row, rounded up.
    """
    e = torch.as_tensor(entry, dtype=torch.float64).reshape(-1)
    if e.numel() == 1:
        return up(float(e[0]) * n_cols)
    return up(math.sqrt(inflate(n_cols * float(e.square().sum()), e.numel() + 2)))


def a_priori_min_bits(
    n: int, w_max: float, m: float, dtype: torch.dtype = torch.float64, step_rule: str = "paper"
) -> int | None:
    """Pre-deployment check: the smallest ``b`` in ``[2, 32]`` with ``n D_b / 2 < m`` (per-tensor).

    ``n D_b / 2 < m  <=>  b > log2(1 + n w_max / m)`` in exact arithmetic for the paper's step
    (``b > 1 + log2(1 + n w_max / (2m))`` for the narrow one); the test here uses the
    same proved entry bound as :func:`certify` (:func:`a_priori_entry_bound`, for ``W~`` stored in
    ``dtype``), so it agrees with the a-priori tier. Pass a proved lower bound on the margin as ``m``.
    Returns ``None`` when ``m <= 0`` or no ``b <= 32`` passes.
    """
    if not m > 0:
        return None
    wm = torch.tensor(float(w_max), dtype=torch.float64)
    for b in range(2, 33):
        e = a_priori_entry_bound(step_size(wm, b, step_rule), wm, dtype)
        if a_priori_dW_bound(e, n) < m:
            return b
    return None


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

    Two kinds of number, never mixed up: *computed* float64 values (``margin``, ``L``, ``norm_W``,
    ``kappa``, ``dW_norm``, ``dW_over_m``, ``margin_quantized``, ``L_quantized``: estimates, shown
    for reading) and *proved* bounds (``margin_lower``, ``L_upper``, ``dW_norm_upper``,
    ``margin_quantized_lower`` / ``_upper``, ``L_quantized_upper``, ``a_priori_bound``,
    ``weyl_bound``), valid in exact arithmetic for the stored ``W`` and ``W~``
    (:mod:`monquant.verified`). Every verdict and modulus is decided by the proved bounds only.

    Quantization: ``bits``, ``granularity``, ``step`` (largest step ``D_b``), ``w_max``.
    Theorem 2: ``weyl_bound`` (proved lower bound ``m_lo - ||dW||_hi`` on ``margin(W~)``),
    ``L_quantized_bounds`` (computed ``L -+ ||dW||``). Verdicts: ``certified_a_priori`` =>
    ``certified_weyl`` => ``certified_exact`` (by construction) and the three-valued ``verdict``:
    ``certified``, ``refuted`` (``margin(W~)`` provably ``< 0``) or ``undecided`` (within rounding
    error of 0). Corollary 1: ``rho_fb_cor1`` / ``rho_pr_cor1`` (at the steps those bounds certify);
    moduli of the quantized operator at its own steps: ``rho_fb_exact`` / ``rho_pr_exact`` (proved
    upper bounds, always ``< 1`` when given). Corollary 3: ``relative_displacement_bound``.
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
    margin_lower: float = -math.inf
    L_upper: float = math.inf
    dW_norm_upper: float = math.inf
    margin_quantized_lower: float = -math.inf
    margin_quantized_upper: float = math.inf
    L_quantized_upper: float = math.inf
    verdict: str = "undecided"
    step_rule: str | None = None

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
        """Rebuild from :meth:`to_dict` output, also as read back from JSON (null plus flag)."""
        from monquant.storage.jsonio import from_jsonable

        d = from_jsonable(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k not in names:
                continue
            if isinstance(v, str) and v in ("inf", "-inf", "nan"):
                v = float(v)  # files written before the null-plus-flag JSON convention
            kw[k] = v
        kw["L_quantized_bounds"] = tuple(kw["L_quantized_bounds"])
        return cls(**kw)


def a_priori_entry_bound(step: torch.Tensor, w_max: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proved bound on ``|W~_ij - W_ij|`` for the quantizer's ``W~`` stored in ``dtype``.

    ``D/2`` in exact arithmetic; the rounded division ``w / D`` (float64) and the storage of
    ``code * D`` in ``dtype`` add at most ``4 (u_64 + u_dtype) w_max`` (a generous allowance).
    """
    u = UNIT_ROUNDOFF + unit_roundoff(dtype)
    e = step.to(torch.float64) / 2.0 + 4.0 * u * w_max.to(torch.float64)
    return e * (1.0 + 4.0 * UNIT_ROUNDOFF)


def certify(
    W: torch.Tensor | MonotoneOperator,
    bits: int | None = None,
    granularity: str = "per-tensor",
    W_tilde: torch.Tensor | MonotoneOperator | None = None,
    W_tilde_radius: float = 0.0,
    float_bounds: SpectralBounds | None = None,
    step_rule: str = "paper",
) -> Certificate:
    """Certify the quantization of ``W``: at ``bits`` with ``granularity`` and ``step_rule``
    (``paper`` or ``narrow``, recorded in the certificate), or an explicit ``W~``.

    ``W`` and ``W~`` are matrices or operators (:mod:`monquant.operators`; an operator is certified
    through its matrix, :meth:`MonotoneOperator.dense`). With ``bits`` the paper's quantizer is
    applied here (:func:`quantized_operator`) and the result handed to :func:`certify_operator`,
    which is the certificate proper and never quantizes.

    The quantized operator certified is exactly the stored one: ``Q_b(W)`` is formed in ``W``'s own
    dtype, as the model's forward pass forms it (``codes * D`` rounded to that dtype), or ``W~`` is
    given (e.g. a deployment's exact dyadic ``codes * M 2^-S``; ``W_tilde_radius`` is an entrywise
    bound on ``|W~_true - W~|`` when the given entries are themselves rounded). No solver runs.
    ``float_bounds`` reuses ``spectral_bounds(W)`` across calls (sweeps over bit-widths).
    """
    W = _as_matrix(W, "W")
    if W_tilde is not None:
        return certify_operator(
            W, _as_matrix(W_tilde, "W_tilde"), radius=W_tilde_radius, float_bounds=float_bounds
        )
    if bits is None:
        raise OperatorError("certify needs bits or an explicit W_tilde")
    Wt, meta = quantized_operator(W, bits, granularity, step_rule)
    return certify_operator(W, Wt, float_bounds=float_bounds, _checked=True, **meta)  # W~ = Q_b(W)


def _as_matrix(W: torch.Tensor | MonotoneOperator, name: str) -> torch.Tensor:
    if isinstance(W, MonotoneOperator):
        W = W.dense()
    return check_weight(W, name)


def quantized_operator(
    W: torch.Tensor, bits: int, granularity: str = "per-tensor", step_rule: str = "paper"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``Q_b(W)`` in ``W``'s dtype and what the certificate needs to know about it.

    Returns ``(W~, meta)`` with ``meta`` the keyword arguments of :func:`certify_operator`:
    ``bits``, ``granularity``, ``step_rule``, ``step``, ``w_max`` and the proved a-priori bound on
    ``||W~ - W||``.
    """
    q = quantize(W.detach(), check_bits(bits), granularity, step_rule=step_rule)
    entry = a_priori_entry_bound(q.step, q.w_max, W.dtype)
    meta = {
        "bits": q.bits,
        "granularity": granularity,
        "step_rule": step_rule,
        "step": float(torch.as_tensor(q.step).max()),
        "w_max": float(q.w_max.max()),
        "a_priori": a_priori_dW_bound(entry, W.shape[0]),
    }
    return q.dequantized(), meta


def certify_operator(
    W: torch.Tensor | MonotoneOperator,
    W_tilde: torch.Tensor | MonotoneOperator,
    *,
    radius: float = 0.0,
    bits: int | None = None,
    granularity: str = "explicit",
    step: float | None = None,
    w_max: float | None = None,
    a_priori: float | None = None,
    float_bounds: SpectralBounds | None = None,
    step_rule: str | None = None,
    _checked: bool = False,
) -> Certificate:
    """The certificate of the pair ``(W, W~)``: float operator and the quantized one it deploys.

    Nothing is quantized here. ``radius`` is an entrywise bound on ``|W~_true - W~|``; ``a_priori``
    a proved bound on ``||W~ - W||`` known without looking at ``W~`` (the quantizer's
    ``n D_b / 2``), by default ``n max|W~ - W|`` rounded up. Verdicts come from the proved bounds
    of :mod:`monquant.verified` only; a ``W`` that is not provably monotone
    (``margin_lower <= 0``) gets the a-priori and Weyl tiers false.
    """
    if not _checked:  # (``_checked``: both are matrices of one shape, checked by the caller)
        W = _as_matrix(W, "W")
        W_tilde = _as_matrix(W_tilde, "W_tilde")
        if W_tilde.shape != W.shape:
            raise OperatorError(f"W_tilde shape {tuple(W_tilde.shape)} != W shape {tuple(W.shape)}")
    assert isinstance(W, torch.Tensor) and isinstance(W_tilde, torch.Tensor)
    W64 = W.detach().to(torch.float64)
    Wt = W_tilde.detach().to(torch.float64)
    n = W.shape[0]
    radius = float(radius)
    if a_priori is None:
        dW_abs = float((Wt - W64).abs().max())
        # |fl(Wt - W)| is within a factor (1 + u) of the exact entries; plus the radius.
        e = up(up(dW_abs * up(1.0 + 2.0 * UNIT_ROUNDOFF)) + radius)
        a_priori = a_priori_dW_bound(e, n)
        step = 2.0 * dW_abs if step is None else step
    apb = float(a_priori)
    step_t = float(step) if step is not None else 0.0
    w_max = float(W64.abs().max()) if w_max is None else float(w_max)
    st = float_bounds if float_bounds is not None else spectral_bounds(W64)
    st_q, dW_hi, dW = quantized_bounds(Wt, W64, radius)  # one batched verification
    return certificate_from_bounds(st, st_q, dW_hi, dW, apb, n=n, bits=bits,
                                   granularity=granularity, step=step_t, w_max=w_max,
                                   step_rule=step_rule)  # fmt: skip


def certificate_from_bounds(
    st: SpectralBounds,
    st_q: SpectralBounds,
    dW_hi: float,
    dW: float,
    apb: float,
    *,
    n: int,
    bits: int | None,
    granularity: str,
    step: float,
    w_max: float,
    step_rule: str | None,
) -> Certificate:
    """Every tier, modulus and bound of the certificate from proved bounds of the two operators:
    ``st`` of ``W`` and ``st_q`` of ``W~`` (:class:`~monquant.verified.SpectralBounds`),
    ``dW_hi >= ||W~ - W||`` (``dW`` its computed value) and the a-priori bound ``apb``. Any operator
    kind that proves these bounds (the dense matrix here, the Fourier blocks of a convolution in
    :mod:`monquant.certify_conv`) gets the same certificate."""
    m, L, m_lo = st.m, st.L, st.m_lo
    step_t = step
    dW_hi = min(dW_hi, apb)  # both are proved; the a-priori bound is the Frobenius bound's cap
    monotone = st.monotone
    weyl_lo = down(m_lo - dW_hi) if monotone else -math.inf
    L_hi_q = min(st_q.L_hi, up(st.L_hi + dW_hi))
    mq_lo = max(st_q.m_lo, weyl_lo)
    # Corollary 1 (Weyl tier): moduli from the bounds m_lo - ||dW||_hi and L_hi + ||dW||_hi.
    rho_fb_c = rho_pr_c = None
    if weyl_lo > 0:
        L_c = up(st.L_hi + dW_hi)
        rho_fb_c = modulus_upper_bound("fb", default_step("fb", weyl_lo, L_c), weyl_lo, L_c)
        rho_pr_c = modulus_upper_bound("pr", default_step("pr", weyl_lo, L_c), weyl_lo, L_c)
    rho_fb_x = rho_pr_x = None
    if mq_lo > 0:
        rho_fb_x = modulus_upper_bound("fb", default_step("fb", mq_lo, L_hi_q), mq_lo, L_hi_q)
        rho_pr_x = modulus_upper_bound("pr", default_step("pr", mq_lo, L_hi_q), mq_lo, L_hi_q)
    # Tiers imply each other by construction: a-priori => Weyl => exact.
    cert_weyl = monotone and weyl_lo > 0 and rho_pr_c is not None
    cert_ap = cert_weyl and apb < m_lo
    cert_exact = cert_weyl or (mq_lo > 0 and rho_pr_x is not None)
    if cert_exact:  # a proved margin > 0 and a proved modulus < 1
        verdict = "certified"
    elif st_q.m_hi < 0:
        verdict = "refuted"
    else:
        verdict = "undecided"
    cond = condition_numbers(m_lo, st.norm_hi)  # inf unless proved monotone (m_lo > 0)
    back = backward_certificate(cert_exact, rho_pr_x if rho_pr_x is not None else rho_pr_c)
    return Certificate(
        step_rule=step_rule,
        bits=bits,
        granularity=granularity,
        n=n,
        step=step_t,
        w_max=w_max,
        margin=m,
        L=L,
        norm_W=st.norm_W,
        kappa=L / m if m > 0 else math.inf,
        dW_norm=dW,
        dW_over_m=dW / m if m > 0 else math.inf,
        a_priori_bound=apb,
        weyl_bound=weyl_lo,
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
        relative_displacement_bound=(
            relative_displacement_bound(dW_hi, m_lo) if monotone else math.inf
        ),
        cond_relative=cond["relative"],
        cond_absolute_factor=cond["absolute_factor"],
        backward_certified=back["backward_certified"],
        backward_modulus=back["backward_modulus"],
        monotone=monotone,
        margin_lower=m_lo,
        L_upper=st.L_hi,
        dW_norm_upper=dW_hi,
        margin_quantized_lower=mq_lo,
        margin_quantized_upper=st_q.m_hi,
        L_quantized_upper=L_hi_q,
        verdict=verdict,
    )


def certify_sweep(
    W: torch.Tensor,
    bits_list: list[int],
    granularity: str = "per-tensor",
    progress: bool = False,
    step_rule: str = "paper",
) -> list[Certificate]:
    """One :class:`Certificate` per bit-width (the float operator's bounds computed once).

    ``progress=True`` shows a progress bar on stderr.
    """
    from monquant.progress import progress_bar

    st = spectral_bounds(check_weight(W))
    bar = progress_bar(bits_list, desc=f"certify {granularity}", enabled=progress, unit="bits")
    return [certify(W, b, granularity, float_bounds=st, step_rule=step_rule) for b in bar]


def min_certified_bits(
    W: torch.Tensor,
    granularity: str = "per-tensor",
    bits_range: range = range(2, 33),
    progress: bool = False,
    step_rule: str = "paper",
) -> dict[str, int | None]:
    """The smallest bit-width certified by each tier (``None`` if none in ``bits_range``).

    A tier's verdict need not be monotone in ``b`` for the exact tier; the smallest ``b`` for which
    the tier holds is reported, together with whether it also holds for every larger ``b`` checked
    (key ``<tier>_monotone_from_min``).
    """
    return min_bits_of(certify_sweep(W, list(bits_range), granularity, progress, step_rule))


def min_bits_of(certs: list[Certificate]) -> dict[str, Any]:
    """The smallest bit-width each tier certifies among ``certs`` (one per bit-width, increasing):
    ``<tier>`` (``None`` if none does) and ``<tier>_monotone_from_min`` (it holds for every larger
    bit-width of the list too)."""
    out: dict[str, Any] = {}
    for t in TIERS:
        ok = [getattr(c, f"certified_{t}") for c in certs]
        first = next((i for i, v in enumerate(ok) if v), None)
        out[t] = certs[first].bits if first is not None else None
        out[f"{t}_monotone_from_min"] = bool(first is not None and all(ok[first:]))
    return out
