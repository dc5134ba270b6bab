"""Verified floating-point bounds on the spectral quantities that certificates decide on.

A certificate is a proof about the matrices that are actually stored. Every function here returns a
bound that holds in exact real arithmetic for the matrix whose entries are the given floating-point
numbers (widened, where a caller says so, by a known spectral-norm distance ``extra``), although
the work is done in IEEE-754 double precision with round-to-nearest. The analysis is written out in
``docs/theory.md`` (section "Certificates in floating point"); in short:

- **Positive definiteness with a margin** (:func:`cholesky_lower_bound`). If the floating-point
  Cholesky factorization of ``A^ = fl(A - tau I)`` runs to completion with a finite factor ``R``,
  then ``R^T R = A^ + dA`` with ``|dA| <= gamma_{n+2} |R^T| |R|`` entrywise (Demmel 1989; Higham,
  *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 8.4 and Theorem 10.3: any order
  of summation, hence blocked LAPACK; one rounding more than Higham's ``gamma_{n+1}`` covers a
  division done as multiplication by a rounded reciprocal). With ``x_i = ||R e_i||`` Cauchy-Schwarz
  gives ``|R^T||R| <= x x^T`` and ``x_i^2 <= a^_ii / (1 - gamma)``, so
  ``||dA||_2 <= gamma / (1 - gamma) tr(A^)``. Since ``R^T R >= 0``,
  ``lmin(A) >= tau - gamma/(1-gamma) tr(A^) - u max_i |a^_ii| - (underflow term)``: Rump's idea
  ("Verification of positive definiteness", BIT 46 (2006) 433-452) with our own constants.
- **An upper bound on lmin** (:func:`lmin_upper_bound`): the Rayleigh quotient of a computed
  eigenvector ``v`` with the forward error of ``v^T (A v)`` bounded by ``gamma_{2n+1} |v|^T|A||v|``.
- **An upper bound on ||M||_2** (:func:`norm2_upper_bound`): ``sigma^2 I - fl(M^T M)`` verified
  positive definite, plus ``||fl(M^T M) - M^T M||_2 <= gamma_{k+1} ||M||_F^2``; the Frobenius norm
  (itself bounded above) is the fallback and a cap.

Scalars are combined with directed rounding: IEEE operations are correctly rounded, so stepping one
ulp outward (:func:`up`, :func:`down`) after each operation gives a rigorous bound. Sums of ``k``
non-negative terms computed in floating point are within a factor ``1 - gamma_{k}`` of the exact
sum (any order), which :func:`inflate` undoes. Underflow is covered by a generous absolute term
(``UNDERFLOW_UNIT`` per operation); overflow cannot go unnoticed (non-finite results fail the test).
Nothing here is an estimate: a failed verification yields ``-inf`` (or ``inf``), never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monquant.errors import MonquantError
from monquant.operators import SpectralStats
from monquant.operators.matrix import all_finite
from monquant.operators.spectral import lanczos_extremes

__all__ = [
    "UNIT_ROUNDOFF",
    "SpectralBounds",
    "VerificationError",
    "all_finite",
    "cholesky_lower_bound",
    "cholesky_lower_bounds",
    "difference_norm_bounds",
    "down",
    "extreme_eigenvalue_bounds",
    "frobenius_upper_bound",
    "gamma",
    "inflate",
    "lmin_lower_bound",
    "lmin_upper_bound",
    "margin_bounds",
    "margin_verdict",
    "modulus_upper_bound",
    "norm2_bounds",
    "norm2_upper_bound",
    "quantized_bounds",
    "shifted_lmax_upper",
    "shifted_lmin_lower",
    "spectral_bounds",
    "sym_part_bounds",
    "unit_roundoff",
    "up",
]

#: Unit roundoff ``u = 2^-53`` of IEEE double precision (round to nearest).
UNIT_ROUNDOFF = 2.0**-53
#: An absolute error per operation that dominates every underflow error (``2^-1074`` is the
#: smallest subnormal; this is 2^54 times larger and still far below any quantity of interest).
UNDERFLOW_UNIT = 2.0**-1020


class VerificationError(MonquantError, ValueError):
    """Input that no verified bound can be computed for (non-finite, not square, not float)."""


def up(x: float) -> float:
    """The next float above ``x``: an upper bound on the exact result ``x`` was rounded from."""
    return math.nextafter(x, math.inf)


def down(x: float) -> float:
    """The next float below ``x``: a lower bound on the exact result ``x`` was rounded from."""
    return math.nextafter(x, -math.inf)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of a floating-point dtype (half an ulp of 1)."""
    return float(torch.finfo(dtype).eps) / 2.0


