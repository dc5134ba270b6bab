"""Multi-tier certificates (monquant.certify_multitier): every proved bound encloses the dense
value of the same operator (||dW||, L, ||W||, margin(W~) from above), the composition error is
proved and tiny, verdicts agree with the dense margin of W~ wherever they are decided, and
explicit quantized operators and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.certify_multitier import (
    certify_multitier,
    composition_error,
    min_certified_bits_multitier,
    multitier_float_bounds,
    quantize_multitier,
)
from monquant.errors import ConfigError
from monquant.operators.matrix import margin
from monquant.operators.multitier import MultiTierConvOperator, MultiTierWKOperator

F64 = torch.float64


def wk(channels, image, seed, m=0.3, scale=0.15, dtype=torch.float32) -> MultiTierWKOperator:
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).to(dtype)

    T = len(channels)
    P = [r(c, c, 3, 3) for c in channels]
    Q = [r(channels[i], channels[i + 1], 3, 3) for i in range(T - 1)]
    B = [r(c, c, 3, 3) for c in channels]
    return MultiTierWKOperator(P, Q, B, m, image)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), ch=st.sampled_from([(1, 2), (2, 1), (1, 2, 1)]),
       bits=st.sampled_from([3, 4, 6, 8]), gran=st.sampled_from(["per-tensor", "per-channel"]))  # fmt: skip
def test_proved_bounds_enclose_the_dense_values(seed, ch, bits, gran) -> None:
    image = (10, 10) if len(ch) == 2 else (20, 20)
    op = wk(ch, image, seed)
    fb = multitier_float_bounds(op)
    D = op.to(F64).dense()
    n = D.shape[0]
    eye = torch.eye(n, dtype=F64)
    assert 0 <= fb.e_comp < 1e-10
    assert fb.bounds.m_lo <= margin(D) <= fb.bounds.m_hi
    assert fb.bounds.L_hi >= float(torch.linalg.matrix_norm(eye - D, 2))
    assert fb.bounds.norm_hi >= float(torch.linalg.matrix_norm(D, 2))
    cert = certify_multitier(op, bits, gran, float_bounds=fb)
    tilde, _ = quantize_multitier(fb.comp, bits, gran)
    Dq = tilde.dense()
    dW = float(torch.linalg.matrix_norm(Dq - D, 2))
    mq = margin(Dq)
    assert cert.dW_norm_upper >= dW  # an upper bound: never below the dense ||dW||
    assert cert.dW_norm_upper <= 1.5 * dW + 1e-9  # and not a useless one
    assert cert.a_priori_bound >= dW
    assert cert.margin_quantized_lower <= mq <= cert.margin_quantized_upper
    assert cert.L_quantized_upper >= float(torch.linalg.matrix_norm(eye - Dq, 2))
    assert cert.n == n
    if cert.verdict == "certified":
        assert mq > 0 and cert.tier in ("weyl", "a_priori")
    elif cert.verdict == "refuted":
        assert mq < 0


def test_verdicts_across_bits_and_min_bits() -> None:
    op = wk((2, 3, 2), (20, 20), seed=0)
    D = op.to(F64).dense()
    fb = multitier_float_bounds(op)
    seen = set()
    for b in (3, 6, 8):
        c = certify_multitier(op, b, "per-tensor", float_bounds=fb)
        seen.add(c.verdict)
        tilde, _ = quantize_multitier(fb.comp, b, "per-tensor")
        assert c.dW_norm_upper >= float(torch.linalg.matrix_norm(tilde.dense() - D, 2))
    assert {"certified", "refuted"} <= seen  # 3 bits: a diagonal block is provably not monotone
    mb = min_certified_bits_multitier(op, bits_range=range(4, 12))
    assert mb["weyl"] in (5, 6) and mb["a_priori"] is not None and mb["a_priori"] >= mb["weyl"]
    assert mb["exact"] == mb["weyl"]  # no exact tier beyond Weyl for a multi-tier W~


def test_explicit_quantized_operator_and_rounding_of_the_composition() -> None:
    op = wk((1, 2), (10, 10), seed=4, dtype=F64)
    fb = multitier_float_bounds(op)
    same = certify_multitier(op, tilde=fb.comp, float_bounds=fb)
    assert same.verdict == "certified" and same.granularity == "explicit"
    assert same.dW_norm_upper == pytest.approx(fb.e_comp, abs=1e-12)  # only rounding is left
    assert composition_error(op) == fb.e_comp
    # a W~ that is provably not monotone on tier 0 (its diagonal block is 2 I) is refuted
    bad = MultiTierConvOperator([2.0 * torch.eye(1, dtype=F64).reshape(1, 1, 1, 1).expand(1, 1, 5, 5)
                                 * (torch.arange(25, dtype=F64).reshape(5, 5) == 12), fb.comp.diag[1]],
                                fb.comp.down, (10, 10))  # fmt: skip
    c = certify_multitier(op, tilde=bad, float_bounds=fb)
    assert c.verdict == "refuted" and c.margin_quantized_upper < 0
    assert math.isinf(c.margin_quantized_lower) or c.margin_quantized_lower < 0


def test_bad_input() -> None:
    op = wk((1, 2), (10, 10), seed=1)
    with pytest.raises(ConfigError, match="needs bits or tilde"):
        certify_multitier(op)
    other = wk((2, 2), (10, 10), seed=1)
    with pytest.raises(ConfigError, match="tiers of the float operator"):
        certify_multitier(op, tilde=other.composite())
