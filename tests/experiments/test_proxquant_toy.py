"""The ProxQuant paper's one-dimensional BinaryConnect/ProxQuant example (experiments.proxquant_toy)."""

from __future__ import annotations

import itertools

import pytest

from monquant.experiments.proxquant_toy import (
    toy_binaryconnect_vs_proxquant,
    toy_grad,
    toy_objective,
)
from monquant.quant.prox import ProxQuantError


def test_toy_functions():
    assert toy_objective(-1.0, 1) == 0.0 and toy_objective(1.0, 1) == 1.0
    assert toy_objective(1.0, -1) == 0.0 and toy_objective(-1.0, -1) == 1.0
    for c in (1, -1):  # identical gradients at the binary points: what BinaryConnect sees
        assert toy_grad(1.0, c) == 1.0 and toy_grad(-1.0, c) == -1.0
    with pytest.raises(ProxQuantError):
        toy_objective(0.0, 2)


@pytest.mark.parametrize("x0", [0.0, 1e-3, 0.3])
def test_toy_proxquant_finds_the_binary_minimizers_binaryconnect_cannot(x0):
    steps = 1000
    res = toy_binaryconnect_vs_proxquant(steps=steps, lr=0.01, lam_max=4.0, x0=x0)
    # ProxQuant: -1 for f_1 and +1 for f_-1, exactly on the grid, and it stays there.
    assert res.proxquant == {1: -1.0, -1: 1.0}
    for c in (1, -1):
        assert set(res.proxquant_paths[c][-100:]) == {-float(c)}
        assert toy_objective(res.proxquant[c], c) == 0.0
    # BinaryConnect: the very same iterates on both functions ...
    assert res.binaryconnect_paths[1] == res.binaryconnect_paths[-1]
    assert res.binaryconnect[1] == res.binaryconnect[-1]
    assert res.binaryconnect_quantized[1] == res.binaryconnect_quantized[-1]
    # ... so it is wrong on one of them, and it does not converge: the sign flips every step.
    assert max(toy_objective(res.binaryconnect_quantized[c], c) for c in (1, -1)) == 1.0
    tail = [1 if v >= 0 else -1 for v in res.binaryconnect_paths[1][-101:]]
    assert all(a != b for a, b in itertools.pairwise(tail))
    assert max(abs(v) for v in res.binaryconnect_paths[1][-100:]) <= 0.01 + 1e-12


def test_toy_bc_answer_depends_on_step_parity_not_on_the_function():
    odd = toy_binaryconnect_vs_proxquant(steps=999)
    even = toy_binaryconnect_vs_proxquant(steps=1000)
    assert odd.binaryconnect_quantized == {1: -1.0, -1: -1.0}
    assert even.binaryconnect_quantized == {1: 1.0, -1: 1.0}
    with pytest.raises(ProxQuantError):
        toy_binaryconnect_vs_proxquant(steps=0)