def gamma(k: int) -> float:
    """Upper bound on Higham's ``gamma_k = k u / (1 - k u)`` (``u = 2^-53``); needs ``k u < 1/2``."""
    ku = k * UNIT_ROUNDOFF  # exact: an integer times a power of two
    if not ku < 0.5:
        raise VerificationError(f"problem too large for the error analysis (k = {k})")
    return up(ku / down(1.0 - ku))


def inflate(x: float, k: int) -> float:
    """Upper bound on an exact sum of non-negative terms whose floating-point value is ``x``.

    The computed sum of ``k`` non-negative terms (each possibly a rounded product) is at least
    ``(1 - gamma_k)`` times the exact one; ``1 / (1 - g) <= 1 + 2 g`` for ``g <= 1/2``.
    """
    if x <= 0.0:
        return max(x, 0.0) + UNDERFLOW_UNIT * (k + 1)
    return up(up(x * up(1.0 + 2.0 * gamma(k))) + UNDERFLOW_UNIT * (k + 1))


def _check_square(A: torch.Tensor, name: str, finite: bool = True) -> int:
    """``n`` of a square floating-point ``A``; with ``finite``, every entry is checked finite too
    (a caller passing ``False`` checks it through a reduction it computes anyway, and calls
    :func:`_check_finite` when that reduction is not finite)."""
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise VerificationError(f"{name} must be a square matrix")
    if not A.is_floating_point():
        raise VerificationError(f"{name} must be floating point, got {A.dtype}")
    if finite:
        _check_finite(A, name)
    return int(A.shape[0])


def _check_finite(A: torch.Tensor, name: str) -> None:
    if not all_finite(A):
        raise VerificationError(f"{name} has non-finite entries")


def _f64(A: torch.Tensor) -> torch.Tensor:
    """``A`` in float64 (exact for float16/bfloat16/float32/float64 inputs); ``A`` itself when it
    is a float64 tensor outside autograd (``detach`` would only make an alias of it)."""
    if A.dtype == torch.float64 and not A.requires_grad:
        return A
    return A.detach().to(torch.float64)


def frobenius_upper_bound(M: torch.Tensor) -> float:
    """Rigorous ``||M||_F`` upper bound (sum of ``k`` squares, then a correctly rounded sqrt)."""
    flat = _f64(M).reshape(-1)
    sq = float(torch.dot(flat, flat))  # a sum of k rounded squares, any order, no temporary
    if sq == 0.0 and not bool(flat.any()):
        return 0.0
    s = inflate(sq, flat.numel() + 1)
    return up(math.sqrt(s))


def cholesky_lower_bounds(A: torch.Tensor, tau: list[float], *, _owned: bool = False) -> list[float | None]:
    """Per matrix of a batch ``(b, n, n)``: the verified ``lmin(A_i) >= tau_i - err_i`` when the
    Cholesky factorization of ``fl(A_i - tau_i I)`` completes, else ``None``.

    Every ``A_i`` must be exactly symmetric (as stored). ``err_i = gamma_{n+2} / (1 - gamma_{n+2})
    tr(A^_i)`` (backward error of the factorization) ``+ u max|a^_ii|`` (rounding of the shift)
    plus an underflow term, each from matrix ``i`` alone; see the module docstring for the proof.
    All of them are factorized in one batched call. (``_owned``: ``A`` is a float64 temporary of
    the caller's that may be shifted in place.)
    """
    A64 = _f64(A)
    n = int(A64.shape[-1])
    Ash = A64 if _owned else A64.clone()
    diag = Ash.diagonal(dim1=-2, dim2=-1)
    diag.sub_(torch.tensor(tau, dtype=torch.float64, device=A64.device).unsqueeze(-1))
    R, info = torch.linalg.cholesky_ex(Ash)
    # one pass of reductions, one transfer: a finite sum of R proves a finite factor (a NaN or
    # inf entry would make it non-finite; a sum that is not finite is looked at entrywise), and
    # max |a^_ij| is max(max a^_ij, -min a^_ij) (two plain reductions; aminmax is slower)
    stats = torch.stack([info.to(torch.float64), R.sum(dim=(-2, -1)), diag.amin(dim=-1), diag.sum(dim=-1),
                         diag.amax(dim=-1), Ash.amax(dim=(-2, -1)), Ash.amin(dim=(-2, -1)).neg()],
                        dim=-1).tolist()  # fmt: skip
    g = gamma(n + 2)
    ratio = up(g / down(1.0 - g))
    out: list[float | None] = []
    for i, (t, (fail, rsum, dmin, tr, dmax, amax, amin_neg)) in enumerate(zip(tau, stats, strict=True)):
        ok = fail == 0 and dmin >= 0  # factorized, with a non-negative shifted diagonal
        if ok and not math.isfinite(rsum):
            ok = bool(torch.isfinite(R[i]).all())
        if not ok:  # not positive definite at this shift (or a non-finite factor): no bound
            out.append(None)
            continue
        amax = max(amax, amin_neg)
        chol_err = up(ratio * inflate(tr, n))
        shift_err = up(2.0 * UNIT_ROUNDOFF * dmax)
        uflow = up(UNDERFLOW_UNIT * up(4.0 * n * (n + 2) * up(1.0 + 3.0 * amax)))
        out.append(down(float(t) - up(up(chol_err + shift_err) + uflow)))
    return out


