import pytest
import torch
from conftest import random_monotone_W
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.implicit import EquilibriumSolver, direct_adjoint
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.solvers import SolverConfig, solve

TIGHT = SolverConfig(method="pr", tol=1e-13, max_iter=20_000)


def dense_implicit_grads(W, q, g):
    """Reference: dz*/dq = (I - D W)^{-1} D per sample, assembled densely (independent code)."""
    z = solve(W, q, TIGHT).z
    n = W.shape[0]
    gW = torch.zeros_like(W)
    gq = torch.zeros_like(q)
    for i in range(q.shape[0]):
        D = torch.diag(((W @ z[i] + q[i]) > 0).to(W.dtype))
        J = torch.linalg.solve(torch.eye(n, dtype=W.dtype) - D @ W, D)  # dz/dq
        gq[i] = J.T @ g[i]
        gW += torch.outer(gq[i], z[i])
    return gW, gq


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
@pytest.mark.parametrize("mode", ["splitting", "direct"])
@given(n=st.integers(2, 12), m=st.floats(0.2, 1.0), seed=st.integers(0, 500))
def test_gradient_matches_dense_implicit_function_theorem(method, mode, n, m, seed):
    W = random_monotone_W(n, m, seed=seed).requires_grad_(True)
    g_ = torch.Generator().manual_seed(seed)
    q = torch.randn(4, n, generator=g_, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, generator=g_, dtype=torch.float64)
    cfg = SolverConfig(method=method, tol=1e-13, max_iter=200_000)
    eq = EquilibriumSolver(cfg, backward=mode)
    z = eq(W, q)
    (z * g).sum().backward()
    rW, rq = dense_implicit_grads(W.detach(), q.detach(), g)
    assert eq.counters.forward_unconverged == 0 and eq.counters.backward_unconverged == 0
    assert float((W.grad - rW).norm()) <= 1e-6 * float(rW.norm()) + 1e-12
    assert float((q.grad - rq).norm()) <= 1e-6 * float(rq.norm()) + 1e-12


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), m=st.floats(0.2, 1.0), seed=st.integers(0, 500))
def test_anderson_forward_and_adjoint_give_the_implicit_gradient(method, n, m, seed):
    W = random_monotone_W(n, m, seed=seed).requires_grad_(True)
    g_ = torch.Generator().manual_seed(seed)
    q = torch.randn(4, n, generator=g_, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, generator=g_, dtype=torch.float64)
    eq = EquilibriumSolver(SolverConfig(method=method, tol=1e-13, max_iter=200_000, anderson=3))
    (eq(W, q) * g).sum().backward()
    assert eq.last_backward is not None  # the adjoint solve ran, with the forward's settings
    rW, rq = dense_implicit_grads(W.detach(), q.detach(), g)
    assert eq.counters.forward_unconverged == 0 and eq.counters.backward_unconverged == 0
    assert float((W.grad - rW).norm()) <= 1e-6 * float(rW.norm()) + 1e-12
    assert float((q.grad - rq).norm()) <= 1e-6 * float(rq.norm()) + 1e-12


@pytest.mark.parametrize("mode", ["splitting", "direct"])
def test_gradcheck_small(mode):
    W = random_monotone_W(5, 0.5, seed=7).requires_grad_(True)
    q = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q.requires_grad_(True)
    eq = EquilibriumSolver(TIGHT, backward=mode)
    assert torch.autograd.gradcheck(lambda W_, q_: eq(W_, q_), (W, q), eps=1e-6, atol=1e-6)


def test_direct_adjoint_solves_the_adjoint_equation():
    W = random_monotone_W(6, 0.3, seed=2)
    active = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    g = torch.randn(3, 6, dtype=torch.float64)
    y = direct_adjoint(W, active, g)
    # y = D (W^T y + g)
    assert torch.allclose(y, active.double() * (y @ W + g), atol=1e-12)


def test_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(0)
    cfg = MonDEQConfig(
        in_features=7,
        hidden=6,
        out_features=3,
        solver=SolverConfig(method="pr", tol=1e-10).as_dict(),
    )
    net = MonDEQClassifier(cfg).double()
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    names = {
        name
        for name, p in net.named_parameters()
        if p.grad is not None
        and bool(torch.isfinite(p.grad).all())
        and float(p.grad.abs().sum()) > 0
    }
    assert {
        "layer.A",
        "layer.B",
        "layer.m_raw",
        "layer.U.weight",
        "layer.U.bias",
        "head.weight",
        "head.bias",
    } <= names
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_unconverged_backward_is_counted():
    W = random_monotone_W(10, 0.05, seed=1).requires_grad_(True)
    q = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    eq = EquilibriumSolver(SolverConfig(method="fb", tol=1e-12, max_iter=5))
    eq(W, q).sum().backward()
    s = eq.counters.summary()
    assert s["forward_unconverged"] == 4 and s["backward_unconverged"] > 0


