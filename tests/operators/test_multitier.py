"""Multi-tier operators (monquant.operators.multitier) against the dense matrix of the same
operator, built by applying it to basis vectors: apply / apply_T, block lower triangularity, the
margin of the W-K form (>= m by construction), resolvent by substitution, block norms (exact per
block, polyphase for the stride-2 couplings), composite kernels; solvers and the implicit backward
through the protocol; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.implicit import EquilibriumSolver
from monquant.operators import OperatorError
from monquant.operators.matrix import margin
from monquant.operators.multitier import (
    MultiTierConvOperator,
    MultiTierWKOperator,
    strided_conv,
    strided_conv_T,
    tier_images,
)
from monquant.solvers import SolverConfig, solve

F64 = torch.float64


def wk(channels, image, k=3, m=0.2, seed=0, scale=0.3, rank_extra=1, dtype=F64) -> MultiTierWKOperator:
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).to(dtype)

    T = len(channels)
    P = [r(c + rank_extra, c, k, k) for c in channels]
    Q = [r(channels[i] + rank_extra, channels[i + 1], k, k) for i in range(T - 1)]
    B = [r(c, c, k, k) for c in channels]
    return MultiTierWKOperator(P, Q, B, m, image)


def block(D: torch.Tensor, sizes: list[int], i: int, j: int) -> torch.Tensor:
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    return D[off[i]:off[i + 1], off[j]:off[j + 1]]


@settings(max_examples=8, deadline=None)
@given(ch=st.sampled_from([(1, 2), (2, 1), (2, 2, 1), (1, 1, 2)]), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 1000), m=st.sampled_from([0.05, 0.5]))  # fmt: skip
def test_wk_form_against_the_dense_matrix(ch, k, seed, m) -> None:
    image = (8, 8) if len(ch) == 2 else (12, 12)
    op = wk(ch, image, k=k, m=m, seed=seed)
    D = op.dense()
    n = D.shape[0]
    sizes = op.tier_sizes
    assert n == sum(sizes)
    # block lower bidiagonal
    for i in range(op.tiers):
        for j in range(op.tiers):
            if j > i or i - j > 1:
                assert float(block(D, sizes, i, j).abs().max()) == 0.0
    # margin >= m by construction, and the symmetric part is m I + N^T N
    assert margin(D) >= m - 1e-12
    z = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.allclose(op.apply_T(z), z @ D, atol=1e-12)
    assert torch.allclose(op.transpose().dense(), D.T, atol=1e-12)
    eye = torch.eye(n, dtype=F64)
    for a in (0.3, 1.7):
        J = torch.linalg.inv(eye + a * (eye - D))
        R = op.resolvent(a)
        assert torch.allclose(R.matmul(z), z @ J.T, atol=1e-10)
        assert torch.allclose(R.T.matmul(z), z @ J, atol=1e-10)
        assert torch.allclose(op.transpose().resolvent(a).matmul(z), z @ J, atol=1e-10)
        assert torch.allclose(op.fb_map(a).matmul(z), z @ ((1 - a) * eye + a * D).T, atol=1e-12)
    # block norms: exact per block (diagonal by Fourier blocks, couplings by the polyphase identity)
    N = op.block_norms()
    for i in range(op.tiers):
        for j in range(op.tiers):
            exact = float(torch.linalg.matrix_norm(block(D, sizes, i, j), 2))
            assert float(N[i, j]) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert op.norm_bound() >= float(torch.linalg.matrix_norm(D, 2)) * (1 - 1e-12)
    assert op.norm_bound(shift=True) >= float(torch.linalg.matrix_norm(eye - D, 2)) * (1 - 1e-12)
    st_ = op.spectral_stats()
    assert st_.m == pytest.approx(m) and st_.m <= margin(D) + 1e-12


def test_composite_kernels_give_the_same_operator() -> None:
    op = wk((2, 3, 1), (20, 20), seed=3)
    comp = op.composite()
    assert comp.diag[0].shape == (2, 2, 5, 5) and comp.down[1].shape == (1, 3, 5, 5)
    D = op.dense()
    assert torch.allclose(comp.dense(), D, atol=1e-13)
    for a, b in zip(comp.diag_blocks(), op.diag_blocks(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    for a, b in zip(comp.down_blocks(), op.down_blocks(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    assert op.minus(comp) < 1e-12
    z = torch.randn(2, D.shape[0], dtype=F64)
    assert torch.allclose(comp.resolvent(0.4).matmul(z), op.resolvent(0.4).matmul(z), atol=1e-12)
    # the differentiable composite keeps the graph to the factors
    P0 = op.P[0].clone().requires_grad_(True)
    op2 = MultiTierWKOperator([P0, *op.P[1:]], op.Q, op.B, op.m, op.image)
    op2.composite(differentiable=True).diag[0].sum().backward()
    assert P0.grad is not None and bool(P0.grad.abs().sum() > 0)


def test_strided_conv_adjoint_and_difference_norm() -> None:
    g = torch.Generator().manual_seed(1)
    R = torch.randn(3, 2, 3, 3, dtype=F64, generator=g)
    x = torch.randn(2, 2, 8, 6, dtype=F64, generator=g)
    y = torch.randn(2, 3, 4, 3, dtype=F64, generator=g)
    assert float((strided_conv(x, R) * y).sum()) == pytest.approx(float((x * strided_conv_T(y, R)).sum()))
    a = MultiTierConvOperator([torch.zeros(2, 2, 3, 3, dtype=F64), torch.zeros(3, 3, 3, 3, dtype=F64)],
                              [R], (8, 8))  # fmt: skip
    b = a.detach()
    assert b.minus(a) == 0.0
    D = a.dense()
    assert a.minus(MultiTierConvOperator([K + 0 for K in a.diag], [0 * R], (8, 8))) == pytest.approx(
        float(torch.linalg.matrix_norm(D, 2)), rel=1e-9)  # fmt: skip


def test_solvers_and_implicit_backward_through_the_protocol() -> None:
    op = wk((1, 2), (8, 8), m=0.3, seed=5, scale=0.2)
    n = op.size
    q = torch.randn(4, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = solve(op.dense(), q, SolverConfig("pr", tol=1e-12, max_iter=5000))
    for method in ("pr", "dr", "fb"):
        res = solve(op, q, SolverConfig(method, tol=1e-12, max_iter=20000))
        assert bool(res.converged.all()), method
        assert torch.allclose(res.z, ref.z, atol=1e-9)
    # gradcheck of the implicit backward: gradients reach the factors and m through apply
    small = wk((1, 2), (4, 4), k=1, m=0.3, seed=6, scale=0.5)
    params = [t.clone().requires_grad_(True) for t in small.parameters()]
    solver = EquilibriumSolver(SolverConfig("pr", tol=1e-13, max_iter=5000))
    x = torch.randn(1, small.size, dtype=F64, requires_grad=True)
    op = small

    def f(x, *ps):
        return solver(op.with_parameters(tuple(ps)), x)

    assert torch.autograd.gradcheck(f, (x, *params),
                                    atol=1e-6, rtol=1e-4, nondet_tol=1e-7)  # fmt: skip


def test_bad_input_is_refused_with_one_line() -> None:
    with pytest.raises(OperatorError, match="divisible"):
        tier_images((28, 28), 4)
    with pytest.raises(OperatorError, match="smaller than"):
        wk((1, 1, 1), (8, 8))
    op = wk((2, 1), (8, 8))
    with pytest.raises(OperatorError, match="odd"):
        MultiTierWKOperator(op.P, op.Q, [op.B[0], torch.zeros(1, 1, 2, 2, dtype=F64)], 0.2, (8, 8))
    with pytest.raises(OperatorError, match="Q0 must map"):
        MultiTierWKOperator(op.P, [torch.zeros(3, 2, 3, 3, dtype=F64)], op.B, 0.2, (8, 8))
    bad = op.B[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(OperatorError, match="NaN"):
        MultiTierWKOperator(op.P, op.Q, [bad, op.B[1]], 0.2, (8, 8))
    with pytest.raises(OperatorError, match="coupling kernel 0 must map"):
        MultiTierConvOperator([torch.zeros(2, 2, 3, 3), torch.zeros(1, 1, 3, 3)],
                              [torch.zeros(2, 2, 3, 3)], (8, 8))  # fmt: skip
    with pytest.raises(OperatorError, match="need 1 coupling"):
        MultiTierConvOperator([torch.zeros(2, 2, 3, 3), torch.zeros(1, 1, 3, 3)], [], (8, 8))
    with pytest.raises(OperatorError, match="composite"):
        wk((1, 1), (8, 8)).composite()  # tier 1 is 4 x 4 < 5 x 5
