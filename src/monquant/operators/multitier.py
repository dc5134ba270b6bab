"""Multi-tier convolutional operators: ``W`` on a state of ``T`` tiers of decreasing resolution.

Tier ``i`` holds ``c_i`` channels on an ``H_i x W_i`` image with ``H_{i+1} = H_i / 2``,
``W_{i+1} = W_i / 2``; a sample's state is the concatenation of the flattened tiers (so the
protocol's ``state_shape`` is ``(n,)``, ``n = sum_i c_i H_i W_i``). ``W`` is block lower
bidiagonal, as in the multi-tier MonDEQ of Winston and Kolter (2020):

    (W z)_i = W_ii z_i + W_{i,i-1} z_{i-1},

where every diagonal block ``W_ii`` is a circular convolution on tier ``i`` and every coupling
``W_{i+1,i} = S o conv(R_i)`` is a circular convolution on tier ``i`` followed by ``S``, keeping
every second row and column (a stride-2 convolution). ``S^T`` puts zeros between the entries.

- **Resolvent.** ``I + a (I - W)`` is block lower triangular, so ``(I + a (I - W))^{-1} v`` is a
  forward substitution, ``x_i = J_i (v_i + a W_{i,i-1} x_{i-1})`` with
  ``J_i = ((1 + a) I - a W_ii)^{-1}`` one ``c_i x c_i`` inverse per 2-D frequency of tier ``i``;
  its transpose is the backward substitution. Exact, no inner iteration.
- **Block norms.** ``||W_ii||`` is the largest singular value over the Fourier blocks of tier
  ``i``. For the stride-2 coupling, ``S C C^T S^T`` is a circular convolution on tier ``i + 1``
  whose block at a coarse frequency ``w`` is ``(1/4) sum_{w'} C^(w') C^(w')^*`` over the four
  fine frequencies ``w'`` that alias to ``w`` (the polyphase identity), so
  ``||S o conv(R)|| = max_w ||(1/2) [C^(w'_1) ... C^(w'_4)]||``. For any block operator,
  ``||M|| <= ||(||M_ij||)_ij||_2`` (the spectral norm of the matrix of block norms).

Two kinds: :class:`MultiTierConvOperator`, ``W`` given by its kernels (a quantized operator), and
:class:`MultiTierWKOperator`, the Winston-Kolter form built from factors, monotone with margin
``>= m`` by construction:

    I - W = m I + N^T N + (Lo - Lo^T) - (B - B^T),     N = [[P_0, Q_0, 0], [0, P_1, Q_1], [0, 0, P_2]],

with ``N^T N = D + Lo + Lo^T`` (``D`` block diagonal, ``Lo`` strictly lower), so that
``I - W = m I + D + 2 Lo - (B - B^T)`` is block lower triangular while
``sym(I - W) = m I + N^T N >= m I``. ``P_i`` (``r_i x c_i``) is a circular convolution on tier ``i``,
``Q_i`` (``r_i x c_{i+1}``) a circular convolution of the zero-upsampled tier ``i + 1``
(``Q_i S^T``), ``B_i`` (``c_i x c_i``) a circular convolution. Every block is again a (strided)
circular convolution: ``D_ii = P_i^T P_i + S Q_{i-1}^T Q_{i-1} S^T`` and
``Lo_{i+1,i} = S Q_i^T P_i``; :meth:`MultiTierWKOperator.composite` gives the kernels.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from monquant.operators.base import LinearMap, MonotoneOperator
from monquant.operators.conv import (
    FourierBlockMap,
    _check_factor,
    _circular,
    _flipped_T,
    block_margin,
    block_resolvent,
    check_kernel,
    fourier_blocks,
    kernel_from_impulses,
)
from monquant.operators.matrix import OperatorError, SpectralStats, all_finite
from monquant.operators.spectral import estimate_margin

__all__ = [
    "MultiTierConvOperator",
    "MultiTierWKOperator",
    "TieredOperator",
    "block_matrix",
    "polyphase_norms",
    "split_tiers",
    "strided_conv",
    "strided_conv_T",
    "tier_images",
    "upsample",
]


def tier_images(image: tuple[int, int], tiers: int) -> list[tuple[int, int]]:
    """The images of ``tiers`` tiers, each half the previous one; ``image`` must be divisible by
    ``2^(tiers - 1)`` (one-line :class:`OperatorError` otherwise)."""
    try:
        H, W = (int(v) for v in image)
    except (TypeError, ValueError):
        raise OperatorError(f"image size must be two integers (H, W), got {image!r}") from None
    if tiers < 1:
        raise OperatorError(f"a multi-tier operator needs at least one tier, got {tiers}")
    f = 2 ** (tiers - 1)
    if H < 1 or W < 1 or H % f or W % f:
        raise OperatorError(f"image {H}x{W} must be divisible by 2^(tiers - 1) = {f} for "
                            f"{tiers} tiers")  # fmt: skip
    return [(H // 2**i, W // 2**i) for i in range(tiers)]


def split_tiers(
    z: torch.Tensor, channels: tuple[int, ...], images: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """The tiers ``(batch, c_i, H_i, W_i)`` of a batch of flattened states ``(batch, n)``."""
    sizes = [c * h * w for c, (h, w) in zip(channels, images, strict=True)]
    return [p.reshape(z.shape[0], c, *img)
            for p, c, img in zip(torch.split(z, sizes, dim=-1), channels, images, strict=True)]  # fmt: skip


def upsample(y: torch.Tensor) -> torch.Tensor:
    """``S^T y``: zeros between the entries (``(B, c, h, w) -> (B, c, 2h, 2w)``), differentiable."""
    out = y.new_zeros(*y.shape[:-2], 2 * y.shape[-2], 2 * y.shape[-1])
    out[..., ::2, ::2] = y
    return out


def strided_conv(z: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``S (K * z)``: the circular convolution by an odd ``kernel`` (``c_out x c_in``) kept at even
    rows and columns (a stride-2 ``conv2d`` on the circularly padded state)."""
    kh, kw = kernel.shape[-2:]
    zp = F.pad(z, (kw // 2, kw // 2, kh // 2, kh // 2), mode="circular")
    return F.conv2d(zp, kernel.to(z.dtype), stride=2)


def strided_conv_T(y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`strided_conv`: ``K^T * (S^T y)``."""
    return _circular(upsample(y), _flipped_T(kernel))


def block_matrix(diag: list[float], down: list[float]) -> torch.Tensor:
    """The ``T x T`` float64 matrix with ``diag`` on its diagonal and ``down`` just below it: the
    pattern of a tiered operator's blocks (for the matrix of block norms, module docstring)."""
    N = torch.zeros(len(diag), len(diag), dtype=torch.float64)
    for i, v in enumerate(diag):
        N[i, i] = v
    for i, v in enumerate(down):
        N[i + 1, i] = v
    return N


def _norm_matrix(diag_blocks: list[torch.Tensor], down_blocks: list[torch.Tensor]) -> torch.Tensor:
    """The matrix of block norms from Fourier blocks: the largest singular value over frequencies
    for a diagonal block, the polyphase norm (:func:`polyphase_norms`) for a coupling."""
    return block_matrix([float(torch.linalg.matrix_norm(M, ord=2).max()) for M in diag_blocks],
                        [math.sqrt(float(polyphase_norms(R).max())) for R in down_blocks])  # fmt: skip


def polyphase_norms(blocks: torch.Tensor) -> torch.Tensor:
    """Per coarse frequency, ``lmax((1/4) sum_{w'} C^(w') C^(w')^*)`` for the full-spectrum
    blocks ``(2h, 2w, c_out, c_in)`` of a circular convolution on the fine grid: the squared
    singular values' maxima of ``S o conv`` (module docstring); shape ``(h, w)``."""
    Hf, Wf, a, b = blocks.shape
    X = blocks.reshape(2, Hf // 2, 2, Wf // 2, a, b)
    G = (X @ X.conj().transpose(-1, -2)).sum(dim=(0, 2)) * 0.25
    G = 0.5 * (G + G.conj().transpose(-1, -2))
    return torch.linalg.eigvalsh(G)[..., -1].clamp_min(0.0)


class _AffineFB(LinearMap):
    """``v -> (1 - a) v + a W v`` through the operator's own ``apply`` (and ``apply_T``)."""

    def __init__(self, op: MonotoneOperator, a: float, transposed: bool = False):
        self.op, self.a, self.transposed = op, a, transposed

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        Wv = self.op.apply_T(v) if self.transposed else self.op.apply(v)
        return (1.0 - self.a) * v + self.a * Wv

    @property
    def T(self) -> _AffineFB:
        return _AffineFB(self.op, self.a, not self.transposed)


class _TieredResolvent(LinearMap):
    """``(I + a (I - W))^{-1}`` of a lower-triangular tiered ``W`` by substitution (module
    docstring): forward for the map itself, backward for its transpose."""

    def __init__(self, op: TieredOperator, a: float, J: list[FourierBlockMap], transposed: bool = False):
        self.op, self.a, self.J, self.transposed = op, a, J, transposed

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        op, a = self.op, self.a
        vs = op.split(v)
        T = len(vs)
        xs: list[torch.Tensor] = [vs[0]] * T
        order = range(T - 1, -1, -1) if self.transposed else range(T)
        for i in order:
            rhs = vs[i]
            if self.transposed and i < T - 1:
                rhs = rhs + a * op.down_apply_T(i, xs[i + 1])
            elif not self.transposed and i > 0:
                rhs = rhs + a * op.down_apply(i - 1, xs[i - 1])
            xs[i] = (self.J[i].T if self.transposed else self.J[i]).matmul(rhs)
        return op.join(xs)

    @property
    def T(self) -> _TieredResolvent:
        return _TieredResolvent(self.op, self.a, self.J, not self.transposed)


class TieredOperator(MonotoneOperator):
    """A block lower-bidiagonal operator of circular convolutions on tiers (module docstring).

    Kinds give the blocks: :meth:`diag_apply` (``W_ii z_i`` or ``W_ii^T z_i``),
    :meth:`down_apply` (``W_{i+1,i} z_i``) and :meth:`down_apply_T`, and the Fourier blocks of the
    diagonal blocks (:meth:`diag_blocks`, ``(H_i, W_i, c_i, c_i)``) and of the couplings before
    ``S`` (:meth:`down_blocks`, ``(H_i, W_i, c_{i+1}, c_i)``, full spectrum on tier ``i``).
    ``transposed=True`` stands for ``W^T`` (block upper triangular; its resolvent is the
    transpose of ``W``'s).
    """

    channels: tuple[int, ...]
    images: list[tuple[int, int]]
    transposed: bool = False

    @property
    def tiers(self) -> int:
        return len(self.channels)

    @property
    def image(self) -> tuple[int, int]:
        return self.images[0]

    @property
    def tier_sizes(self) -> list[int]:
        return [c * h * w for c, (h, w) in zip(self.channels, self.images, strict=True)]

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (sum(self.tier_sizes),)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The tiers ``(batch, c_i, H_i, W_i)`` of a batch of flattened states ``(batch, n)``."""
        return split_tiers(z, self.channels, self.images)

    def join(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """The flattened state of a list of tiers (inverse of :meth:`split`)."""
        return torch.cat([t.flatten(1) for t in zs], dim=1)

    # -- the blocks (kinds) ---------------------------------------------------------------------
    def diag_apply(self, i: int, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def down_apply(self, i: int, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def down_apply_T(self, i: int, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diag_blocks(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def down_blocks(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------------
    def _lower(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        zs = self.split(z)
        out = []
        for i in range(self.tiers):
            o = self.diag_apply(i, zs[i], transpose)
            if transpose and i < self.tiers - 1:
                o = o + self.down_apply_T(i, zs[i + 1])
            elif not transpose and i > 0:
                o = o + self.down_apply(i - 1, zs[i - 1])
            out.append(o)
        return self.join(out)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return self._lower(z, self.transposed)

    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        return self._lower(z, not self.transposed)

    def resolvent(self, a: float) -> LinearMap | None:
        inverses = [block_resolvent(Kw, a, self.dtype) for Kw in self.diag_blocks()]
        J = [j for j in inverses if j is not None]
        if len(J) != len(inverses):
            return None  # a diagonal block of I + a (I - W) is singular
        lower = self if not self.transposed else self.transpose()
        res = _TieredResolvent(lower, a, J)  # type: ignore[arg-type]
        return res.T if self.transposed else res

    def fb_map(self, a: float) -> LinearMap:
        return _AffineFB(self, a)

    def block_norms(self, shift: bool = False) -> torch.Tensor:
        """The ``T x T`` matrix of block norms ``||M_ij||`` of ``M = W`` (``shift``: ``I - W``),
        float64, from the Fourier blocks (computed, not proved)."""
        diag = [torch.eye(K.shape[-1], dtype=K.dtype, device=K.device) - K if shift else K
                for K in self.diag_blocks()]  # fmt: skip
        N = _norm_matrix(diag, self.down_blocks())
        return N.T if self.transposed else N

    def norm_bound(self, shift: bool = False) -> float:
        """``||W||`` (``shift``: ``||I - W||``) bounded above by the spectral norm of the matrix of
        block norms (module docstring; computed in float64, not proved)."""
        return float(torch.linalg.matrix_norm(self.block_norms(shift), ord=2))

    def diagonal_margin(self) -> float:
        """The smallest margin of a diagonal block, ``min_i margin(W_ii)``, from the Fourier blocks
        (float64, computed, not proved): an upper bound on ``margin(W)`` in exact arithmetic, since
        a diagonal block is a principal compression of ``sym(I - W)``."""
        return min(block_margin(K) for K in self.diag_blocks())

    def spectral_stats(self) -> SpectralStats:
        """``m`` estimated (``exact=False``): the smaller of a power iteration's Rayleigh quotient
        and :meth:`diagonal_margin`, both upper estimates of the margin; ``L`` and ``||W||`` are
        the block-norm upper bounds (:meth:`norm_bound`)."""
        L = self.norm_bound(shift=True)
        m = min(estimate_margin(self.detach(), L), self.diagonal_margin())
        return SpectralStats(m=m, L=L, norm_W=self.norm_bound(), exact=False)

    def minus(self, other: MonotoneOperator) -> float:
        """An upper bound on ``||W - W_other||``: the spectral norm of the matrix of the blocks'
        difference norms (exact per block from the Fourier blocks; module docstring)."""
        if not isinstance(other, TieredOperator) or other.state_shape != self.state_shape or (
                other.channels != self.channels or other.images != self.images):  # fmt: skip
            raise OperatorError("minus needs a multi-tier operator with the same tiers")
        N = _norm_matrix([a - b for a, b in zip(self.diag_blocks(), other.diag_blocks(), strict=True)],
                         [a - b for a, b in zip(self.down_blocks(), other.down_blocks(), strict=True)])
        return float(torch.linalg.matrix_norm(N, ord=2))


def _check_tiers(images: list[tuple[int, int]], diag: list[torch.Tensor], down: list[torch.Tensor]) -> None:
    if len(down) != len(diag) - 1:
        raise OperatorError(f"{len(diag)} tiers need {len(diag) - 1} coupling kernels, got {len(down)}")
    for i, K in enumerate(diag):
        check_kernel(K, images[i])
    for i, R in enumerate(down):
        _check_factor(R, images[i], f"coupling kernel {i}")
        want = (int(diag[i + 1].shape[0]), int(diag[i].shape[0]))
        if tuple(int(s) for s in R.shape[:2]) != want:
            raise OperatorError(f"coupling kernel {i} must map {want[1]} channels to {want[0]}, "
                                f"got shape {tuple(R.shape)}")  # fmt: skip


class MultiTierConvOperator(TieredOperator):
    """``W`` given by its kernels: ``diag[i]`` (``c_i x c_i x kh x kw``, the circular convolution
    ``W_ii``) and ``down[i]`` (``c_{i+1} x c_i x kh x kw``, ``W_{i+1,i} = S o conv(down[i])``), on
    tiers of ``image``, ``image / 2``, ... (module docstring). The quantized operator of a
    multi-tier layer is of this kind."""

    def __init__(self, diag: list[torch.Tensor], down: list[torch.Tensor], image: tuple[int, int],
                 transposed: bool = False, *, checked: bool = False):  # fmt: skip
        self.images = tier_images(image, len(diag))
        if not checked:
            _check_tiers(self.images, list(diag), list(down))
        self.diag, self.down = list(diag), list(down)
        self.channels = tuple(int(K.shape[0]) for K in self.diag)
        self.transposed = transposed
        self._diag_blocks: list[torch.Tensor] | None = None
        self._down_blocks: list[torch.Tensor] | None = None

    @classmethod
    def from_kernels(cls, kernels: list[torch.Tensor], image: tuple[int, int], *,
                     checked: bool = False) -> MultiTierConvOperator:  # fmt: skip
        """The operator of a flat kernel list in :meth:`kernels` order (the ``T`` diagonal kernels,
        then the ``T - 1`` couplings), checked unless ``checked``."""
        T = (len(kernels) + 1) // 2
        return cls(list(kernels[:T]), list(kernels[T:]), image, checked=checked)

    def kernels(self) -> list[torch.Tensor]:
        """Every kernel: the diagonal blocks', then the couplings' (:meth:`from_kernels` order)."""
        return [*self.diag, *self.down]

    @property
    def dtype(self) -> torch.dtype:
        return self.diag[0].dtype

    @property
    def device(self) -> torch.device:
        return self.diag[0].device

    def diag_apply(self, i: int, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        K = self.diag[i]
        return _circular(z, _flipped_T(K) if transpose else K)

    def down_apply(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return strided_conv(z, self.down[i])

    def down_apply_T(self, i: int, y: torch.Tensor) -> torch.Tensor:
        return strided_conv_T(y, self.down[i])

    def diag_blocks(self) -> list[torch.Tensor]:
        if self._diag_blocks is None:
            self._diag_blocks = [fourier_blocks(K, img)
                                 for K, img in zip(self.diag, self.images, strict=False)]  # fmt: skip
        return self._diag_blocks

    def down_blocks(self) -> list[torch.Tensor]:
        if self._down_blocks is None:
            self._down_blocks = [fourier_blocks(R, img)
                                 for R, img in zip(self.down, self.images, strict=False)]  # fmt: skip
        return self._down_blocks

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (*self.diag, *self.down)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> MultiTierConvOperator:
        T = self.tiers
        return MultiTierConvOperator(list(params[:T]), list(params[T:]), self.image, self.transposed)

    def transpose(self) -> MultiTierConvOperator:
        out = MultiTierConvOperator(self.diag, self.down, self.image, not self.transposed, checked=True)
        out._diag_blocks, out._down_blocks = self._diag_blocks, self._down_blocks
        return out

    def to(self, dtype: torch.dtype | None = None, device=None) -> MultiTierConvOperator:
        dt, dev = dtype or self.dtype, device or self.device
        diag = [K.to(dtype=dt, device=dev) for K in self.diag]
        down = [R.to(dtype=dt, device=dev) for R in self.down]
        if not all(all_finite(t) for t in (*diag, *down)):
            raise OperatorError("a kernel overflowed in the cast")
        return MultiTierConvOperator(diag, down, self.image, self.transposed, checked=True)

    def detach(self) -> MultiTierConvOperator:
        out = MultiTierConvOperator([K.detach() for K in self.diag], [R.detach() for R in self.down],
                                    self.image, self.transposed, checked=True)  # fmt: skip
        out._diag_blocks, out._down_blocks = self._diag_blocks, self._down_blocks
        return out

    def __repr__(self) -> str:
        k = "x".join(str(int(s)) for s in self.diag[0].shape[-2:])
        t = ", transposed" if self.transposed else ""
        return (f"MultiTierConvOperator(channels={list(self.channels)}, {k} kernels, "
                f"{self.image[0]}x{self.image[1]} image{t})")  # fmt: skip


class MultiTierWKOperator(TieredOperator):
    """The multi-tier Winston-Kolter form (module docstring): factors ``P[i]`` (``r_i x c_i``),
    ``Q[i]`` (``r_i x c_{i+1}``, ``i < T - 1``), ``B[i]`` (``c_i x c_i``), odd ``k x k`` kernels, and
    ``m``; ``margin(W) >= m`` for any factors. Gradients reach every factor and ``m`` through
    :meth:`apply` (autograd). ``transposed=True`` is ``W^T``."""

    def __init__(self, P: list[torch.Tensor], Q: list[torch.Tensor], B: list[torch.Tensor],
                 m: torch.Tensor | float, image: tuple[int, int], transposed: bool = False, *,
                 checked: bool = False):  # fmt: skip
        T = len(B)
        self.images = tier_images(image, T)
        if not checked:
            if len(P) != T or len(Q) != T - 1:
                raise OperatorError(f"{T} tiers need {T} factors P, {T - 1} factors Q and {T} "
                                    f"factors B, got {len(P)}, {len(Q)}, {T}")  # fmt: skip
            for i in range(T):
                check_kernel(B[i], self.images[i])
                _check_factor(P[i], self.images[i], f"factor P{i}")
                if P[i].shape[1] != B[i].shape[0]:
                    raise OperatorError(f"P{i} maps {P[i].shape[1]} channels, tier {i} has {B[i].shape[0]}")
            for i in range(T - 1):
                _check_factor(Q[i], self.images[i], f"factor Q{i}")
                if Q[i].shape[0] != P[i].shape[0] or Q[i].shape[1] != B[i + 1].shape[0]:
                    raise OperatorError(f"Q{i} must map {int(B[i + 1].shape[0])} channels to "
                                        f"{int(P[i].shape[0])}, got shape {tuple(Q[i].shape)}")  # fmt: skip
        self.P, self.Q, self.B = list(P), list(Q), list(B)
        self.m = m if isinstance(m, torch.Tensor) else torch.tensor(float(m), dtype=B[0].dtype)
        self.channels = tuple(int(b.shape[0]) for b in self.B)
        self.transposed = transposed
        self._diag_blocks: list[torch.Tensor] | None = None
        self._down_blocks: list[torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.B[0].dtype

    @property
    def device(self) -> torch.device:
        return self.B[0].device

    def _skew(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return _circular(z, self.B[i]) - _circular(z, _flipped_T(self.B[i]))

    def _lower(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        # one pass: a_i = P_i z_i and b_i = Q_i S^T z_{i+1} (the rows of N z) serve D, Lo and Lo^T
        zs = self.split(z)
        T = self.tiers
        a = [_circular(zs[i], self.P[i]) for i in range(T)]
        b = [_circular(upsample(zs[i + 1]), self.Q[i]) for i in range(T - 1)]
        out = []
        for i in range(T):
            s = a[i] + 2.0 * b[i] if (transpose and i < T - 1) else a[i]
            o = (1 - self.m.to(z.dtype)) * zs[i] - _circular(s, _flipped_T(self.P[i]))
            if i > 0:
                x = b[i - 1] if transpose else b[i - 1] + 2.0 * a[i - 1]
                o = o - strided_conv(x, _flipped_T(self.Q[i - 1]))
            skew = self._skew(i, zs[i])
            out.append(o - skew if transpose else o + skew)
        return self.join(out)

    def diag_apply(self, i: int, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``W_ii z = (1 - m) z - P_i^T P_i z - S Q_{i-1}^T Q_{i-1} S^T z + (B_i - B_i^T) z``."""
        o = (1 - self.m.to(z.dtype)) * z - _circular(_circular(z, self.P[i]), _flipped_T(self.P[i]))
        if i > 0:
            Q = self.Q[i - 1]
            o = o - strided_conv(_circular(upsample(z), Q), _flipped_T(Q))
        skew = self._skew(i, z)
        return o - skew if transpose else o + skew

    def down_apply(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """``W_{i+1,i} z = -2 S Q_i^T P_i z``."""
        return -2.0 * strided_conv(_circular(z, self.P[i]), _flipped_T(self.Q[i]))

    def down_apply_T(self, i: int, y: torch.Tensor) -> torch.Tensor:
        return -2.0 * _circular(_circular(upsample(y), self.Q[i]), _flipped_T(self.P[i]))

    def _factor_blocks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        Ph = [fourier_blocks(self.P[i], self.images[i]) for i in range(self.tiers)]
        Qh = [fourier_blocks(self.Q[i], self.images[i]) for i in range(self.tiers - 1)]
        return Ph, Qh

    def diag_blocks(self) -> list[torch.Tensor]:
        """Per tier, ``(1 - m) I - P^* P - (1/4) sum_{w'} Q^(w')^* Q^(w') + B - B^*`` (the Q term over
        the four fine frequencies aliasing to each coarse one)."""
        if self._diag_blocks is None:
            Ph, Qh = self._factor_blocks()
            m = float(self.m.detach())
            out = []
            for i in range(self.tiers):
                Bh = fourier_blocks(self.B[i], self.images[i])
                eye = torch.eye(self.channels[i], dtype=torch.complex128, device=Bh.device)
                K = ((1.0 - m) * eye - Ph[i].conj().transpose(-1, -2) @ Ph[i]
                     + Bh - Bh.conj().transpose(-1, -2))  # fmt: skip
                if i > 0:
                    G = Qh[i - 1].conj().transpose(-1, -2) @ Qh[i - 1]  # (2h, 2w, c_i, c_i)
                    Hf, Wf = G.shape[:2]
                    K = K - 0.25 * G.reshape(2, Hf // 2, 2, Wf // 2, *G.shape[2:]).sum(dim=(0, 2))
                out.append(K)
            self._diag_blocks = out
        return self._diag_blocks

    def down_blocks(self) -> list[torch.Tensor]:
        """Per coupling, the blocks ``-2 Q_i^* P_i`` on tier ``i`` (before ``S``)."""
        if self._down_blocks is None:
            Ph, Qh = self._factor_blocks()
            self._down_blocks = [-2.0 * Qh[i].conj().transpose(-1, -2) @ Ph[i] for i in range(self.tiers - 1)]
        return self._down_blocks

    def spectral_stats(self) -> SpectralStats:
        """``m`` (the construction's lower bound on the margin) and the block-norm upper bounds on
        ``L`` and ``||W||``: conservative values (every modulus formula decreases in ``m`` and
        increases in ``L``), as :meth:`monquant.verified.SpectralBounds.conservative` gives."""
        return SpectralStats(m=float(self.m.detach()), L=self.norm_bound(shift=True),
                             norm_W=self.norm_bound())  # fmt: skip

    @property
    def kernel_size(self) -> tuple[int, int]:
        """The size ``(2k - 1) x (2k - 1)`` of the composite kernels (``k`` the largest factor)."""
        ks = [t.shape[-2:] for t in (*self.P, *self.Q, *self.B)]
        return (2 * max(int(s[0]) for s in ks) - 1, 2 * max(int(s[1]) for s in ks) - 1)

    def composite(self, differentiable: bool = False) -> MultiTierConvOperator:
        """The same ``W`` as a :class:`MultiTierConvOperator`: one composite kernel per block
        (``(2k - 1) x (2k - 1)``, read off impulses; nothing aliases), the analogue of quantizing
        a dense ``W``. float64 and detached on the CPU by default (the error analysis of
        :func:`monquant.certify_multitier.composition_error` assumes CPU float64 convolutions);
        ``differentiable``: in the operator's dtype and device, with the graph to the factors."""
        size = self.kernel_size
        for img in self.images:
            if img[0] < size[0] or img[1] < size[1]:
                raise OperatorError(f"the composite {size[0]}x{size[1]} kernels need every tier "
                                    f"image to be at least that size, got {img[0]}x{img[1]}")  # fmt: skip
        op = self if differentiable else self.to(dtype=torch.float64, device="cpu").detach()
        diag = [kernel_from_impulses(lambda x, i=i: op.diag_apply(i, x), c, size, op.dtype, op.device)
                for i, c in enumerate(self.channels)]  # fmt: skip
        down = [kernel_from_impulses(
                    lambda x, i=i: -2.0 * _circular(_circular(x, op.P[i]), _flipped_T(op.Q[i])),
                    c, size, op.dtype, op.device)
                for i, c in enumerate(self.channels[:-1])]  # fmt: skip
        return MultiTierConvOperator(diag, down, self.image, self.transposed, checked=True)

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (*self.P, *self.Q, *self.B, self.m)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> MultiTierWKOperator:
        T = self.tiers
        P, Q, B = list(params[:T]), list(params[T:2 * T - 1]), list(params[2 * T - 1:3 * T - 1])
        return MultiTierWKOperator(P, Q, B, params[-1], self.image, self.transposed, checked=True)

    def transpose(self) -> MultiTierWKOperator:
        out = MultiTierWKOperator(self.P, self.Q, self.B, self.m, self.image, not self.transposed,
                                  checked=True)  # fmt: skip
        out._diag_blocks, out._down_blocks = self._diag_blocks, self._down_blocks
        return out

    def to(self, dtype: torch.dtype | None = None, device=None) -> MultiTierWKOperator:
        dt, dev = dtype or self.dtype, device or self.device

        def cast(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(dtype=dt, device=dev) for t in ts]

        return MultiTierWKOperator(cast(self.P), cast(self.Q), cast(self.B), self.m.to(dtype=dt, device=dev),
                                   self.image, self.transposed, checked=True)  # fmt: skip

    def __repr__(self) -> str:
        k = int(self.B[0].shape[-1])
        t = ", transposed" if self.transposed else ""
        return (f"MultiTierWKOperator(channels={list(self.channels)}, {k}x{k} factors, "
                f"{self.image[0]}x{self.image[1]} image, m={float(self.m):.4g}{t})")  # fmt: skip
