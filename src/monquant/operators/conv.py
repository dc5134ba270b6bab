"""``CircularConvOperator``: ``W`` a circular convolution on a ``c x H x W`` state (issue 12).

``W z`` is torch's ``conv2d`` (a cross-correlation) of ``z`` with the kernel ``K`` of shape
``(c, c, kh, kw)`` (odd ``kh``, ``kw``; torch layout out x in x kh x kw) on the circularly padded
state, so that the output has the state's shape:

    (W z)[o, p, q] = sum_{i, a, b} K[o, i, a, b] z[i, p + a - kh//2, q + b - kw//2]   (indices mod H, W)

Every circular convolution is block-diagonal in the 2-D Fourier basis: with the unitary DFT ``F``,
``F W F^* = diag_w(K^(w))`` where the ``c x c`` complex block at frequency ``w = (k1, k2)`` is

    K^(w) = sum_{a, b} K[:, :, a, b] exp(2 pi i (k1 (a - kh//2) / H + k2 (b - kw//2) / W)).

Unitary similarity keeps symmetric parts, singular values and inverses block by block, so with
``H^(w) = (K^(w) + K^(w)^*) / 2``:

- ``margin(W) = lmin(sym(I - W)) = min_w lmin(I - H^(w))``;
- ``L = ||I - W|| = max_w sigma_max(I - K^(w))`` and ``||W|| = max_w sigma_max(K^(w))``;
- ``(I + a (I - W))^{-1}`` is one ``c x c`` inverse per frequency, applied through the FFT;
- ``||W - W'|| = max_w sigma_max(K^(w) - K'^(w))``.

:class:`CircularConvOperator` is ``W`` given by its kernel; :class:`ConvWKOperator` is the
Winston-Kolter form with convolution factors (monotone by construction). No ``(c H W) x (c H W)``
matrix is formed (:meth:`dense` builds one for tests only). These are
float64 computations of the exact quantities (``exact=True`` in the protocol's sense, like the
dense kind's ``eigvalsh``); certificates still need their proved versions.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from monquant.operators.base import LinearMap, MonotoneOperator
from monquant.operators.matrix import OperatorError, SpectralStats, all_finite

__all__ = [
    "CircularConvOperator",
    "ConvWKOperator",
    "FourierBlockMap",
    "FourierOperator",
    "block_resolvent",
    "check_kernel",
    "kernel_from_impulses",
]


def check_kernel(kernel: torch.Tensor, image: tuple[int, int]) -> tuple[int, int]:
    """Validate a ``(c, c, kh, kw)`` kernel for a ``H x W`` image; return ``(H, W)``.

    Each of these is refused with a one-line :class:`OperatorError`: not a 4-D floating tensor,
    a channel mismatch (``c_out != c_in``: ``W`` must map the state to itself), even kernel sizes
    (no centre), an image smaller than the kernel, non-finite entries.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        raise OperatorError("a convolution kernel has shape (c_out, c_in, kh, kw)")
    c_out, c_in = int(kernel.shape[0]), int(kernel.shape[1])
    if c_out != c_in:
        raise OperatorError(f"channel mismatch: the kernel maps {c_in} channels to {c_out}; "
                            "a MonDEQ operator maps the state to itself (c_out = c_in)")  # fmt: skip
    return _check_factor(kernel, image, "kernel")


def _check_factor(kernel: torch.Tensor, image: tuple[int, int], name: str) -> tuple[int, int]:
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        raise OperatorError(f"a convolution {name} has shape (c_out, c_in, kh, kw)")
    if not kernel.is_floating_point():
        raise OperatorError(f"the {name} must be floating point, got {kernel.dtype}")
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    if kh % 2 == 0 or kw % 2 == 0:
        raise OperatorError(f"{name} sizes must be odd (a centred circular convolution), "
                            f"got {kh}x{kw}")  # fmt: skip
    try:
        H, W = (int(v) for v in image)
    except (TypeError, ValueError):
        raise OperatorError(f"image size must be two integers (H, W), got {image!r}") from None
    if H < kh or W < kw:
        raise OperatorError(f"image {H}x{W} is smaller than the {name} {kh}x{kw}")
    if not all_finite(kernel.detach()):
        raise OperatorError(f"the {name} has NaN or infinite entries")
    return H, W