@pytest.mark.parametrize("kind", ["dense", "conv", "multitier"])
def test_a_layer_deep_copies_right_after_a_training_step(kind):
    import copy

    from monquant.nn import ConvMonDEQ, MonDEQ, MultiTierMonDEQ

    torch.manual_seed(0)
    if kind == "dense":
        layer, x = MonDEQ(6, 5), torch.rand(4, 6)
    elif kind == "conv":
        layer, x = ConvMonDEQ(1, 2, (8, 8)), torch.rand(4, 1, 8, 8)
    else:
        layer, x = MultiTierMonDEQ(1, channels=(2, 2), image=(12, 12)), torch.rand(4, 1, 12, 12)
    opt = torch.optim.Adam(layer.parameters(), 1e-3)
    layer(x).square().sum().backward()
    opt.step()
    twin = copy.deepcopy(layer)  # the kept solver result holds no graph node
    assert layer.solver.last_forward is not None and layer.solver.last_forward.z.grad_fn is None
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


def test_configured_solves_with_the_given_settings_and_restores_its_own():
    own = SolverConfig(tol=1e-6)
    solver = EquilibriumSolver(forward_config=own)
    W = torch.eye(4, dtype=torch.float64) * 0.5
    q = torch.ones(2, 4, dtype=torch.float64)
    with solver.configured(SolverConfig(method="fb", tol=1e-3)):
        solver(W, q)
        assert solver.last_forward.method == "fb" and solver.last_forward.tol == 1e-3
    assert solver.forward_config is own
    with pytest.raises(RuntimeError), solver.configured(SolverConfig(method="dr")):
        raise RuntimeError("a failure inside the block")
    assert solver.forward_config is own


def test_training_solves_start_their_checks_where_the_previous_solve_of_their_side_stopped():
    """Under ``spectral="estimate"`` each forward (adjoint) solve makes its first check at nine
    tenths of the previous forward (adjoint) solve's iterations; exact solves and a solver after
    ``reset`` start cold."""
    import monquant.implicit as implicit

    W = random_monotone_W(20, 0.1, seed=3).float().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    calls: list[tuple[bool, int | None, int]] = []

    def spy(*a, **kw):
        r = solve(*a, **kw)
        calls.append(("prox" in kw, kw.get("first_check"), r.iterations))
        return r

    for spectral in ("estimate", "exact"):
        solver = EquilibriumSolver(SolverConfig(tol=1e-6, spectral=spectral))
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(implicit, "solve", spy)
            for step in range(3):
                if step == 2:
                    solver.reset()
                q = torch.randn(8, 20, generator=g).requires_grad_(True)
                solver(W, q).sum().backward()
        assert len(calls) == 6
        for adjoint in (False, True):
            side = [c for c in calls if c[0] == adjoint]
            expected = [None, max(9 * side[0][2] // 10, 1), None] if spectral == "estimate" else [None] * 3
            assert [c[1] for c in side] == expected


def test_step_from_caps_an_estimated_step_and_changes_nothing_else():
    """Under ``spectral="estimate"`` a solve given ``step_from`` takes the smaller of the geometric
    steps of its own and of that operator's estimated constants (forward and adjoint); its
    equilibrium and gradients are still ``W``'s. Exact constants are always ``W``'s own:
    ``step_from`` changes nothing there."""
    from monquant.solvers import StepEstimates, get_solver, solver_step

    W = random_monotone_W(16, 0.05, seed=1)
    tighter = random_monotone_W(16, 0.6, seed=2)  # a larger margin: a smaller geometric step
    looser = random_monotone_W(16, 0.01, seed=3)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 16, generator=g, dtype=torch.float64)

    def geometric(A: torch.Tensor) -> float:
        st = StepEstimates()(A)
        return solver_step(get_solver("pr"), "geometric", st.m, st.L)

    out = {}
    for spectral in ("estimate", "exact"):
        for name, step_from in (("own", None), ("tighter", tighter), ("looser", looser)):
            solver = EquilibriumSolver(SolverConfig(tol=1e-12, spectral=spectral, step_policy="geometric"))
            Wp, qp = W.clone().requires_grad_(True), q.clone().requires_grad_(True)
            z = solver(Wp, qp, step_from=step_from)
            (z * torch.arange(16, dtype=z.dtype)).sum().backward()
            out[spectral, name] = (solver.last_forward.step, solver.last_backward.step, z.detach(),
                                   Wp.grad, qp.grad)  # fmt: skip
    assert geometric(tighter) < geometric(W) < geometric(looser)
    assert out["estimate", "tighter"][:2] == (geometric(tighter),) * 2
    assert out["estimate", "looser"][:2] == out["estimate", "own"][:2] == (geometric(W),) * 2
    assert out["exact", "tighter"][:2] == out["exact", "own"][:2]
    for spectral in ("estimate", "exact"):
        for a, b in zip(out[spectral, "tighter"][2:], out[spectral, "own"][2:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