def cholesky_lower_bound(A: torch.Tensor, tau: float, *, _owned: bool = False) -> float | None:
    """Verified ``lmin(A) >= tau - err`` if Cholesky of ``fl(A - tau I)`` completes, else ``None``.

    ``A`` must be exactly symmetric (as stored); the error terms are those of
    :func:`cholesky_lower_bounds`. A batch ``(..., n, n)`` is verified in one batched factorization:
    the bound then holds for every matrix of the batch (the smallest of their bounds). (``_owned``:
    ``A`` is a temporary of the caller's that may be shifted in place.)
    """
    A64 = _f64(A)
    batch = A64.reshape(-1, *A64.shape[-2:])
    bounds = cholesky_lower_bounds(batch, [float(tau)] * int(batch.shape[0]), _owned=_owned)
    if any(b is None for b in bounds):
        return None
    return min(b for b in bounds if b is not None)


def shifted_lmin_lower(A: torch.Tensor, lam: float, base: float) -> float | None:
    """A proved lower bound on ``lmin(A)`` (every matrix of a batch) from the first of six
    shifts ``tau = lam - 4 * 16^k * base`` below the estimate ``lam`` that
    :func:`cholesky_lower_bound` verifies; ``None`` when none does."""
    for k in range(6):
        lb = cholesky_lower_bound(A, lam - base * 4.0 * 16.0**k)
        if lb is not None:
            return lb
    return None


def shifted_lmax_upper(G: torch.Tensor, lam: float, base: float) -> float | None:
    """A proved upper bound on ``lmax(G)`` (every matrix of a batch) from the first of six
    shifts ``s = lam + 4 * 16^k * base`` above the estimate ``lam`` for which ``s I - G`` is
    verified positive definite; ``None`` when none is."""
    for k in range(6):
        s = lam + base * 4.0 * 16.0**k + UNDERFLOW_UNIT
        lb = cholesky_lower_bound(-G, -s, _owned=True)  # lmin(-G) >= lb  <=>  lmax(G) <= -lb
        if lb is not None:
            return -lb
    return None


#: Matrix sizes from which :func:`extreme_eigenvalue_bounds` estimates ``lmax`` (key ``True``)
#: or ``lmin`` (``False``) by the Lanczos process instead of a full ``eigvalsh`` (one thread,
#: ``benchmarks/certify_speed.py``: Gram matrices' top ends settle in a few dozen steps, the
#: symmetric parts' bottom ends take a few times more).
LANCZOS_FROM = {True: 300, False: 1000}


def _shift_units(A: torch.Tensor, lam: list[float], largest: list[bool]) -> list[float]:
    """Per matrix of a batch: the unit of the shifts placed around its estimate ``lam``; it only
    sizes the shifts, never a bound. Above an estimate of ``lmax`` (``largest``): ``gamma_{n+2}``
    times ``sum |a_ii| + |lam|``; below one of ``lmin``: ``gamma_{n+2}`` times
    ``sum |a_ii - lam| + ||A||_F``, plus an underflow term."""
    n = int(A.shape[-1])
    centre = torch.tensor([0.0 if big else lm for lm, big in zip(lam, largest, strict=True)],
                          dtype=torch.float64, device=A.device)  # fmt: skip
    dev = (A.diagonal(dim1=-2, dim2=-1) - centre.unsqueeze(-1)).abs_().sum(dim=-1)
    terms = torch.stack([dev, torch.linalg.matrix_norm(A)], dim=-1).tolist()
    g = gamma(n + 2)
    return [g * (d + abs(lm)) if big else g * (d + f) + UNDERFLOW_UNIT * n * n
            for (d, f), lm, big in zip(terms, lam, largest, strict=True)]  # fmt: skip


