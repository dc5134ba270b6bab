"""Certificates for circular convolutions, proved from the Fourier blocks (issue 12).

A circular convolution ``W`` on ``c x H x W`` states is unitarily similar to the block diagonal
``diag_w K^(w)`` (:mod:`monquant.operators.conv`), so every constant the certificate needs is a
maximum or minimum over frequencies of a ``c x c`` quantity: ``margin(W) = min_w lmin(I - H^(w))``
(``H`` the Hermitian part), ``L = max_w ||I - K^(w)||``, ``||W~ - W|| = max_w ||dK^(w)||``. They
are proved here in floating point, never estimated:

- **Twiddles.** ``cos(2 pi j / N)`` and ``sin(2 pi j / N)`` are enclosed by mpmath's interval
  arithmetic; the float64 values used are within ``delta`` (a proved bound) of the true ones.
- **Blocks.** ``K^(w) = sum_{a,b} K[:, :, a, b] t_H(k1 a') t_W(k2 b')`` is computed directly (not
  by an FFT, whose error analysis depends on the library's algorithm). Each entry then errs by at
  most ``(3 delta + 2 gamma_{kh kw + kh + kw + 8}) sum_{a,b} |K[o, i, a, b]|`` whatever the order of
  the sums, hence the block by at most the Frobenius norm ``e_K`` of those bounds.
- **Per-frequency bounds.** A ``c x c`` complex matrix ``M = X + i Y`` has the singular values of
  the real ``[[X, -Y], [Y, X]]`` (each twice), and a Hermitian one the eigenvalues. So the proved real
  routines of :mod:`monquant.verified` apply, batched over frequencies: one batched Cholesky
  factorization verifies a shift for every frequency at once (:func:`verified.cholesky_lower_bound`).
  Only the half spectrum ``k2 <= W // 2`` is needed (the blocks at ``-w`` are conjugate).

The results go into the same certificate as a dense ``W``
(:func:`monquant.certify.certificate_from_bounds`). The a-priori tier for a kernel quantized
with step ``D``: ``||dW|| <= sum_{a,b} ||dK[:, :, a, b]||_2 <= kh kw c D / 2``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from monquant.certify import (
    Certificate,
    a_priori_entry_bound,
    certificate_from_bounds,
    min_bits_of,
)
from monquant.errors import ConfigError
from monquant.operators.conv import check_kernel
from monquant.quant.uniform import quantize
from monquant.verified import (
    UNDERFLOW_UNIT,
    UNIT_ROUNDOFF,
    SpectralBounds,
    down,
    frobenius_upper_bound,
    gamma,
    inflate,
    lmin_upper_bound,
    shifted_lmax_upper,
    shifted_lmin_lower,
    up,
)

__all__ = [
    "certify_conv",
    "certify_conv_sweep",
    "conv_difference_bounds",
    "conv_norm_bounds",
    "conv_spectral_bounds",
    "min_certified_bits_conv",
    "proved_blocks",
    "twiddles",
]


@lru_cache(maxsize=64)
def _twiddle_table(N: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    from mpmath import iv, mpf

    iv.prec = 113
    cos, sin, delta = [], [], 0.0
    for j in range(N):
        ang = 2 * iv.pi * j / N
        for val, out in ((iv.cos(ang), cos), (iv.sin(ang), sin)):
            mid = float(val.mid)
            err = max(abs(mpf(val.a) - mid), abs(mpf(val.b) - mid))
            out.append(mid)
            delta = max(delta, float(err) * (1 + 2**-40) + 2**-1074)
    return tuple(cos), tuple(sin), delta


def twiddles(N: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """``(t, delta)``: ``t[j] ~ exp(2 pi i j / N)`` (complex128) with ``|t[j] - exp(..)| <= delta``
    proved (interval arithmetic on each part; ``delta`` covers both)."""
    cos, sin, delta = _twiddle_table(int(N))
    t = torch.complex(torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64))
    return t.to(device), up(math.sqrt(2.0) * delta)


def proved_blocks(
    kernel: torch.Tensor, image: tuple[int, int], half: bool = True
) -> tuple[torch.Tensor, float]:
    """``(blocks, e)``: the half-spectrum Fourier blocks ``(H, W // 2 + 1, c_out, c_in)`` of the
    circular convolution by ``kernel`` (``half=False``: the full spectrum ``(H, W, c_out, c_in)``)
    and a proved bound ``e >= ||computed - exact||_2`` that holds for every block (module
    docstring)."""
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    H, W = image
    K = kernel.detach().to(torch.float64)
    tH, dH = twiddles(H, K.device)
    tW, dW = twiddles(W, K.device)
    k1 = torch.arange(H, device=K.device)
    k2 = torch.arange(W // 2 + 1 if half else W, device=K.device)
    offs_h = torch.arange(kh, device=K.device) - kh // 2
    offs_w = torch.arange(kw, device=K.device) - kw // 2
    T1 = tH[(k1[:, None] * offs_h[None, :]) % H]  # (H, kh): exp(2 pi i k1 a' / H)
    T2 = tW[(k2[:, None] * offs_w[None, :]) % W]  # (W//2+1, kw)
    blocks = torch.einsum("ha,wb,oiab->hwoi", T1, T2, K.to(torch.complex128))
    delta = max(dH, dW)
    rel = up(up(3.0 * delta) + up(2.0 * gamma(kh * kw + kh + kw + 8)) * up(1.0 + 4.0 * delta))
    entry = K.abs().sum(dim=(2, 3)) * rel  # per-entry error bounds, (c_out, c_in)
    return blocks, up(frobenius_upper_bound(entry) * up(1.0 + 4.0 * UNIT_ROUNDOFF))


def _embed(M: torch.Tensor) -> torch.Tensor:
    """``[[X, -Y], [Y, X]]`` for ``M = X + i Y`` (batched): the same singular values (twice), and
    for Hermitian ``M`` the same eigenvalues; exactly symmetric when ``M`` is exactly Hermitian."""
    n, k = int(M.shape[-2]), int(M.shape[-1])
    out = torch.empty(*M.shape[:-2], 2 * n, 2 * k, dtype=torch.float64, device=M.device)
    out[..., :n, :k] = M.real
    out[..., n:, k:] = M.real
    out[..., :n, k:] = -M.imag
    out[..., n:, :k] = M.imag
    return out


def _fro_max(M: torch.Tensor) -> float:
    """A proved upper bound on the largest Frobenius norm in a batch (real or complex)."""
    flat = (torch.view_as_real(M.resolve_conj()) if M.is_complex() else M).reshape(*M.shape[:-2], -1)
    sq = flat.square().sum(dim=-1)  # |M_ij|^2 as re^2 + im^2 (no complex abs)
    k = int(M.shape[-1] * M.shape[-2]) * (2 if M.is_complex() else 1)
    return up(math.sqrt(inflate(float(sq.max()), k + 4))) if bool((sq > 0).any()) else 0.0


def _lmin_bounds(Hs: torch.Tensor, extra: float) -> tuple[float, float, float]:
    """``(lower, upper, computed)`` for ``min_w lmin(H_w)``, ``Hs`` a batch of exactly Hermitian
    ``c x c`` blocks with ``||H_w,true - H_w||_2 <= extra``. The shift comes from the complex
    eigenvalues (an estimate); the proof is one batched Cholesky of the real embeddings."""
    S = _embed(Hs)
    n = int(S.shape[-1])
    lams = torch.linalg.eigvalsh(Hs)[..., 0]
    lam = float(lams.min())
    scale = _fro_max(S) + float(S.diagonal(dim1=-2, dim2=-1).abs().sum(dim=-1).max())
    base = gamma(n + 2) * scale + UNDERFLOW_UNIT * n * n
    lb = shifted_lmin_lower(S, lam, base)  # one shift for every frequency, one batched Cholesky
    lo = down(lb - up(extra)) if lb is not None else -math.inf
    # upper: a Rayleigh quotient of the worst block (its minimum is >= the global one)
    hi = lmin_upper_bound(S[int(lams.argmin())], extra)
    return lo, hi, lam


def _norm_bound(M: torch.Tensor, extra: float) -> tuple[float, float]:
    """``(upper, computed)`` for ``max_w ||M_w||_2`` over a batch of complex ``k x n`` blocks,
    with ``||M_w,true - M_w|| <= extra``; capped by the largest Frobenius bound.

    ``G = fl(M^H M)``, symmetrized to be exactly Hermitian, is within ``gamma_{2k+3} 2 ||M||_F^2``
    of ``M^H M`` (each real or imaginary part is a sum of ``2k`` real products); its real
    embedding has the eigenvalues of ``G``, and one batched Cholesky of ``s I - embed(G)``
    proves ``lmax(M_w^H M_w) <= s + err`` for every block."""
    k, n = int(M.shape[-2]), int(M.shape[-1])
    fro = _fro_max(M)
    Gc = M.conj().transpose(-1, -2) @ M
    Gc = 0.5 * (Gc + Gc.conj().transpose(-1, -2))
    gram_err = up(gamma(2 * k + 3) * up(2.0 * up(fro * fro)))
    lam = float(torch.linalg.eigvalsh(Gc)[..., -1].max())
    computed = math.sqrt(max(lam, 0.0))
    G = _embed(Gc)
    n = 2 * n
    base = gamma(n + 2) * (float(G.diagonal(dim1=-2, dim2=-1).abs().sum(dim=-1).max()) + abs(lam))
    best = fro
    hi = shifted_lmax_upper(G, lam, base)  # lmax(G_w) <= hi for every block w
    if hi is not None:
        best = min(best, up(math.sqrt(up(max(hi, 0.0) + gram_err))))
    return up(best + up(extra)), computed


def conv_norm_bounds(
    kernel: torch.Tensor, image: tuple[int, int], extra: float = 0.0, strided: bool = False
) -> tuple[float, float]:
    """``(upper, computed)`` for the norm of the circular convolution by ``kernel`` (``c_out x
    c_in``, any odd size) on ``image``, or with ``strided=True`` of ``S o conv`` (every second row
    and column kept; ``image`` even), widened by ``extra`` (a proved bound on the distance in norm
    to the operator meant). The strided norm is exact through the polyphase identity
    (:mod:`monquant.operators.multitier`): ``||S o conv|| = max_w ||(1/2) [C^(w'_1) .. C^(w'_4)]||``
    over the four frequencies aliasing to each coarse ``w``; each block of that row errs by at most
    ``e``, so the row by at most ``(1/2) sqrt(4) e = e``."""
    co, ci = int(kernel.shape[0]), int(kernel.shape[1])
    if not strided:
        Kh, e = proved_blocks(kernel, image)
        return _norm_bound(Kh.reshape(-1, co, ci), up(e + extra))
    H, W = image
    if H % 2 or W % 2:
        raise ConfigError(f"a stride-2 convolution needs an even image, got {H}x{W}")
    Kh, e = proved_blocks(kernel, image, half=False)
    Z = Kh.reshape(2, H // 2, 2, W // 2, co, ci).permute(1, 3, 4, 0, 2, 5)
    Z = 0.5 * Z.reshape(-1, co, 4 * ci)  # halving is exact
    return _norm_bound(Z.conj().transpose(-1, -2), up(e + extra))


def conv_difference_bounds(
    Kt: torch.Tensor, K: torch.Tensor, image: tuple[int, int], strided: bool = False
) -> tuple[float, float]:
    """``(upper, computed)`` for ``||conv(Kt) - conv(K)||`` (``strided``: after ``S``) on
    ``image``. ``fl(Kt - K)`` errs by ``u |dK|`` entrywise, which is added to the block error."""
    dK = Kt.detach().to(torch.float64) - K.detach().to(torch.float64)
    e_sub = up(2.0 * UNIT_ROUNDOFF * frobenius_upper_bound(dK.abs().sum(dim=(2, 3))))
    return conv_norm_bounds(dK, image, e_sub, strided)


def conv_spectral_bounds(kernel: torch.Tensor, image: tuple[int, int], norm: bool = True) -> SpectralBounds:
    """Proved ``margin``, ``L`` and ``||W||`` bounds of the circular convolution by ``kernel`` on
    ``image`` (:class:`~monquant.verified.SpectralBounds`; the computed values beside them)."""
    image = check_kernel(kernel, image)
    Kh, e = proved_blocks(kernel, image)
    c = int(kernel.shape[0])
    eye = torch.eye(c, dtype=torch.complex128, device=Kh.device)
    Hs = (eye - 0.5 * (Kh + Kh.conj().transpose(-1, -2))).reshape(-1, c, c)  # exactly Hermitian
    # ||H_true - H|| <= e (half of E + E^H) + the rounding of the sum and of I - (., one each)
    form = up(2.0 * UNIT_ROUNDOFF * up(_fro_max(Kh) + _fro_max(Hs)))
    m_lo, m_hi, m = _lmin_bounds(Hs, up(e + form))
    IK = (eye - Kh).reshape(-1, c, c)
    L_hi, L = _norm_bound(IK, up(e + up(2.0 * UNIT_ROUNDOFF * _fro_max(IK))))
    if norm:
        norm_hi, norm_W = _norm_bound(Kh.reshape(-1, c, c), e)
    else:
        norm_hi, norm_W = math.nan, math.nan
    return SpectralBounds(m_lo=m_lo, m_hi=m_hi, L_hi=L_hi, norm_hi=norm_hi, m=m, L=L, norm_W=norm_W)


def certify_conv(
    kernel: torch.Tensor,
    image: tuple[int, int],
    bits: int | None = None,
    granularity: str = "per-tensor",
    kernel_tilde: torch.Tensor | None = None,
    step_rule: str = "paper",
    float_bounds: SpectralBounds | None = None,
) -> Certificate:
    """The certificate of quantizing the circular convolution by ``kernel`` (``c x c x kh x kw``,
    odd sizes, torch layout) on an ``H x W`` state: at ``bits`` with ``granularity`` (``per-channel``:
    one step per output channel, dim 0) and ``step_rule``, or for an explicit ``kernel_tilde``.
    Every tier is decided from bounds proved through the Fourier blocks; no dense matrix is
    formed and no solver runs."""
    image = check_kernel(kernel, image)
    K = kernel.detach().to(torch.float64)
    if kernel_tilde is None:
        if bits is None:
            raise ConfigError("certify_conv needs bits or kernel_tilde")
        q = quantize(kernel.detach(), bits, granularity, step_rule=step_rule)
        Kt = q.dequantized().to(torch.float64)
        step = float(q.step.max())
        w_max = float(q.w_max.max())
        entry = float(a_priori_entry_bound(q.step, q.w_max, kernel.dtype).max())
    else:
        check_kernel(kernel_tilde, image)
        Kt = kernel_tilde.detach().to(torch.float64)
        step = 2.0 * float((Kt - K).abs().max())
        w_max = float(K.abs().max())
        granularity = "explicit"
        entry = up(float((Kt - K).abs().max()) * up(1.0 + 2.0 * UNIT_ROUNDOFF))
    c, _, kh, kw = (int(s) for s in K.shape)
    st = float_bounds if float_bounds is not None else conv_spectral_bounds(K, image)
    st_q = conv_spectral_bounds(Kt, image, norm=False)
    dW_hi, dW = conv_difference_bounds(Kt, K, image)
    apb = up(kh * kw * c * entry)  # ||dW|| <= sum_taps ||dK_tap||_2 <= kh kw c max|dK|
    n = c * image[0] * image[1]
    return certificate_from_bounds(st, st_q, dW_hi, dW, apb, n=n, bits=bits if kernel_tilde is None else None,
                                   granularity=granularity, step=step, w_max=w_max,
                                   step_rule=step_rule if kernel_tilde is None else None)  # fmt: skip


def certify_conv_sweep(
    kernel: torch.Tensor,
    image: tuple[int, int],
    bits_list: list[int],
    granularity: str = "per-tensor",
    progress: bool = False,
    step_rule: str = "paper",
) -> list[Certificate]:
    """One :func:`certify_conv` certificate per bit-width (the float operator's bounds proved once)."""
    from monquant.progress import progress_bar

    st = conv_spectral_bounds(kernel, image)
    bar = progress_bar(bits_list, desc=f"certify {granularity}", enabled=progress, unit="bits")
    return [certify_conv(kernel, image, b, granularity, step_rule=step_rule, float_bounds=st)
            for b in bar]  # fmt: skip


def min_certified_bits_conv(
    kernel: torch.Tensor,
    image: tuple[int, int],
    granularity: str = "per-tensor",
    bits_range: range = range(2, 17),
    progress: bool = False,
    step_rule: str = "paper",
) -> dict[str, Any]:
    """The smallest bit-width each tier certifies for the circular convolution by ``kernel``
    (:func:`monquant.certify.min_bits_of` of :func:`certify_conv_sweep`)."""
    certs = certify_conv_sweep(kernel, image, list(bits_range), granularity, progress, step_rule)
    return min_bits_of(certs)
