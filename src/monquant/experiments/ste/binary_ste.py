"""Binary two-layer network trained with the straight-through estimator (Jeong, Xin, Yin).

The model, data, loss and STE coarse gradient of the finite-sample STE study,
and the vectorized latent iteration ``u_{t+1} = u_t - eta g(sign(u_t))`` over a batch of
independent trials. The experiment driver is :mod:`monquant.experiments.ste.study`; the
details of the arithmetic (exact grid for Z, incremental updates) are documented there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from monquant.errors import ConfigError
from monquant.quant.ste import binary_sign, ste_sign

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_NS",
    "DEFAULT_RATIOS",
    "QUICK_RATIOS",
    "STEProblem",
    "STETrainResult",
    "Surrogate",
    "default_step_size",
    "grid_bits",
    "loss",
    "population_gradient",
    "preactivations",
    "residuals",
    "sample_problems",
    "ste_gradient",
    "ste_train",
    "surrogate_loss",
]


Surrogate = Literal["identity", "relu"]

DEFAULT_NS: tuple[int, ...] = (10, 20, 40, 80, 160)
#: Grid of ``N / n`` for the recovery curves: 2^(k/2), k = -2..8 (0.5 n .. 16 n).
DEFAULT_RATIOS: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-2, 9))
QUICK_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
Z_CLIP = 8.0
DEFAULT_CHUNK_BYTES = 2**29  # 512 MiB of Z per chunk of trials; peak stays well under 2 GB


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass
class STEProblem:
    """A batch of ``B`` independent planted problems (the leading dimension is the trial).

    Attributes: ``Zc`` (B, n, N, m) column-first inputs; ``v`` (B, m); ``w_star`` (B, n) in
    {+-1}; ``xi`` (B, N) label noise; ``y`` (B, N) labels; ``act_star`` (B, N, m) the teacher's
    activations ``s(Z_i w*)``; ``A`` (B, n, N) with ``A[b, :, i] = Z_i^T v``; ``u0`` (B, n)
    float64 initial latent weights; ``sigma`` (B,) noise standard deviations.
    """

    Zc: torch.Tensor
    v: torch.Tensor
    w_star: torch.Tensor
    xi: torch.Tensor
    y: torch.Tensor
    act_star: torch.Tensor
    A: torch.Tensor
    u0: torch.Tensor
    sigma: torch.Tensor

    @property
    def trials(self) -> int:
        """Number of independent trials ``B``."""
        return self.Zc.shape[0]

    @property
    def n(self) -> int:
        """Input dimension (number of binary weights)."""
        return self.Zc.shape[1]

    @property
    def N(self) -> int:
        """Number of samples per trial."""
        return self.Zc.shape[2]

    @property
    def m(self) -> int:
        """Number of hidden units."""
        return self.Zc.shape[3]

    @property
    def Z(self) -> torch.Tensor:
        """The inputs as a ``(B, N, m, n)`` view (``Z[b, i]`` is the matrix ``Z_i``)."""
        return self.Zc.permute(0, 2, 3, 1)


def grid_bits(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Fraction bits ``f`` of the dyadic grid that makes ``Z w`` exact in ``dtype``.

    Every partial sum met while computing or incrementally updating ``Z w`` is a sum of at most
    ``3n`` terms ``+-z`` or ``+-2z`` with ``|z| <= 8``, a multiple of ``2^-f`` bounded by
    ``4 n 8``; it is exact when that bound is below ``2^(p - f)`` (``p`` mantissa bits).
    """
    p = 1 - round(math.log2(torch.finfo(dtype).eps))
    f = math.floor(p - math.log2(4.0 * n * Z_CLIP))
    if f < 4:
        raise ConfigError(f"n = {n} is too large for exact binary matvecs in {dtype}")
    return f


def _fill_gaussian_grid(out: torch.Tensor, bits: int, generator: torch.Generator) -> None:
    """Fill ``out`` in place with N(0, 1) draws, clipped to ``[-8, 8]``, rounded to ``2^-bits``."""
    out.normal_(generator=generator)
    out.clamp_(-Z_CLIP, Z_CLIP).mul_(2.0**bits).round_().mul_(2.0**-bits)


