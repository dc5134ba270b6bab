"""The adversarial families and the exact oracle of monquant.testing."""

from __future__ import annotations

import pytest
import torch

from monquant.quant.uniform import quantize
from monquant.testing import (
    exact_boundary_case,
    exact_margin_sign,
    shifted_singular_case,
    transform_case,
    weyl_boundary_case,
)


def test_oracle_on_known_matrices():
    eye = torch.eye(3, dtype=torch.float64)
    assert exact_margin_sign(0.5 * eye) == 1  # sym(I - W) = I/2
    assert exact_margin_sign(eye) == 0  # sym(I - W) = 0
    assert exact_margin_sign(torch.diag(torch.tensor([0.5, 1.5, 0.0]).double())) == -1
    # a zero pivot with a non-zero row is indefinite: [[0, 1], [1, 0]]
    assert exact_margin_sign(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).double()) == -1
    # skew parts do not change the margin
    assert exact_margin_sign(torch.tensor([[0.5, 3.0], [-3.0, 0.5]]).double()) == 1


@pytest.mark.parametrize("family", [exact_boundary_case, weyl_boundary_case])
@pytest.mark.parametrize("n", [2, 5, 9])
def test_families_quantize_onto_their_singular_operator(family, n):
    case = family(n, seed=n)
    assert torch.equal(quantize(case.W, case.bits).dequantized(), case.W_tilde)
    assert exact_margin_sign(case.W_tilde) == 0
    moved = transform_case(case, 3)
    assert torch.equal(quantize(moved.W, moved.bits).dequantized(), moved.W_tilde)
    assert exact_margin_sign(moved.W_tilde) == 0


def test_shifted_singular_margin_has_the_stated_sign():
    for n in (1, 3, 6):
        assert exact_margin_sign(shifted_singular_case(n, 20, 1, seed=n)) == 1
        assert exact_margin_sign(shifted_singular_case(n, 20, -1, seed=n)) == -1
        assert exact_margin_sign(shifted_singular_case(n, None, 1, seed=n)) == 0


def test_families_refuse_sizes_they_cannot_build():
    with pytest.raises(ValueError):
        weyl_boundary_case(1)
    with pytest.raises(ValueError, match="bits"):
        exact_boundary_case(600, bits=8)