def fourier_blocks(
    kernel: torch.Tensor, image: tuple[int, int], differentiable: bool = False
) -> torch.Tensor:
    """The blocks ``K^(w)`` of shape ``(H, W, c_out, c_in)`` (complex128; module docstring);
    ``differentiable`` keeps the graph to ``kernel`` (for a margin penalty)."""
    c_out, c_in, kh, kw = kernel.shape
    H, W = image
    k64 = (kernel if differentiable else kernel.detach()).to(torch.float64)
    # place K[:, :, a, b] at (-(a - kh//2)) mod H, (-(b - kw//2)) mod W: the FFT's e^{-2 pi i k x}
    # then gives the exp(+2 pi i k (a - kh//2) / H) of the cross-correlation (index_add keeps
    # the graph and sums taps that wrap onto one position)
    rows = torch.tensor([(-(a - kh // 2)) % H for a in range(kh)], device=kernel.device)
    cols = torch.tensor([(-(b - kw // 2)) % W for b in range(kw)], device=kernel.device)
    full = torch.zeros(c_out, c_in, H, kw, dtype=torch.float64, device=kernel.device)
    full = full.index_add(2, rows, k64)
    full = torch.zeros(c_out, c_in, H, W, dtype=torch.float64, device=kernel.device).index_add(3, cols, full)
    return torch.fft.fft2(full).permute(2, 3, 0, 1).contiguous()


def kernel_from_impulses(
    fn, c_in: int, size: tuple[int, int], dtype: torch.dtype, device
) -> torch.Tensor:
    """The kernel ``(c_out, c_in, kh, kw)`` (odd sizes, torch layout, cross-correlation) of a
    shift-invariant linear map ``fn`` of ``(batch, c_in, H, W)`` states, read off ``fn`` applied to
    a unit impulse in each input channel on a ``kh x kw`` image. Exact when every tap of the map
    lies within ``kh x kw`` (nothing aliases); differentiable through ``fn``."""
    kh, kw = size
    delta = torch.zeros(c_in, c_in, kh, kw, dtype=dtype, device=device)
    delta[torch.arange(c_in), torch.arange(c_in), 0, 0] = 1.0
    y = fn(delta)  # y[i] = map(e_i): (c_in, c_out, kh, kw)
    ca, cb = kh // 2, kw // 2
    rows = torch.tensor([(-(a - ca)) % kh for a in range(kh)], device=device)
    cols = torch.tensor([(-(b - cb)) % kw for b in range(kw)], device=device)
    # (M z)[o, p] = sum K[o, i, a, b] z[i, p + a - ca]: an impulse at 0 gives y[o, -(a - ca)]
    return y[:, :, rows][:, :, :, cols].transpose(0, 1).contiguous()


def _circular(z: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``conv2d`` (cross-correlation) of ``z`` with an odd ``kernel`` on the circularly padded
    state: the output has the state's spatial shape."""
    kh, kw = kernel.shape[-2:]
    zp = F.pad(z, (kw // 2, kw // 2, kh // 2, kh // 2), mode="circular")
    return F.conv2d(zp, kernel.to(z.dtype))


def _flipped_T(kernel: torch.Tensor) -> torch.Tensor:
    """The kernel of the adjoint circular convolution: channels swapped, flipped in space."""
    return kernel.transpose(0, 1).flip(-1, -2)


def block_margin(blocks: torch.Tensor) -> float:
    """``margin`` of the convolution whose Fourier blocks are ``blocks`` (``(..., c, c)``):
    ``min over frequencies of lmin(I - (K^ + K^*) / 2)``, in complex128 (computed, not proved)."""
    K = blocks.to(torch.complex128)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return float(torch.linalg.eigvalsh(eye - 0.5 * (K + K.conj().transpose(-1, -2))).min())


def block_resolvent(blocks: torch.Tensor, a: float, dtype: torch.dtype) -> FourierBlockMap | None:
    """``(I + a (I - M))^{-1}`` of the circulant map with Fourier blocks ``blocks``
    (``(H, W, c, c)``): one ``c x c`` inverse per frequency; ``None`` when one of them is singular
    (only possible when ``margin(M) <= 0``)."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    inv, info = torch.linalg.inv_ex((1.0 + a) * eye - a * blocks)
    if bool((info != 0).any()) or not bool(torch.isfinite(torch.view_as_real(inv)).all()):
        return None
    return FourierBlockMap(inv, dtype)


class FourierBlockMap(LinearMap):
    """``v -> F^* diag(M^(w)) F v`` for blocks ``M`` of shape ``(H, W, c, c)`` (a circulant map).

    The map is real (the blocks at ``w`` and ``-w`` are conjugate), so it is applied on the
    half-spectrum of the real FFT: ``rfft2``, one ``c x c`` product per kept frequency, ``irfft2``,
    in the precision of ``v`` (float32 states use complex64 transforms, float64 ones complex128).
    """

    def __init__(self, blocks: torch.Tensor, dtype: torch.dtype):
        self.blocks = blocks
        self.out_dtype = dtype
        self._half: dict[torch.dtype, torch.Tensor] = {}

    def _blocks_for(self, dtype: torch.dtype) -> torch.Tensor:
        cdt = torch.complex64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else (
            torch.complex128)  # fmt: skip
        half = self._half.get(cdt)
        if half is None:
            half = self.blocks[:, : self.blocks.shape[1] // 2 + 1].to(cdt).contiguous()
            self._half[cdt] = half
        return half

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        H, W = self.blocks.shape[0], self.blocks.shape[1]
        real = v if v.dtype in (torch.float32, torch.float64) else v.to(torch.float32)
        vh = torch.fft.rfft2(real)  # (B, c, H, W // 2 + 1)
        out = torch.einsum("hwoi,bihw->bohw", self._blocks_for(real.dtype), vh)
        return torch.fft.irfft2(out, s=(H, W)).to(self.out_dtype)

    @property
    def T(self) -> FourierBlockMap:
        return FourierBlockMap(self.blocks.conj().transpose(-1, -2), self.out_dtype)


class FourierOperator(MonotoneOperator):
    """A convolution-type operator on ``c x H x W`` states known by its Fourier blocks: the
    resolvent, the FB map, the spectral constants and differences are computed per frequency
    (module docstring). Kinds give :meth:`_compute_blocks` and the rest of the protocol."""

    image: tuple[int, int]
    _blocks: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.state_shape[0])

    def _compute_blocks(self) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> torch.Tensor:
        """The Fourier blocks of ``W``, ``(H, W, c, c)`` complex128 (computed once)."""
        if self._blocks is None:
            self._blocks = self._compute_blocks()
        return self._blocks

    def _eye(self) -> torch.Tensor:
        return torch.eye(self.channels, dtype=torch.complex128, device=self.device)

    def resolvent(self, a: float) -> FourierBlockMap | None:
        return block_resolvent(self.blocks(), a, self.dtype)

    def fb_map(self, a: float) -> FourierBlockMap:
        return FourierBlockMap((1.0 - a) * self._eye() + a * self.blocks(), self.dtype)

    def spectral_stats(self) -> SpectralStats:
        Kw = self.blocks()
        m = block_margin(Kw)
        L = float(torch.linalg.matrix_norm(self._eye() - Kw, ord=2).max())
        norm_W = float(torch.linalg.matrix_norm(Kw, ord=2).max())
        return SpectralStats(m=m, L=L, norm_W=norm_W, exact=True)

    def minus(self, other: MonotoneOperator) -> float:
        if not isinstance(other, FourierOperator) or other.state_shape != self.state_shape:
            raise OperatorError("minus needs a convolution operator on the same state shape")
        diff = self.blocks() - other.blocks()  # kernel sizes may differ: the blocks do not
        return float(torch.linalg.matrix_norm(diff, ord=2).max())


class CircularConvOperator(FourierOperator):
    """The circular convolution ``z -> K * z`` on ``c x H x W`` states (module docstring)."""

    def __init__(self, kernel: torch.Tensor, image: tuple[int, int], *, checked: bool = False):
        self.image = (int(image[0]), int(image[1])) if checked else check_kernel(kernel, image)
        self.kernel = kernel
        self._blocks = None

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.kernel.shape[0]), *self.image)

    @property
    def dtype(self) -> torch.dtype:
        return self.kernel.dtype

    @property
    def device(self) -> torch.device:
        return self.kernel.device

    def _compute_blocks(self) -> torch.Tensor:
        return fourier_blocks(self.kernel, self.image)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return _circular(z, self.kernel)

    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        return _circular(z, _flipped_T(self.kernel))

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.kernel,)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> CircularConvOperator:
        (kernel,) = params
        same = tuple(kernel.shape) == tuple(self.kernel.shape)
        return CircularConvOperator(kernel, self.image, checked=same)

    def transpose(self) -> CircularConvOperator:
        return CircularConvOperator(_flipped_T(self.kernel), self.image, checked=True)

    def to(self, dtype: torch.dtype | None = None, device=None) -> CircularConvOperator:
        k = self.kernel.to(dtype=dtype or self.dtype, device=device or self.device)
        if k is self.kernel:
            return self
        if not all_finite(k):
            raise OperatorError("the kernel overflowed in the cast")
        return CircularConvOperator(k, self.image, checked=True)

    def detach(self) -> CircularConvOperator:
        out = CircularConvOperator(self.kernel.detach(), self.image, checked=True)
        out._blocks = self._blocks
        return out

    def __repr__(self) -> str:
        kh, kw = self.kernel.shape[-2:]
        H, W = self.image
        return f"CircularConvOperator(c={self.channels}, {kh}x{kw} kernel, {H}x{W} image)"


class ConvWKOperator(FourierOperator):
    """The Winston-Kolter form with convolutions: ``W = (1 - m) I - A^T A + B - B^T``, where ``A``
    (``r x c x k x k``) and ``B`` (``c x c x k x k``) are circular convolutions and ``^T`` their
    adjoints. ``sym(I - W) = m I + A^T A``, so ``margin(W) >= m`` by construction; per frequency
    the block is ``(1 - m) I - A^(w)^* A^(w) + B^(w) - B^(w)^*``. Applying it costs four
    convolutions; gradients reach ``A``, ``B`` and ``m`` through :meth:`apply` (autograd).
    ``transposed=True`` is ``W^T`` (``B`` and ``B^T`` swap)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor | float,
                 image: tuple[int, int], transposed: bool = False, *, checked: bool = False):  # fmt: skip
        if not checked:
            image = check_kernel(B, image)
            _check_factor(A, image, "factor A")
            if A.shape[1] != B.shape[0]:
                raise OperatorError(f"A maps {A.shape[1]} channels, the state has {B.shape[0]}")
        self.A, self.B, self.image = A, B, (int(image[0]), int(image[1]))
        self.m = m if isinstance(m, torch.Tensor) else torch.tensor(float(m), dtype=B.dtype)
        self.transposed = transposed
        self._blocks = None

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.B.shape[0]), *self.image)

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    @property
    def device(self) -> torch.device:
        return self.B.device

    def _apply(self, z: torch.Tensor, transpose: bool) -> torch.Tensor:
        Az = _circular(z, self.A)
        skew = _circular(z, self.B) - _circular(z, _flipped_T(self.B))
        if transpose:
            skew = -skew
        return (1 - self.m.to(z.dtype)) * z - _circular(Az, _flipped_T(self.A)) + skew

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply(z, self.transposed)

    def apply_T(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply(z, not self.transposed)

    def _compute_blocks(self) -> torch.Tensor:
        Ah = fourier_blocks(self.A, self.image)  # (H, W, r, c)
        Bh = fourier_blocks(self.B, self.image)
        skew = Bh - Bh.conj().transpose(-1, -2)
        if self.transposed:
            skew = -skew
        m = float(self.m.detach())
        return (1.0 - m) * self._eye() - Ah.conj().transpose(-1, -2) @ Ah + skew

    def composite_kernel(self, differentiable: bool = False) -> torch.Tensor:
        """The one kernel ``(c, c, 2k - 1, 2k - 1)`` whose circular convolution is this ``W`` (the
        identity, ``A^T A`` and ``B - B^T`` taps together): read off ``W`` applied to a unit
        impulse in each channel, on a ``(2k - 1) x (2k - 1)`` image (where every tap has its own
        position, so nothing aliases). Needs an image of at least ``2k - 1`` in each direction.
        float64 and detached by default; ``differentiable``: in the operator's dtype, with the
        graph to ``A``, ``B``, ``m`` (the forward pass of STE QAT on the kernel)."""
        c, kh, kw = self.channels, int(self.B.shape[-2]), int(self.B.shape[-1])
        kh2 = max(2 * kh - 1, 2 * int(self.A.shape[-2]) - 1)
        kw2 = max(2 * kw - 1, 2 * int(self.A.shape[-1]) - 1)
        if self.image[0] < kh2 or self.image[1] < kw2:
            raise OperatorError(f"the composite {kh2}x{kw2} kernel needs an image of at least that "
                                f"size, got {self.image[0]}x{self.image[1]}")  # fmt: skip
        op = self if differentiable else self.to(dtype=torch.float64).detach()
        return kernel_from_impulses(op.apply, c, (kh2, kw2), op.dtype, self.device)

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.A, self.B, self.m)

    def with_parameters(self, params: tuple[torch.Tensor, ...]) -> ConvWKOperator:
        A, B, m = params
        return ConvWKOperator(A, B, m, self.image, self.transposed, checked=True)

    def transpose(self) -> ConvWKOperator:
        return ConvWKOperator(self.A, self.B, self.m, self.image, not self.transposed, checked=True)

    def to(self, dtype: torch.dtype | None = None, device=None) -> ConvWKOperator:
        dt, dev = dtype or self.dtype, device or self.device
        return ConvWKOperator(self.A.to(dtype=dt, device=dev), self.B.to(dtype=dt, device=dev),
                              self.m.to(dtype=dt, device=dev), self.image, self.transposed,
                              checked=True)  # fmt: skip

    def __repr__(self) -> str:
        r, c, k = int(self.A.shape[0]), int(self.B.shape[0]), int(self.B.shape[-1])
        H, W = self.image
        t = ", transposed" if self.transposed else ""
        return (f"ConvWKOperator(c={c}, rank={r}, {k}x{k} factors, {H}x{W} image, "
                f"m={float(self.m):.4g}{t})")  # fmt: skip
