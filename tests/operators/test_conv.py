"""The circular-convolution operator (monquant.operators.conv) against the dense matrix of the same
operator, built by applying it to basis vectors: apply / apply_T, Fourier-block margin, norms,
resolvent, differences; and the shared solver on it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.operators import OperatorError
from monquant.operators.conv import CircularConvOperator
from monquant.solvers import SolverConfig, solve


def kernel(c: int, k: int, seed: int, scale: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(c, c, k, k, generator=g, dtype=torch.float64)


def monotone_kernel(c: int, k: int, seed: int, m: float = 0.3) -> torch.Tensor:
    """A small random kernel plus a centred tap of ``(1 - m) / 2`` times the identity: its
    convolution has margin(W) > 0 (asserted where it matters)."""
    K = kernel(c, k, seed, scale=0.04)
    K[:, :, k // 2, k // 2] += (1.0 - m) * torch.eye(c, dtype=torch.float64) * 0.5
    return K


def by_basis(op: CircularConvOperator) -> torch.Tensor:
    return op.dense()


@settings(max_examples=12, deadline=None)
@given(c=st.integers(1, 3), k=st.sampled_from([3, 5]), H=st.integers(5, 7), W=st.integers(5, 8),
       seed=st.integers(0, 1000))  # fmt: skip
def test_fourier_quantities_equal_the_dense_matrix(c, k, H, W, seed) -> None:
    op = CircularConvOperator(kernel(c, k, seed), (H, W))
    D = by_basis(op)
    n = c * H * W
    z = torch.randn(4, c, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(op.apply(z).reshape(4, n), z.reshape(4, n) @ D.T, atol=1e-12)
    assert torch.allclose(op.apply_T(z).reshape(4, n), z.reshape(4, n) @ D, atol=1e-12)
    eye = torch.eye(n, dtype=torch.float64)
    S = eye - D
    st_ = op.spectral_stats()
    assert st_.m == pytest.approx(float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0]), abs=1e-10)
    assert st_.L == pytest.approx(float(torch.linalg.matrix_norm(S, 2)), rel=1e-10)
    assert st_.norm_W == pytest.approx(float(torch.linalg.matrix_norm(D, 2)), rel=1e-10, abs=1e-12)
    assert torch.allclose(op.transpose().dense(), D.T, atol=1e-12)
    a = 0.7
    J = op.resolvent(a)
    if J is not None:
        Jd = torch.linalg.inv(eye + a * S)
        assert torch.allclose(J.matmul(z).reshape(4, n), z.reshape(4, n) @ Jd.T, atol=1e-9)
        assert torch.allclose(J.T.matmul(z).reshape(4, n), z.reshape(4, n) @ Jd, atol=1e-9)
    fb = op.fb_map(a)
    assert torch.allclose(fb.matmul(z).reshape(4, n), z.reshape(4, n) @ ((1 - a) * eye + a * D).T,
                          atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_difference_of_quantized_kernels_is_the_dense_norm(granularity) -> None:
    from monquant.quant.uniform import quantize

    K = kernel(3, 3, 1)
    Kq = quantize(K, 4, granularity).dequantized()
    a, b = CircularConvOperator(K, (6, 5)), CircularConvOperator(Kq, (6, 5))
    want = float(torch.linalg.matrix_norm(a.dense() - b.dense(), 2))
    assert a.minus(b) == pytest.approx(want, rel=1e-10)


def test_adjointness_and_the_solver_contract() -> None:
    op = CircularConvOperator(monotone_kernel(2, 3, 4), (6, 6))
    assert op.spectral_stats().m > 0
    g = torch.Generator().manual_seed(5)
    u, v = (torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=g) for _ in range(2))
    assert torch.allclose((op.apply(u) * v).sum(), (u * op.apply_T(v)).sum(), atol=1e-12)
    q = torch.randn(8, 2, 6, 6, dtype=torch.float64, generator=g)
    for method in ("fb", "pr", "dr"):
        res = solve(op, q, SolverConfig(method, tol=1e-11, max_iter=20_000))
        ref = solve(op.dense(), q.reshape(8, -1), SolverConfig(method, tol=1e-11, max_iter=20_000))
        assert res.all_converged and res.z.shape == q.shape
        assert torch.allclose(res.z.reshape(8, -1), ref.z, atol=1e-8)
        fixed = torch.relu(op.apply(res.z) + q)
        assert float((fixed - res.z).abs().max()) < 1e-8


def test_gradients_flow_through_the_kernel() -> None:
    K = monotone_kernel(2, 3, 6).requires_grad_(True)
    op = CircularConvOperator(K, (5, 5))
    z = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda k: CircularConvOperator(k, (5, 5)).apply(z), (K,))
    assert op.parameters()[0] is K


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CircularConvOperator(torch.zeros(2, 2, 2, 3), (6, 6)), "odd"),
    (lambda: CircularConvOperator(torch.zeros(2, 3, 3, 3), (6, 6)), "channel mismatch"),
    (lambda: CircularConvOperator(torch.zeros(2, 2, 5, 5), (4, 6)), "smaller than the kernel"),
    (lambda: CircularConvOperator(torch.full((2, 2, 3, 3), float("nan")), (6, 6)), "NaN"),
    (lambda: CircularConvOperator(torch.zeros(2, 2, 3), (6, 6)), "shape"),
    (lambda: CircularConvOperator(torch.zeros(2, 2, 3, 3, dtype=torch.long), (6, 6)), "floating"),
])  # fmt: skip
def test_bad_kernels_are_refused(make, message) -> None:
    with pytest.raises(OperatorError, match=message):
        make()


def wk_factors(c: int, r: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = 0.1 * torch.randn(r, c, k, k, generator=g, dtype=torch.float64)
    B = 0.1 * torch.randn(c, c, k, k, generator=g, dtype=torch.float64)
    return A, B


@pytest.mark.parametrize(("c", "r", "k", "image"), [(2, 2, 3, (5, 6)), (3, 1, 5, (6, 5)), (1, 2, 3, (5, 5))])
def test_conv_wk_operator_is_the_dense_wk_form_and_monotone_by_construction(c, r, k, image) -> None:
    from monquant.operators.conv import ConvWKOperator

    A, B = wk_factors(c, r, k, 7)
    m = 0.25
    op = ConvWKOperator(A, B, m, image)
    n = c * image[0] * image[1]
    eye = torch.eye(n, dtype=torch.float64).reshape(n, c, *image)
    from monquant.operators.conv import _circular  # A is r x c: its matrix, by basis vectors

    Amat = _circular(eye, A).reshape(n, -1).T  # (r H W) x (c H W)
    Bmat = _circular(eye, B).reshape(n, -1).T
    want = (1 - m) * torch.eye(n, dtype=torch.float64) - Amat.T @ Amat + Bmat - Bmat.T
    assert torch.allclose(op.dense(), want, atol=1e-12)
    assert torch.allclose(op.transpose().dense(), want.T, atol=1e-12)
    S = torch.eye(n, dtype=torch.float64) - want
    st_ = op.spectral_stats()
    assert st_.m == pytest.approx(float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0]), abs=1e-10)
    assert st_.m >= m - 1e-12  # sym(I - W) = m I + A^T A
    assert st_.L == pytest.approx(float(torch.linalg.matrix_norm(S, 2)), rel=1e-10)


def test_implicit_gradients_through_a_conv_wk_layer_match_finite_differences() -> None:
    from monquant.implicit import EquilibriumSolver
    from monquant.operators.conv import ConvWKOperator
    from monquant.solvers import SolverConfig as Cfg

    A, B = wk_factors(2, 2, 3, 8)
    m = torch.tensor(0.4, dtype=torch.float64)
    q = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    solver = EquilibriumSolver(forward_config=Cfg("pr", tol=1e-13, max_iter=20_000),
                               backward_tol=1e-13)  # fmt: skip

    def loss(A_, B_, m_, q_):
        z = solver(ConvWKOperator(A_, B_, m_, (5, 5), checked=True), q_)
        return (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)).sum()

    params = [t.clone().requires_grad_(True) for t in (A, B, m, q)]
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)
