"""Certificates for multi-tier convolutional MonDEQs: the Weyl tier with a rigorous ``||dW||``.

The float operator is a :class:`~monquant.operators.multitier.MultiTierWKOperator` (factors
``P``, ``Q``, ``B`` and ``m``): ``margin(W) >= m`` by construction. Quantization acts on its
composite kernels (:meth:`~monquant.operators.multitier.MultiTierWKOperator.composite`: one kernel
per diagonal block and per stride-2 coupling), each quantized on its own (per tensor, or per
output channel), giving a :class:`~monquant.operators.multitier.MultiTierConvOperator` ``W~``.
The certificate rests on proved bounds only:

- **Composition.** The composite kernels are computed in float64 on the CPU from the stored
  factors; every tap is a sum of at most ``N = r k^2 + 8`` rounded products and terms, so it errs
  by at most ``gamma_N`` times the same tap of the composite of ``|P|``, ``|Q|``, ``|B|`` and
  ``|1 - m|`` (:func:`composition_error`); a convolution's norm is at most the sum of its taps'
  norms, ``<= sqrt(kh kw) ||E||_F``, and a stride-2 coupling's at most its convolution's.
  So ``||W_comp - W|| <= e_comp`` and ``margin(W_comp) >= m - e_comp``.
- **Blocks.** The difference ``W~ - W_comp`` is block lower bidiagonal; the norm of each diagonal
  block is proved from its Fourier blocks and each coupling's through the polyphase identity
  (:func:`monquant.certify_conv.conv_norm_bounds`, interval-enclosed twiddles, batched Cholesky).
- **Combination.** ``||M|| <= ||(||M_ij||)||_2`` for any block operator, and the spectral norm
  of a non-negative matrix grows with its entries, so a proved ``||.||_2`` of the ``T x T`` matrix
  of proved block bounds (:func:`monquant.verified.norm2_upper_bound`) bounds ``||W~ - W||``.

Then ``margin(W~) >= m - e_comp - ||W~ - W_comp||_hi`` (Theorem 2, Weyl) decides the verdict.
A diagonal block of ``W~`` is a principal compression of ``W~``, so
``margin(W~) <= min_i margin(W~_ii)`` (proved per tier from its Fourier blocks): a quantized
operator is *refuted* when one of its diagonal blocks is provably not monotone. In between, the
verdict is ``undecided``: no exact tier is claimed for a multi-tier ``W~`` (that would need the
spectrum of the whole coupled operator). The computed margins, ``L`` and ``||dW||`` of a
multi-tier certificate are **estimates** (for the margins, the smaller of a power iteration's
Rayleigh quotient and the proved diagonal-block upper bound, both upper estimates; block-norm
values for ``L`` and ``||dW||``), shown for reading; none decides anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from monquant.certify import Certificate, a_priori_entry_bound, certificate_from_bounds, min_bits_of
from monquant.certify_conv import conv_difference_bounds, conv_norm_bounds, conv_spectral_bounds
from monquant.errors import ConfigError
from monquant.operators.conv import _circular, _flipped_T, kernel_from_impulses
from monquant.operators.multitier import (
    MultiTierConvOperator,
    MultiTierWKOperator,
    block_matrix,
    strided_conv,
    upsample,
)
from monquant.operators.spectral import estimate_margin
from monquant.quant.uniform import Quantized, quantize
from monquant.verified import (
    UNIT_ROUNDOFF,
    SpectralBounds,
    down,
    frobenius_upper_bound,
    gamma,
    norm2_upper_bound,
    up,
)

__all__ = [
    "MultiTierFloatBounds",
    "block_matrix_norm_bound",
    "certify_deployed",
    "certify_multitier",
    "certify_multitier_sweep",
    "composition_error",
    "difference_bounds",
    "min_certified_bits_multitier",
    "multitier_float_bounds",
    "quantize_kernels",
    "quantize_multitier",
]

#: Power iterations for the (labelled) margin estimates shown beside the proved bounds.
ESTIMATE_ITERS = 100


def block_matrix_norm_bound(N: torch.Tensor) -> float:
    """A proved upper bound on ``||M||_2`` for a block operator whose block norms are bounded by
    the non-negative ``T x T`` matrix ``N``: ``||M|| <= ||(||M_ij||)||_2 <= ||N||_2``."""
    return norm2_upper_bound(N.to(torch.float64))


def composition_error(op: MultiTierWKOperator) -> float:
    """A proved bound on ``||W_comp - W||``: the composite kernels of ``op.composite()`` against
    the exact operator of the stored factors (module docstring)."""
    f = op.to(dtype=torch.float64, device="cpu").detach()
    P = [t.abs() for t in f.P]
    Q = [t.abs() for t in f.Q]
    B = [t.abs() for t in f.B]
    one_m = abs(1.0 - float(f.m))
    size = op.kernel_size
    T = op.tiers

    def diag_abs(i: int, x: torch.Tensor) -> torch.Tensor:
        o = one_m * x + _circular(_circular(x, P[i]), _flipped_T(P[i]))
        if i > 0:
            o = o + strided_conv(_circular(upsample(x), Q[i - 1]), _flipped_T(Q[i - 1]))
        return o + _circular(x, B[i]) + _circular(x, _flipped_T(B[i]))

    def down_abs(i: int, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * _circular(_circular(x, P[i]), _flipped_T(Q[i]))

    r = max(int(t.shape[0]) for t in P)
    k2 = max(int(t.shape[-1]) * int(t.shape[-2]) for t in (*P, *Q, *B))
    g = up(gamma(r * k2 + 8) * up(1.0 + 2.0 * gamma(r * k2 + 8)))
    taps = math.sqrt(size[0] * size[1])
    sq = 0.0
    for i, c in enumerate(op.channels):
        A = kernel_from_impulses(lambda x, i=i: diag_abs(i, x), c, size, torch.float64, "cpu")
        e = up(up(g * taps) * frobenius_upper_bound(A))
        sq = up(sq + up(e * e))
        if i < T - 1:
            R = kernel_from_impulses(lambda x, i=i: down_abs(i, x), c, size, torch.float64, "cpu")
            e = up(up(g * taps) * frobenius_upper_bound(R))
            sq = up(sq + up(e * e))
    return up(math.sqrt(up(sq * up(1.0 + 4.0 * UNIT_ROUNDOFF))))  # ||N|| <= ||N||_F


@dataclass(frozen=True)
class MultiTierFloatBounds:
    """The float operator's side of a multi-tier certificate (computed once per model):
    its composite ``comp``, the proved composition error ``e_comp`` and :class:`SpectralBounds`
    (``m_lo = m - e_comp`` by construction; ``L_hi``, ``norm_hi`` from proved block bounds;
    ``m``, ``L``, ``norm_W`` estimates)."""

    comp: MultiTierConvOperator
    e_comp: float
    bounds: SpectralBounds


def _blocks_bound(op: MultiTierConvOperator, shift: bool) -> tuple[float, float, float]:
    """``(proved upper, computed, smallest proved upper margin of a diagonal block)`` for
    ``||I - W||`` (``shift``) or ``||W||`` of a composite operator; the computed value is the
    spectral norm of the matrix of computed block norms (an estimate, for reading)."""
    diag = [conv_spectral_bounds(K, img, norm=not shift) for K, img in zip(op.diag, op.images, strict=False)]
    down = [conv_norm_bounds(R, img, strided=True) for R, img in zip(op.down, op.images, strict=False)]
    hi = block_matrix([st.L_hi if shift else st.norm_hi for st in diag], [d[0] for d in down])
    computed = block_matrix([st.L if shift else st.norm_W for st in diag], [d[1] for d in down])
    return (block_matrix_norm_bound(hi), float(torch.linalg.matrix_norm(computed, ord=2)),
            min(st.m_hi for st in diag))  # fmt: skip


def multitier_float_bounds(op: MultiTierWKOperator) -> MultiTierFloatBounds:
    """Proved bounds of the float multi-tier operator (:class:`MultiTierFloatBounds`)."""
    comp = op.composite()
    e_comp = composition_error(op)
    L_hi, L, m_hi = _blocks_bound(comp, shift=True)
    norm_hi, norm_W, _ = _blocks_bound(comp, shift=False)
    st = SpectralBounds(
        m_lo=down(float(op.m.detach()) - e_comp), m_hi=up(m_hi + e_comp),
        L_hi=up(L_hi + e_comp), norm_hi=up(norm_hi + e_comp),
        m=min(estimate_margin(comp, L, ESTIMATE_ITERS), m_hi), L=L, norm_W=norm_W,
    )  # fmt: skip
    return MultiTierFloatBounds(comp=comp, e_comp=e_comp, bounds=st)


def difference_bounds(tilde: MultiTierConvOperator, comp: MultiTierConvOperator) -> tuple[float, float]:
    """``(upper, computed)`` for ``||W~ - W_comp||``: a proved bound (module docstring) and the
    spectral norm of the matrix of computed block norms."""
    diag = [conv_difference_bounds(a, b, img)
            for a, b, img in zip(tilde.diag, comp.diag, comp.images, strict=False)]  # fmt: skip
    down = [conv_difference_bounds(a, b, img, strided=True)
            for a, b, img in zip(tilde.down, comp.down, comp.images, strict=False)]  # fmt: skip
    hi = block_matrix([d[0] for d in diag], [d[0] for d in down])
    computed = block_matrix([d[1] for d in diag], [d[1] for d in down])
    return block_matrix_norm_bound(hi), float(torch.linalg.matrix_norm(computed, ord=2))


def quantize_kernels(
    comp: MultiTierConvOperator, bits: int, granularity: str = "per-tensor", step_rule: str = "paper"
) -> list[Quantized]:
    """Every composite kernel of ``comp`` quantized on its own grid (``per-channel``: one step per
    output channel), in :meth:`MultiTierConvOperator.kernels` order: what a multi-tier ``W~`` is,
    whether certified here or saved by ``monquant ptq``."""
    return [quantize(K, bits, granularity, step_rule=step_rule) for K in comp.kernels()]


def quantize_multitier(
    comp: MultiTierConvOperator, bits: int, granularity: str = "per-tensor", step_rule: str = "paper"
) -> tuple[MultiTierConvOperator, dict[str, Any]]:
    """``W~`` (:func:`quantize_kernels`, dequantized in float64), and the quantization's summary
    (largest step, ``w_max``, and the a-priori entry bound of each kernel)."""
    qs = quantize_kernels(comp, bits, granularity, step_rule)
    kernels = [q.dequantized().to(torch.float64) for q in qs]
    tilde = MultiTierConvOperator.from_kernels(kernels, comp.image, checked=True)
    info = {
        "step": max(float(q.step.max()) for q in qs),
        "w_max": max(float(q.w_max.max()) for q in qs),
        "entry": [float(a_priori_entry_bound(q.step, q.w_max, torch.float64).max()) for q in qs],
    }
    return tilde, info


def _a_priori(comp: MultiTierConvOperator, entry: list[float]) -> float:
    """``||dW|| <= ||N||`` with ``N_ij >= sum_taps ||dK_tap||_2 <= kh kw sqrt(c_out c_in) max|dK|``
    (``entry``: the bounds on ``max|dK|`` of the diagonal kernels, then of the couplings)."""
    vals = []
    for j, K in enumerate((*comp.diag, *comp.down)):
        co, ci, kh, kw = (int(s) for s in K.shape)
        vals.append(up(up(kh * kw * math.sqrt(co * ci)) * up(entry[j] * up(1.0 + 2.0 * UNIT_ROUNDOFF))))
    return block_matrix_norm_bound(block_matrix(vals[: comp.tiers], vals[comp.tiers :]))


def certify_multitier(
    op: MultiTierWKOperator,
    bits: int | None = None,
    granularity: str = "per-tensor",
    tilde: MultiTierConvOperator | None = None,
    step_rule: str = "paper",
    float_bounds: MultiTierFloatBounds | None = None,
) -> Certificate:
    """The certificate of quantizing the multi-tier operator ``op`` at ``bits`` with
    ``granularity`` and ``step_rule`` (each composite kernel on its own grid), or of an explicit
    quantized operator ``tilde`` (a :class:`MultiTierConvOperator` on the same tiers). Decided by
    the Weyl tier with a proved ``||dW||`` (module docstring); no solver runs and no dense matrix
    is formed. The computed margins and norms in it are estimates (module docstring)."""
    fb = float_bounds if float_bounds is not None else multitier_float_bounds(op)
    comp = fb.comp
    rule: str | None = step_rule
    if tilde is None:
        if bits is None:
            raise ConfigError("certify_multitier needs bits or tilde")
        tilde, info = quantize_multitier(comp, bits, granularity, step_rule)
        apb = _a_priori(comp, info["entry"])
        step, w_max = info["step"], info["w_max"]
    else:
        if tilde.channels != comp.channels or tilde.images != comp.images:
            raise ConfigError("tilde must have the tiers of the float operator "
                              f"(channels {list(comp.channels)}, image {comp.image})")  # fmt: skip
        tilde = tilde.to(dtype=torch.float64, device="cpu")
        d = [float((a - b).abs().max()) for a, b in
             zip((*tilde.diag, *tilde.down), (*comp.diag, *comp.down), strict=True)]  # fmt: skip
        apb = _a_priori(comp, d)
        step, w_max = 2.0 * max(d), max(float(K.abs().max()) for K in (*comp.diag, *comp.down))
        granularity, bits, rule = "explicit", None, None
    e = fb.e_comp
    dW_hi, dW = difference_bounds(tilde, comp)
    dW_hi = up(dW_hi + e)
    apb = up(apb + e)
    L_hi_q, L_q, m_hi_q = _blocks_bound(tilde, shift=True)
    st_q = SpectralBounds(m_lo=-math.inf, m_hi=m_hi_q, L_hi=L_hi_q, norm_hi=math.nan,
                          m=min(estimate_margin(tilde, L_q, ESTIMATE_ITERS), m_hi_q), L=L_q,
                          norm_W=math.nan)  # fmt: skip
    return certificate_from_bounds(
        fb.bounds, st_q, dW_hi, dW, apb, n=comp.size, bits=bits,
        granularity=granularity, step=step, w_max=w_max,
        step_rule=rule,
    )  # fmt: skip


def certify_multitier_sweep(
    op: MultiTierWKOperator,
    bits_list: list[int],
    granularity: str = "per-tensor",
    progress: bool = False,
    step_rule: str = "paper",
    float_bounds: MultiTierFloatBounds | None = None,
) -> list[Certificate]:
    """One :func:`certify_multitier` certificate per bit-width (the float side proved once, or
    given as ``float_bounds``)."""
    from monquant.progress import progress_bar

    fb = float_bounds if float_bounds is not None else multitier_float_bounds(op)
    bar = progress_bar(bits_list, desc=f"certify {granularity}", enabled=progress, unit="bits")
    return [certify_multitier(op, b, granularity, step_rule=step_rule, float_bounds=fb) for b in bar]


def min_certified_bits_multitier(
    op: MultiTierWKOperator,
    granularity: str = "per-tensor",
    bits_range: range = range(2, 17),
    progress: bool = False,
    step_rule: str = "paper",
    float_bounds: MultiTierFloatBounds | None = None,
) -> dict[str, Any]:
    """The smallest bit-width each tier certifies (:func:`monquant.certify.min_bits_of`)."""
    return min_bits_of(certify_multitier_sweep(op, list(bits_range), granularity, progress, step_rule,
                                               float_bounds))  # fmt: skip


def certify_deployed(
    op: MultiTierWKOperator,
    bits: int,
    granularity: str = "per-tensor",
    step_rule: str = "paper",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    float_bounds: MultiTierFloatBounds | None = None,
) -> tuple[Certificate, MultiTierConvOperator]:
    """PTQ of ``op`` as a layer deploys it and the certificate of exactly that ``W~``: the
    composite kernels quantized at ``bits`` (:func:`quantize_multitier`) and stored in ``dtype``
    on ``device``; the certificate is labelled with ``bits``, ``granularity`` and ``step_rule``."""
    fb = float_bounds if float_bounds is not None else multitier_float_bounds(op)
    tilde = quantize_multitier(fb.comp, bits, granularity, step_rule)[0].to(dtype=dtype, device=device)
    cert = certify_multitier(op, tilde=tilde, float_bounds=fb)
    return dataclasses.replace(cert, bits=bits, granularity=granularity, step_rule=step_rule), tilde