def _preact(Zc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h[b, i] = Z_i w_b`` as a ``(B, N, m)`` tensor (exact for binary ``w`` on the grid)."""
    B, n, N, m = Zc.shape
    return torch.bmm(w.to(Zc.dtype).unsqueeze(1), Zc.reshape(B, n, N * m)).view(B, N, m)


def sample_problems(
    n: int,
    N: int,
    trials: int,
    *,
    m: int = 32,
    sigma_frac: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> STEProblem:
    """Draw ``trials`` independent planted problems.

    Per trial, in this order from ``generator``: Z (column-first), ``v ~ N(0, I_m)``,
    ``w* ~ Unif{+-1}^n``, ``u_0 ~ N(0, I_n)`` (float64) and ``xi ~ N(0, sigma^2 I_N)`` with
    ``sigma = sigma_frac * ||v|| / 2``. ``||v|| / 2`` is the standard deviation of the clean label
    ``v^T s(Z w*)``: its hidden units are independent Bernoulli(1/2), so its variance is
    ``sum_j v_j^2 / 4``. Drawing trial by trial makes a batch of ``a + b`` trials identical to a
    batch of ``a`` followed by a batch of ``b`` from the same generator.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    bits = grid_bits(n, dtype)
    Zc = torch.empty(trials, n, N, m, dtype=dtype)
    v = torch.empty(trials, m, dtype=dtype)
    w_star = torch.empty(trials, n, dtype=dtype)
    u0 = torch.empty(trials, n, dtype=torch.float64)
    xi = torch.empty(trials, N, dtype=dtype)
    for b in range(trials):
        _fill_gaussian_grid(Zc[b], bits, gen)
        v[b] = torch.randn(m, generator=gen, dtype=dtype)
        w_star[b] = binary_sign(torch.rand(n, generator=gen, dtype=torch.float64) - 0.5)
        u0[b] = torch.randn(n, generator=gen, dtype=torch.float64)
        xi[b] = torch.randn(N, generator=gen, dtype=dtype)
    sigma = sigma_frac * v.double().norm(dim=-1) / 2.0
    xi.mul_(sigma.to(dtype).unsqueeze(-1))
    act_star = _preact(Zc, w_star) > 0
    y = torch.bmm(act_star.to(dtype), v.unsqueeze(-1)).squeeze(-1) + xi
    A = torch.bmm(Zc.reshape(trials, n * N, m), v.unsqueeze(-1)).view(trials, n, N)
    return STEProblem(
        Zc=Zc, v=v, w_star=w_star, xi=xi, y=y, act_star=act_star, A=A, u0=u0, sigma=sigma
    )


# --------------------------------------------------------------------------------------------
# Loss and gradients (closed forms)
# --------------------------------------------------------------------------------------------


def _residuals_from(
    h: torch.Tensor, act_star: torch.Tensor, v: torch.Tensor, xi: torch.Tensor
) -> torch.Tensor:
    """``r_i = v^T (s(h_i) - s(Z_i w*)) - xi_i`` for pre-activations ``h`` of shape (B, N, m).

    ``act_star`` may be boolean or already in ``h.dtype`` (the trainer converts it once).
    """
    diff = (h > 0).to(h.dtype)
    diff -= act_star if act_star.dtype == h.dtype else act_star.to(h.dtype)
    return torch.bmm(diff, v.unsqueeze(-1)).squeeze(-1).sub_(xi)


def preactivations(problem: STEProblem, w: torch.Tensor) -> torch.Tensor:
    """Pre-activations ``Z_i w`` of every sample, shape ``(B, N, m)``; ``w`` has shape (B, n)."""
    return _preact(problem.Zc, w)


def residuals(problem: STEProblem, w: torch.Tensor) -> torch.Tensor:
    """Residuals ``r_i(w) = v^T s(Z_i w) - y_i``, shape ``(B, N)``, for binary ``w`` (B, n)."""
    return _residuals_from(_preact(problem.Zc, w), problem.act_star, problem.v, problem.xi)


def loss(problem: STEProblem, w: torch.Tensor) -> torch.Tensor:
    """Training loss ``L(w) = (1/2N) sum_i r_i(w)^2`` per trial, shape ``(B,)``, in float64."""
    r = residuals(problem, w).double()
    return 0.5 * r.pow(2).mean(dim=-1)


def _surrogate_constant(surrogate: Surrogate) -> float:
    """``c`` in ``E g = c ||v||^2 (w - w*) / sqrt(2 pi n)``: 1 (identity) or 1/2 (ReLU)."""
    if surrogate == "identity":
        return 1.0
    if surrogate == "relu":
        return 0.5
    raise ConfigError(f"unknown surrogate {surrogate!r}; use 'identity' or 'relu'")


def _gradient_from(
    r: torch.Tensor,
    h: torch.Tensor,
    A: torch.Tensor,
    Zc: torch.Tensor,
    v: torch.Tensor,
    surrogate: Surrogate,
) -> torch.Tensor:
    """STE gradient from residuals ``r`` (B, N) and pre-activations ``h`` (B, N, m)."""
    B, N = r.shape
    if surrogate == "identity":
        return torch.bmm(A, r.unsqueeze(-1)).squeeze(-1) / N
    _surrogate_constant(surrogate)
    q = r.unsqueeze(-1) * v.unsqueeze(1) * (h > 0).to(h.dtype)
    n, m = Zc.shape[1], Zc.shape[3]
    return torch.bmm(Zc.reshape(B, n, N * m), q.reshape(B, N * m, 1)).squeeze(-1) / N


def ste_gradient(
    problem: STEProblem, w: torch.Tensor, surrogate: Surrogate = "identity"
) -> torch.Tensor:
    """Closed-form STE coarse gradient at binary ``w`` (B, n); returns (B, n).

    identity: ``g = (1/N) sum_i r_i Z_i^T v``; relu: ``g = (1/N) sum_i r_i Z_i^T (v o s(Z_i w))``.
    """
    h = _preact(problem.Zc, w)
    r = _residuals_from(h, problem.act_star, problem.v, problem.xi)
    return _gradient_from(r, h, problem.A, problem.Zc, problem.v, surrogate)


def population_gradient(
    v: torch.Tensor, w: torch.Tensor, w_star: torch.Tensor, surrogate: Surrogate = "identity"
) -> torch.Tensor:
    """Expected STE gradient ``E g(w) = c ||v||^2 (w - w*) / sqrt(2 pi n)`` (see module doc)."""
    n = w.shape[-1]
    c = _surrogate_constant(surrogate)
    scale = c * v.double().pow(2).sum(dim=-1, keepdim=True) / math.sqrt(2.0 * math.pi * n)
    return scale * (w.double() - w_star.double())


def _ste_step(h: torch.Tensor, surrogate: Surrogate) -> torch.Tensor:
    """Forward ``s(h) = 1[h > 0]``; backward ``mu'(h)`` (1 for identity, ``1[h > 0]`` for ReLU)."""
    hard = (h > 0).to(h.dtype)
    soft = h if surrogate == "identity" else torch.relu(h)
    _surrogate_constant(surrogate)
    return soft + (hard - soft).detach()


def surrogate_loss(
    problem: STEProblem, u: torch.Tensor, surrogate: Surrogate = "identity"
) -> torch.Tensor:
    """Loss ``L(sign(u))`` per trial (B,) whose autograd gradient in ``u`` is ``g(sign(u))``.

    The weights pass through :func:`monquant.quant.ste.ste_sign` (identity backward) and the activation
    through a straight-through step with backward ``mu'``; the chain rule then gives
    ``dL/du = (1/N) sum_i r_i Z_i^T (v o mu'(Z_i w))``, the STE coarse gradient.
    """
    w = ste_sign(u).to(problem.Zc.dtype)
    h = _preact(problem.Zc, w)
    pred = (_ste_step(h, surrogate) * problem.v.unsqueeze(1)).sum(dim=-1)
    return 0.5 * (pred - problem.y).pow(2).mean(dim=-1)


def default_step_size(
    v: torch.Tensor, n: int, kappa: float = 10.0, surrogate: Surrogate = "identity"
) -> torch.Tensor:
    """``eta = sqrt(2 pi n) / (2 kappa c ||v||^2)`` per trial (float64, shape (B,))."""
    c = _surrogate_constant(surrogate)
    return math.sqrt(2.0 * math.pi * n) / (2.0 * kappa * c * v.double().pow(2).sum(dim=-1))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class STETrainResult:
    """Output of :func:`ste_train` for a batch of ``B`` trials.

    ``ergodic`` = ``sign(mean_{t=1..T} w_t)``, ``ergodic_mean`` = that mean, ``last`` = ``w_T``
    (all (B, n)); ``dist[b, t] = ||w_t - w*||`` and ``loss[b, t] = L(w_t)`` for t = 0..T
    (``None`` unless ``record=True``); ``iterates`` (B, T+1, n) int8 (``None`` unless
    ``keep_iterates=True``); ``fixed_at`` (B,) the first t with all residuals zero (a fixed point,
    so ``w_s = w_t`` for ``s >= t``), -1 if none; ``flips`` (B,) coordinate sign changes.
    """

    ergodic: torch.Tensor
    ergodic_mean: torch.Tensor
    last: torch.Tensor
    dist: torch.Tensor | None
    loss: torch.Tensor | None
    iterates: torch.Tensor | None
    fixed_at: torch.Tensor
    flips: torch.Tensor


class _Recorder:
    """Per-step traces (distance, loss, iterates) indexed by original trial number."""

    def __init__(self, B: int, T: int, n: int, record: bool, keep_iterates: bool) -> None:
        self.dist = torch.zeros(B, T + 1, dtype=torch.float64) if record else None
        self.loss = torch.zeros(B, T + 1, dtype=torch.float64) if record else None
        self.iterates = torch.zeros(B, T + 1, n, dtype=torch.int8) if keep_iterates else None

    def step(
        self, idx: torch.Tensor, t: int, w: torch.Tensor, r: torch.Tensor, w_star: torch.Tensor
    ) -> None:
        """Store ``||w_t - w*|| = 2 sqrt(#mismatches)``, ``L(w_t)`` and ``w_t`` at time ``t``."""
        if self.dist is not None and self.loss is not None:
            mism = (w != w_star).sum(dim=-1).double()
            self.dist[idx, t] = 2.0 * mism.sqrt()
            self.loss[idx, t] = 0.5 * r.double().pow(2).mean(dim=-1)
        if self.iterates is not None:
            self.iterates[idx, t] = w.to(torch.int8)

    def freeze(self, idx: torch.Tensor, t: int) -> None:
        """Trials ``idx`` sit at a fixed point from ``t`` on: copy time ``t`` to ``t+1..T``."""
        for trace in (self.dist, self.loss, self.iterates):
            if trace is not None:
                trace[idx, t + 1 :] = trace[idx, t : t + 1]


def _apply_flips(
    Zc: torch.Tensor, idx: torch.Tensor, h: torch.Tensor, w_old: torch.Tensor, w_new: torch.Tensor
) -> torch.Tensor:
    """Update ``h = Z w`` in place after sign flips: ``h += sum_k 2 w_new_k Z[:, :, k]``.

    The update is one sparse-dense product ``D @ Zc.view(B n, N m)`` with one nonzero ``+-2`` in
    ``D`` per flip, so only the flipped columns of Z are read (several times faster than gathering
    them); on the dyadic grid it is exact. Returns the number of flips per active trial.
    """
    changed = w_new != w_old
    bb, kk = changed.nonzero(as_tuple=True)
    if bb.numel():
        B, n, N, m = Zc.shape
        rows = torch.stack([bb, idx[bb] * n + kk])  # row-major order: already coalesced
        delta = (2.0 * w_new[bb, kk]).to(Zc.dtype)
        D = torch.sparse_coo_tensor(
            rows, delta, (h.shape[0], B * n), check_invariants=False, is_coalesced=True
        )
        h.view(h.shape[0], N * m).add_(torch.sparse.mm(D, Zc.view(B * n, N * m)))
    return changed.sum(dim=-1)


@dataclass
class _Active:
    """Compact state of the trials still running (row ``j`` is original trial ``idx[j]``)."""

    idx: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor
    h: torch.Tensor
    S: torch.Tensor
    A: torch.Tensor
    act_star: torch.Tensor
    v: torch.Tensor
    xi: torch.Tensor
    eta: torch.Tensor
    w_star: torch.Tensor

    def keep(self, mask: torch.Tensor) -> _Active:
        """Drop the rows where ``mask`` is False."""
        return _Active(**{k: getattr(self, k)[mask] for k in self.__dataclass_fields__})


def _init_active(problem: STEProblem, u0: torch.Tensor, eta: torch.Tensor) -> _Active:
    """Initial state: ``u = u_0``, ``w = sign(u_0)``, ``h = Z w``, empty ergodic sum."""
    u = u0.to(torch.float64).clone()
    w = binary_sign(u)
    return _Active(
        idx=torch.arange(problem.trials),
        u=u,
        w=w,
        h=_preact(problem.Zc, w),
        S=torch.zeros_like(u),
        A=problem.A,
        act_star=problem.act_star.to(problem.Zc.dtype),
        v=problem.v,
        xi=problem.xi,
        eta=eta,
        w_star=problem.w_star.double(),
    )


def _resolve_eta(
    problem: STEProblem, eta: float | torch.Tensor | None, kappa: float, surrogate: Surrogate
) -> torch.Tensor:
    """Step sizes per trial (B,) in float64: the default formula unless ``eta`` is given."""
    if eta is None:
        return default_step_size(problem.v, problem.n, kappa, surrogate)
    return torch.as_tensor(eta, dtype=torch.float64).expand(problem.trials).clone()


def ste_train(
    problem: STEProblem,
    *,
    T: int = 2000,
    kappa: float = 10.0,
    eta: float | torch.Tensor | None = None,
    surrogate: Surrogate = "identity",
    u0: torch.Tensor | None = None,
    record: bool = False,
    keep_iterates: bool = False,
    early_stop: bool = True,
) -> STETrainResult:
    """Run ``u_{t+1} = u_t - eta g(sign(u_t))`` for ``T`` steps on every trial of ``problem``.

    ``u0`` overrides ``problem.u0``. With ``early_stop`` a trial whose residuals are all exactly
    zero (then ``g = 0`` and the iteration is stationary) is stopped and its remaining iterates
    are filled in; this changes no output.
    """
    _surrogate_constant(surrogate)
    B = problem.trials
    st = _init_active(
        problem, problem.u0 if u0 is None else u0, _resolve_eta(problem, eta, kappa, surrogate)
    )
    rec = _Recorder(B, T, problem.n, record, keep_iterates)
    S_out = torch.zeros(B, problem.n, dtype=torch.float64)
    last = torch.zeros(B, problem.n, dtype=torch.float64)
    fixed_at = torch.full((B,), -1, dtype=torch.long)
    flips = torch.zeros(B, dtype=torch.long)
    for t in range(T + 1):
        r = _residuals_from(st.h, st.act_star, st.v, st.xi)
        rec.step(st.idx, t, st.w, r, st.w_star)
        if t == T:
            break
        if early_stop:
            done = (r == 0).all(dim=-1)
            if bool(done.any()):
                ids = st.idx[done]
                S_out[ids] = st.S[done] + (T - t) * st.w[done]
                last[ids] = st.w[done]
                fixed_at[ids] = t
                rec.freeze(ids, t)
                st, r = st.keep(~done), r[~done]
                if st.idx.numel() == 0:
                    break
        Zc = problem.Zc if surrogate == "identity" else problem.Zc[st.idx]
        g = _gradient_from(r, st.h, st.A, Zc, st.v, surrogate).double()
        st.u -= st.eta.unsqueeze(-1) * g
        w_new = binary_sign(st.u)
        flips[st.idx] += _apply_flips(problem.Zc, st.idx, st.h, st.w, w_new)
        st.w = w_new
        st.S += w_new
    if st.idx.numel():
        S_out[st.idx] = st.S
        last[st.idx] = st.w
    mean = S_out / max(T, 1)
    return STETrainResult(
        ergodic=binary_sign(mean),
        ergodic_mean=mean,
        last=last,
        dist=rec.dist,
        loss=rec.loss,
        iterates=rec.iterates,
        fixed_at=fixed_at,
        flips=flips,
    )
