"""Numbers pinned against the implementation before the operator core (commit 3e8e88e).

The operator redesign (issue 11) must keep the dense results bit-for-bit or to float tolerance: a
few certificate numbers, solver iteration counts and equilibria, and a short training run's loss,
recorded with the previous implementation and written here as literals.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_monotone_W

from monquant.certify import certify
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.solvers import SolverConfig, solve

CERTS = {
    "cert4": {
        "margin": 0.20100993680685258,
        "L": 3.9575416005135757,
        "dW_norm": 0.38097006692900615,
        "margin_quantized": 0.11512773915232756,
        "margin_lower": 0.2010099368061913,
        "dW_norm_upper": 0.38097006692905183,
        "margin_quantized_lower": 0.11512773915162135,
        "rho_pr_exact": 0.9855595269794146,
        "tier": "exact",
        "verdict": "certified",
    },
    "cert6": {
        "margin": 0.20100993680685258,
        "L": 3.9575416005135757,
        "dW_norm": 0.09058425397727099,
        "margin_quantized": 0.18220135487280112,
        "margin_lower": 0.2010099368061913,
        "dW_norm_upper": 0.09058425397728208,
        "margin_quantized_lower": 0.18220135487212955,
        "rho_pr_exact": 0.9767043283621197,
        "tier": "weyl",
        "verdict": "certified",
    },
    "cert8": {
        "margin": 0.20100993680685258,
        "L": 3.9575416005135757,
        "dW_norm": 0.02197749454904409,
        "margin_quantized": 0.19729383639608683,
        "margin_lower": 0.2010099368061913,
        "dW_norm_upper": 0.021977494549046784,
        "margin_quantized_lower": 0.19729383639542397,
        "rho_pr_exact": 0.974739462619055,
        "tier": "a_priori",
        "verdict": "certified",
    },
}

SOLVES = {
    "solve_fb": {"iterations": 1556, "z_sum": 40.50809925744783, "err": 1.887235259051726e-05},
    "solve_pr": {"iterations": 55, "z_sum": 40.508103908119836, "err": 7.5335905219669914e-06},
    "solve_dr": {"iterations": 107, "z_sum": 40.508103759608275, "err": 2.5402025172975097e-06},
}

TRAIN_LOSSES = [1.1016757488250732, 1.0962156057357788, 1.0910252332687378]


def test_dense_certificate_numbers_are_unchanged():
    W = random_monotone_W(30, 0.2, seed=11)
    for key, ref in CERTS.items():
        c = certify(W, int(key[4:])).to_dict()
        for k, v in ref.items():
            if isinstance(v, float):
                assert c[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (key, k)
            else:
                assert c[k] == v, (key, k)


def test_dense_solves_are_unchanged():
    W = random_monotone_W(30, 0.2, seed=11)
    q = torch.randn(5, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for key, ref in SOLVES.items():
        r = solve(W, q, SolverConfig(key[6:], tol=1e-8, max_iter=5000, check_every=1))
        assert r.iterations == ref["iterations"], key
        assert float(r.z.sum()) == pytest.approx(ref["z_sum"], rel=1e-12)
        assert float(r.error_bound.max()) == pytest.approx(ref["err"], rel=1e-9)


def test_short_training_run_loss_is_unchanged():
    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(in_features=12, hidden=10, out_features=3))
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.1 * g
        losses.append(float(loss.detach()))
    assert losses == pytest.approx(TRAIN_LOSSES, rel=1e-6)