def _estimates(
    A: torch.Tensor, largest: list[bool], lanczos_ok: bool = True
) -> tuple[list[float], list[bool]]:
    """Estimates of each matrix's extreme eigenvalue and whether it came from the Lanczos process
    (:func:`~monquant.operators.spectral.lanczos_extremes`, asked to settle within a tolerance
    below the first shift's unit) rather than from ``eigvalsh``, which serves every matrix that is
    too small for Lanczos (or all of them when not ``lanczos_ok``) or on which it did not settle."""
    b, n = int(A.shape[0]), int(A.shape[-1])
    lam: list[float] = [math.nan] * b
    lanczos = [False] * b
    for big in (True, False):
        rows = [i for i in range(b) if largest[i] == big]
        if not rows or not lanczos_ok or n < LANCZOS_FROM[big]:
            continue
        sub = A[rows[0] : rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else A[rows]
        # tolerances at most the shift units of _shift_units, whatever the estimate
        unit = sub.diagonal(dim1=-2, dim2=-1).abs().sum(dim=-1) if big else torch.linalg.matrix_norm(sub)
        est, ok = lanczos_extremes(sub, [big] * len(rows), (gamma(n + 2) * unit).tolist())
        for i, e, settled in zip(rows, est, ok, strict=True):
            if settled:
                lam[i], lanczos[i] = e, True
    rest = [i for i in range(b) if not lanczos[i]]
    if rest:
        vals = torch.linalg.eigvalsh(A if len(rest) == b else A[rest])
        ends = torch.stack([vals[:, 0], vals[:, -1]], dim=-1).tolist()
        for i, (lo, hi) in zip(rest, ends, strict=True):
            lam[i] = hi if largest[i] else lo
    return lam, lanczos


def extreme_eigenvalue_bounds(
    mats: list[torch.Tensor], largest: list[bool]
) -> list[tuple[float | None, float]]:
    """For each exactly symmetric float64 matrix of one size: ``(bound, estimate)`` where
    ``bound`` is a proved lower bound on ``lmin`` (``largest`` false) or a proved upper bound on
    ``lmax`` (``largest`` true), ``None`` when no shift verifies, and ``estimate`` the computed
    eigenvalue (never decisive).

    The same proofs as :func:`lmin_lower_bound` and :func:`shifted_lmax_upper`, with the work
    shared: the estimates come from one batched ``eigvalsh``, or for large matrices from the
    Lanczos process (:data:`LANCZOS_FROM`), one batched Cholesky (:func:`cholesky_lower_bounds`)
    verifies every first shift, and only a matrix whose first shift fails goes on alone: with an
    ``eigvalsh`` estimate if its estimate was Lanczos's (which can miss the extreme eigenvalue),
    then up the ladder of wider shifts.
    """
    A = torch.stack(mats)
    lam_l, lanczos = _estimates(A, largest)
    base_l = _shift_units(A, lam_l, largest)
    # lmin(A) >= tau - err;  lmax(G) <= s  <=>  lmin(-G) >= -s
    tau = [-(lm + 4.0 * b + UNDERFLOW_UNIT) if big else lm - 4.0 * b
           for lm, b, big in zip(lam_l, base_l, largest, strict=True)]  # fmt: skip
    for i, big in enumerate(largest):
        if big:
            A[i].neg_()
    first = cholesky_lower_bounds(A, tau, _owned=True)
    out: list[tuple[float | None, float]] = []
    for i, (lb, big) in enumerate(zip(first, largest, strict=True)):
        if lb is not None:
            out.append((-lb if big else lb, lam_l[i]))
            continue
        M = mats[i]  # the first shift did not verify: this matrix alone
        lm, b = lam_l[i], base_l[i]
        if lanczos[i]:  # Lanczos may have missed the extreme eigenvalue: eigvalsh's estimate
            lm = _estimates(M[None], [big], lanczos_ok=False)[0][0]
            b = _shift_units(M[None], [lm], [big])[0]
        bound = (shifted_lmax_upper if big else shifted_lmin_lower)(M, lm, b)
        out.append((bound, lm))
    return out


def lmin_lower_bound(A: torch.Tensor, extra: float = 0.0, estimate: float | None = None) -> float:
    """Rigorous lower bound on ``lmin(A_true)`` for symmetric ``A`` with ``||A_true - A||_2 <= extra``.

    Shifts ``tau`` just below the computed smallest eigenvalue and verifies ``A - tau I`` positive
    definite (:func:`cholesky_lower_bound`), widening the shift up to six times. ``-inf`` when no
    shift verifies (the bound is then useless, never wrong).
    """
    _check_square(A, "A")
    A64 = _f64(A)
    if estimate is None:
        lb = extreme_eigenvalue_bounds([A64], [False])[0][0]
    else:
        lam = float(estimate)
        lb = shifted_lmin_lower(A64, lam, _shift_units(A64[None], [lam], [False])[0])
    return down(lb - up(extra)) if lb is not None else -math.inf


def _inverse_iteration(A64: torch.Tensor, lam: float, steps: int = 2) -> torch.Tensor | None:
    """An approximate eigenvector of the eigenvalue of ``A64`` nearest ``lam`` (just below it):
    ``steps`` solves with ``A - sigma I``, ``sigma = lam - 1e-10 (|lam| + ||A||_F)`` (one LU
    factorization each, instead of a full eigendecomposition). ``None`` if a solve breaks down.
    Only the quality of the Rayleigh bound depends on it, never its validity."""
    n = int(A64.shape[0])
    sigma = lam - 1e-10 * (abs(lam) + float(torch.linalg.matrix_norm(A64)))
    M = A64 - sigma * torch.eye(n, dtype=A64.dtype, device=A64.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(A64.device)
    for _ in range(steps):
        x, info = torch.linalg.solve_ex(M, v)
        nrm = float(torch.linalg.vector_norm(x))
        if int(info) != 0 or not math.isfinite(nrm) or nrm == 0.0:
            return None
        v = x / nrm
    return v


def lmin_upper_bound(
    A: torch.Tensor, extra: float = 0.0, v: torch.Tensor | None = None, estimate: float | None = None
) -> float:
    """Rigorous upper bound on ``lmin(A_true)``: a Rayleigh quotient with its rounding error.

    ``lmin(A_true) <= v^T A_true v / v^T v`` for every ``v != 0``; ``v`` defaults to an
    eigenvector of the smallest eigenvalue: by inverse iteration from a computed ``estimate`` of it
    when one is given (two LU solves), else (or if that breaks down) from a full ``eigh``.
    ``fl(v^T fl(A v))`` is within ``gamma_{2n+1} |v|^T|A||v|`` of ``v^T A v`` and
    ``|v^T (A_true - A) v| <= extra v^T v``.
    """
    n = _check_square(A, "A")
    A64 = _f64(A)
    if v is None and estimate is not None:
        v = _inverse_iteration(A64, float(estimate))
    if v is None:
        v = torch.linalg.eigh(A64)[1][:, 0]
    v = v.to(torch.float64)
    num = float(v @ (A64 @ v))
    va = v.abs()
    t = inflate(float(va @ (A64.abs() @ va)), 2 * n)
    err = up(gamma(2 * n + 1) * t)
    den = float(v @ v)
    if not den > 0:
        return math.inf
    g = gamma(n)
    den_lo, den_hi = down(den * down(1.0 - 2.0 * g)), up(den * up(1.0 + 2.0 * g))
    num_hi = up(up(num + err) + up(float(extra) * den_hi))
    return up(num_hi / den_lo) if num_hi >= 0 else up(num_hi / den_hi)


def _gram(M: torch.Tensor, extra: float, rounded: bool) -> tuple[torch.Tensor | None, float, float, float]:
    """``(G, gram_err, F, extra)`` of :func:`norm2_bounds`: the symmetrized ``fl(M^T M)`` (``None``
    when ``M = 0`` or has no columns), ``gram_err >= ||G - M^T M||_2``, the Frobenius bound ``F``
    and ``extra`` with the rounding of ``M`` itself added when ``rounded``."""
    if not isinstance(M, torch.Tensor) or M.dim() != 2 or not M.is_floating_point():
        raise VerificationError("M must be a floating-point matrix")
    M64 = _f64(M)
    F = frobenius_upper_bound(M64)  # finite only if every entry is: the entrywise test is for the rest
    if not math.isfinite(F):
        _check_finite(M64, "M")
    if rounded:
        e_round = up(2.0 * UNIT_ROUNDOFF * F)
        extra = up(float(extra) + e_round) if extra else e_round
    if not (F > 0 and M64.shape[1] > 0 and F < math.inf):  # 0, no columns, or M^T M overflows
        return None, 0.0, F, float(extra)
    G = M64.T @ M64
    G = torch.add(G, G.T).mul_(0.5)
    return G, up(gamma(int(M64.shape[0]) + 1) * up(F * F)), F, float(extra)


def _norm_from(hi: float | None, lam: float, gram_err: float, F: float, extra: float) -> tuple[float, float]:
    """``(upper, computed)`` of :func:`norm2_bounds` from a proved ``lmax(G) <= hi``."""
    best = F
    if hi is not None:
        best = min(best, up(math.sqrt(up(max(hi, 0.0) + gram_err))))
    return (up(best + up(extra)) if extra else best), math.sqrt(max(lam, 0.0))


def norm2_bounds(
    M: torch.Tensor, extra: float = 0.0, rounded: bool = False
) -> tuple[float, float]:
    """``(upper, computed)``: a rigorous bound on ``||M_true||_2`` and the computed value.

    ``M_true`` is any matrix with ``||M_true - M||_2 <= extra``; ``rounded=True`` says that ``M``
    itself is the correctly rounded result of one operation per entry (``fl(I - W)``,
    ``fl(A - B)``), which adds ``2 u ||M||_F`` to ``extra`` (``|error| <= u |M|`` entrywise, with
    room for the ``(1 + u)``), from the Frobenius bound computed here anyway. Verifies
    ``sigma^2 I - fl(M^T M)`` positive definite for ``sigma`` just above the computed largest
    singular value (``computed`` = ``sqrt(lmax(fl(M^T M)))``, an estimate);
    ``||fl(M^T M) - M^T M||_2 <= gamma_{k+1} ||M||_F^2`` (``k`` rows; the symmetrization costs one
    more rounding). Capped by (and falling back to) the Frobenius bound, which is also the answer
    (``inf``, nothing proved) when ``||M||_F^2`` overflows.
    """
    G, gram_err, F, extra = _gram(M, extra, rounded)
    if G is None:
        return _norm_from(None, 0.0, gram_err, F, extra)
    hi, lam = extreme_eigenvalue_bounds([G], [True])[0]
    return _norm_from(hi, lam, gram_err, F, extra)


def norm2_upper_bound(M: torch.Tensor, extra: float = 0.0) -> float:
    """Rigorous upper bound on ``||M_true||_2`` (see :func:`norm2_bounds`)."""
    return norm2_bounds(M, extra)[0]


def _difference(A: torch.Tensor, B: torch.Tensor, radius: float) -> tuple[torch.Tensor, float]:
    """``fl(A - B)`` in float64 and the ``extra`` of its entrywise uncertainty ``radius`` of ``A``."""
    D = _f64(A) - _f64(B)
    extra = up(math.sqrt(D.numel()) * float(radius) * up(1.0 + 4 * UNIT_ROUNDOFF)) if radius else 0.0
    return D, extra


def difference_norm_bounds(A: torch.Tensor, B: torch.Tensor, radius: float = 0.0) -> tuple[float, float]:
    """``(upper, computed)`` for ``||A - B||_2`` of two stored matrices (e.g. ``||W~ - W||``).

    ``fl(A - B)`` errs by at most ``u |fl(A - B)|`` entrywise, i.e. ``u ||fl(A - B)||_F`` in norm;
    ``radius`` (an entrywise uncertainty of ``A``) adds ``sqrt(rows cols) radius``.
    """
    D, extra = _difference(A, B, radius)
    return norm2_bounds(D, extra, rounded=True)


def sym_part_bounds(W: torch.Tensor, radius: float = 0.0) -> tuple[torch.Tensor, float]:
    """``S = fl(sym(I - W))`` in float64 (exactly symmetric) and ``e >= ||sym(I - W) - S||_2``.

    Rounding: ``T = fl(W + W^T)`` errs by ``u |T|``, halving is exact (up to underflow) and
    ``fl(I - T/2)`` errs by ``u |S|``; the error matrix is symmetric and non-negative-bounded, so its
    spectral norm is at most its largest row sum. ``radius`` is an entrywise bound on
    ``|W_true - W|`` (``0`` when ``W`` holds the operator's exact entries); it adds ``n radius``.
    """
    return _sym_part(_f64(W), _check_square(W, "W"), radius)


def _sym_part(W64: torch.Tensor, n: int, radius: float) -> tuple[torch.Tensor, float]:
    """:func:`sym_part_bounds` of a float64 ``W`` checked square; a non-finite entry shows as a
    non-finite ``e``."""
    H = torch.add(W64, W64.T).mul_(0.5)
    S = H.neg()
    S.diagonal().add_(1.0)  # fl(1 - h_ii) on the diagonal, -h_ij (exact) off it: fl(I - H)
    rows = float(H.abs_().add_(S.abs()).sum(dim=1).max())
    e = up(up(UNIT_ROUNDOFF * inflate(rows, n + 1)) + UNDERFLOW_UNIT * 2 * n)
    if radius:
        e = up(e + up(n * float(radius)))
    return S, e


def margin_bounds(
    W: torch.Tensor, radius: float = 0.0, upper: bool | None = None
) -> tuple[float, float, float]:
    """``(lower, upper, computed)`` for ``margin(W) = lmin(sym(I - W))`` of the stored ``W``.

    ``lower <= margin(W) <= upper`` is proved; ``computed`` is the plain float64 eigenvalue (an
    estimate, shown but never decisive). The Rayleigh-quotient upper bound needs an eigenvector; by
    default (``upper=None``) it is computed only when the lower bound does not already certify
    ``margin > 0``, otherwise ``upper`` is the cheap bound ``min_i S_ii + e``.
    """
    S, e = sym_part_bounds(W, radius)
    return _margin_from(S, e, extreme_eigenvalue_bounds([S], [False])[0], upper)


def _margin_from(
    S: torch.Tensor, e: float, proved: tuple[float | None, float], upper: bool | None = None
) -> tuple[float, float, float]:
    """:func:`margin_bounds` from ``S = fl(sym(I - W))``, its error ``e`` and the proved
    ``(lmin(S) >= lb, estimate)`` of :func:`extreme_eigenvalue_bounds`."""
    lb, lam = proved
    lo = down(lb - up(e)) if lb is not None else -math.inf
    if upper or (upper is None and not lo > 0):
        hi = lmin_upper_bound(S, e, estimate=lam)
    else:
        hi = up(float(S.diagonal().min()) + up(e))  # Rayleigh quotient of a unit vector
    return lo, hi, lam


def margin_verdict(lower: float, upper: float) -> str:
    """The three-valued verdict of proved bounds ``lower <= margin <= upper``.

    ``certified`` when ``lower > 0``, ``refuted`` when ``upper < 0``, otherwise ``undecided``
    (the margin is within rounding error of 0).
    """
    if lower > 0:
        return "certified"
    if upper < 0:
        return "refuted"
    return "undecided"


def modulus_upper_bound(method: str, step: float, m_lo: float, L_hi: float) -> float | None:
    """Rigorous upper bound (< 1) on a splitting method's contraction modulus, or ``None``.

    Uses that the FB modulus ``sqrt(1 - 2 a m + a^2 L^2)`` and the PR modulus
    ``sqrt(1 - 4 a m / (1 + a L)^2)`` decrease in ``m`` and increase in ``L``: plugging the verified
    ``m_lo <= m`` and ``L_hi >= L`` bounds the true modulus; every operation is rounded outward.
    DR: ``(1 + rho_PR) / 2``. ``None`` when the bound is not below 1 (nothing is certified).
    """
    a = float(step)
    if not (m_lo > 0 and a > 0 and math.isfinite(L_hi) and math.isfinite(a)):
        return None
    if method == "fb":
        pos = up(up(a * L_hi) * up(a * L_hi))
        neg = down(2.0 * down(a * m_lo))
        r2 = up(up(1.0 + pos) - neg)
    elif method in ("pr", "dr"):
        one_al = up(1.0 + up(a * L_hi))
        frac = down(down(4.0 * down(a * m_lo)) / up(one_al * one_al))
        r2 = up(1.0 - frac)
    else:
        raise VerificationError(f"unknown method {method!r}")
    rho = up(math.sqrt(max(r2, 0.0)))
    if method == "dr":
        rho = up(0.5 * up(1.0 + rho))
    return rho if rho < 1.0 else None


@dataclass(frozen=True)
class SpectralBounds:
    """Verified bounds on the spectral constants of one stored operator ``W``.

    ``m_lo <= margin(W) <= m_hi``, ``L(W) = ||I - W|| <= L_hi``, ``||W|| <= norm_hi`` hold in exact
    arithmetic; ``m``, ``L``, ``norm_W`` are the float64 computed values (estimates, for display).
    """

    m_lo: float
    m_hi: float
    L_hi: float
    norm_hi: float
    m: float
    L: float
    norm_W: float

    @property
    def monotone(self) -> bool:
        """Proved strongly monotone: ``margin(W) >= m_lo > 0``."""
        return self.m_lo > 0

    @property
    def verdict(self) -> str:
        """``certified`` (margin provably > 0), ``refuted`` (provably < 0) or ``undecided``."""
        return margin_verdict(self.m_lo, self.m_hi)

    @property
    def kappa_hi(self) -> float:
        """Upper bound on ``kappa = L / m`` (``inf`` unless proved monotone)."""
        return up(self.L_hi / self.m_lo) if self.m_lo > 0 else math.inf

    def conservative(self) -> SpectralStats:
        """``SpectralStats`` holding the proved ``m_lo``, ``L_hi``, ``norm_hi``.

        Every modulus formula decreases in ``m`` and increases in ``L``, so a solver given these
        constants reports moduli and a-posteriori errors that rest on proved bounds (up to the
        rounding of those formulas).
        """
        return SpectralStats(m=self.m_lo, L=self.L_hi, norm_W=self.norm_hi)

    def as_dict(self) -> dict[str, float | str]:
        return {
            "m": self.m,
            "L": self.L,
            "norm_W": self.norm_W,
            "m_lower": self.m_lo,
            "m_upper": self.m_hi,
            "L_upper": self.L_hi,
            "norm_W_upper": self.norm_hi,
            "verdict": self.verdict,
        }


def spectral_bounds(W: torch.Tensor, radius: float = 0.0, norm: bool = True) -> SpectralBounds:
    """Verified ``m``, ``L`` and ``||W||`` bounds of the stored ``W`` (see :class:`SpectralBounds`).

    ``radius`` is an entrywise bound on ``|W_true - W|`` when the stored entries are themselves
    rounded values of the operator (``0``: ``W`` is the operator). ``norm=False`` skips ``||W||``
    (reported as ``nan``) when only ``m`` and ``L`` are needed. The symmetric part and the Gram
    matrices share one batched eigenvalue computation and one batched Cholesky
    (:func:`extreme_eigenvalue_bounds`).
    """
    return _joint_bounds(W, radius, norm)[0]


def quantized_bounds(
    W_tilde: torch.Tensor, W: torch.Tensor, radius: float = 0.0
) -> tuple[SpectralBounds, float, float]:
    """The bounds a certificate needs of a quantized ``W~`` beside its float ``W``, in one batch:
    ``spectral_bounds(W~, radius, norm=False)`` and ``(upper, computed)`` of ``||W~ - W||_2``
    (:func:`difference_norm_bounds`; ``radius`` is ``W~``'s entrywise uncertainty)."""
    st, dW = _joint_bounds(W_tilde, radius, False, versus=W)
    assert dW is not None
    return st, dW[0], dW[1]


def _joint_bounds(
    W: torch.Tensor, radius: float, norm: bool, versus: torch.Tensor | None = None
) -> tuple[SpectralBounds, tuple[float, float] | None]:
    """``spectral_bounds`` of ``W`` and, with ``versus``, the bounds of ``||W - versus||``: every
    symmetric matrix involved (``sym(I - W)`` and the Gram matrices of ``I - W``, ``W``,
    ``W - versus``) verified together."""
    n = _check_square(W, "W", finite=False)
    W64 = _f64(W)
    S, e = _sym_part(W64, n, radius)
    if not math.isfinite(e):  # finite for every finite W (but one whose W + W^T overflows)
        _check_finite(W64, "W")
    IW = W64.neg()
    IW.diagonal().add_(1.0)  # fl(I - W)
    e_rad = up(n * float(radius)) if radius else 0.0
    grams = [_gram(IW, e_rad, True)]  # fl(I - W) is one rounding per entry
    if norm:
        grams.append(_gram(W64, e_rad, False))
    if versus is not None:
        if tuple(versus.shape) != tuple(W.shape):
            raise VerificationError(f"shapes differ: {tuple(W.shape)} and {tuple(versus.shape)}")
        _check_square(versus, "versus", finite=False)
        D, extra = _difference(W64, versus, radius)
        try:  # a non-finite difference is versus's fault unless W - versus overflowed
            grams.append(_gram(D, extra, True))
        except VerificationError:
            _check_finite(versus, "versus")
            raise
    mats = [S] + [G for G, *_ in grams if G is not None]
    proved = iter(extreme_eigenvalue_bounds(mats, [False] + [True] * (len(mats) - 1)))
    lo, hi, lam = _margin_from(S, e, next(proved))
    norms = []
    for G, gram_err, F, extra in grams:
        bound, est = next(proved) if G is not None else (None, 0.0)
        norms.append(_norm_from(bound, est, gram_err, F, extra))
    L_hi, L = norms[0]
    norm_hi, norm_W = norms[1] if norm else (math.nan, math.nan)
    st = SpectralBounds(m_lo=lo, m_hi=hi, L_hi=L_hi, norm_hi=norm_hi, m=lam, L=L, norm_W=norm_W)
    return st, (norms[-1] if versus is not None else None)
