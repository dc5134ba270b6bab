import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monquant.quant.iterate import AdaptiveCellQuantizer, FixedCellQuantizer
from monquant.quant.uniform import QuantizationError, check_bits, fake_quant, quantize, storage_bits


def _w(rows, cols, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale


@given(
    bits=st.integers(2, 16),
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    gran=st.sampled_from(["per-tensor", "per-channel"]),
    scale=st.floats(1e-3, 1e3),
)
def test_quantizer_properties(bits, seed, rows, cols, gran, scale):
    w = _w(rows, cols, seed, scale)
    q = quantize(w, bits, gran)
    wq = q.dequantized()
    qmax = 2 ** (bits - 1) - 1
    # codes fit b signed bits and there are at most 2^b - 1 levels
    assert int(q.codes.abs().max()) <= qmax
    assert torch.unique(q.codes).numel() <= 2**bits - 1
    # error <= D/2 inside the range (per row for per-channel)
    step = q.step if gran == "per-channel" else q.step.expand(rows, 1)
    err = (wq - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-9) + 1e-300).all())
    # the step is the paper's
    assert float(q.step.max()) == pytest.approx(2 * float(w.abs().max()) / (2**bits - 1))
    # idempotent with the range held fixed
    q2 = quantize(wq, bits, gran, w_max=q.w_max)
    assert torch.equal(q2.codes, q.codes)


@given(bits=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_per_channel_is_never_coarser_than_per_tensor(bits, seed):
    w = _w(8, 10, seed) * torch.linspace(0.1, 3.0, 8, dtype=torch.float64)[:, None]
    qt, qc = quantize(w, bits, "per-tensor"), quantize(w, bits, "per-channel")
    assert bool((qc.step.reshape(-1) <= qt.step * (1 + 1e-12)).all())
    # row by row, the per-channel worst-case error bound is at most the per-tensor one, and the
    # realised per-channel error respects it
    err_c = (qc.dequantized() - w).abs().max(dim=1).values
    assert bool((err_c <= qt.step / 2 * (1 + 1e-9)).all())


def test_code_dtypes_and_32_bits():
    w = _w(4, 4, 0)
    assert quantize(w, 8).codes.dtype == torch.int8
    assert quantize(w, 12).codes.dtype == torch.int16
    q32 = quantize(w, 32)
    assert q32.codes.dtype == torch.int32
    assert float((q32.dequantized() - w).abs().max()) <= float(q32.step) / 2 * (1 + 1e-9)


@pytest.mark.parametrize("bad", [0, 1, 33, -4, 2.5, True, "8", None, float("nan")])
def test_bad_bit_widths_are_refused(bad):
    with pytest.raises(QuantizationError):
        check_bits(bad)
    with pytest.raises(QuantizationError):
        quantize(_w(2, 2, 0), bad)


def test_bad_inputs():
    with pytest.raises(QuantizationError):
        quantize(torch.tensor([[float("nan"), 1.0]]), 4)
    with pytest.raises(QuantizationError):
        quantize(_w(2, 2, 0), 4, "per-block")
    with pytest.raises(QuantizationError):
        quantize(torch.ones(2, 2, dtype=torch.int32), 4)


def test_all_zero_tensor_and_zero_row():
    z = torch.zeros(3, 3)
    q = quantize(z, 4)
    assert float(q.step) == 0 and torch.equal(q.dequantized(), z)
    w = _w(3, 3, 1)
    w[1] = 0
    qc = quantize(w, 4, "per-channel")
    assert torch.equal(qc.dequantized()[1], torch.zeros(3, dtype=w.dtype))


def test_ste_gradient_is_one_inside_range_bounds_included():
    w = torch.tensor([[-2.0, 0.3], [1.1, 2.0]], requires_grad=True)  # +-2 sit on the bounds
    out = fake_quant(w, 3)
    assert torch.equal(out.detach(), quantize(w.detach(), 3).dequantized())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
def test_ste_passes_the_gradient_unchanged(gran):
    # every entry lies inside its own range (max |w|, per tensor or per row): the clip is the identity
    w = torch.tensor([[-2.0, 0.3, 1.0], [1.1, 0.5, -0.25]], requires_grad=True)
    g = torch.tensor([[0.5, -1.5, 2.0], [-0.0, 3.0, 1e-30]])
    fake_quant(w, 3, gran).backward(g)
    assert torch.equal(w.grad, g)


def test_storage_bits():
    assert storage_bits((100, 100), 4, "per-tensor") == 100 * 100 * 4 + 32
    assert storage_bits((100, 100), 4, "per-channel") == 100 * 100 * 4 + 100 * 32


def test_iterate_quantizers():
    z_prev = torch.zeros(50, dtype=torch.float64)
    z_next = torch.randn(50, dtype=torch.float64)
    fq = FixedCellQuantizer(0.1)
    e = (fq(z_prev, z_next, 0) - z_next).norm()
    assert float(e) <= fq.error_bound(0, 50)
    aq = AdaptiveCellQuantizer(0.1, 0.5)
    for k in range(5):
        e = (aq(z_prev, z_next, k) - z_next).norm()
        assert float(e) <= aq.error_bound(k, 50) + 1e-15
    assert aq.cell(3) == pytest.approx(0.1 * 0.125)
    with pytest.raises(QuantizationError):
        AdaptiveCellQuantizer(0.1, 1.0)
    assert math.isclose(fq.error_bound(0, 4), 0.1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12])
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
def test_narrow_step_rule(bits: int, gran: str) -> None:
    from monquant.quant.uniform import step_size

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    paper, narrow = quantize(w, bits, gran), quantize(w, bits, gran, step_rule="narrow")
    qmax = 2 ** (bits - 1) - 1
    assert narrow.step_rule == "narrow" and paper.step_rule == "paper"
    assert torch.allclose(narrow.step, narrow.w_max / qmax, rtol=0, atol=0)
    assert torch.equal(paper.step, 2 * paper.w_max / (2**bits - 1))
    assert bool((narrow.step >= paper.step).all())  # narrow is the coarser grid
    # the narrow rule's top level is w_max itself, and it is idempotent
    top = narrow.codes.to(torch.int64).abs().reshape(12, -1).max(dim=1).values
    assert int(top.max()) == qmax
    again = quantize(narrow.dequantized(), bits, gran, step_rule="narrow")
    assert torch.equal(again.dequantized(), narrow.dequantized())
    for q in (paper, narrow):
        assert bool(((q.dequantized() - w).abs() <= q.step / 2 * (1 + 1e-12)).all())
    assert step_size(1.0, bits, "narrow") == 1.0 / qmax


def test_unknown_step_rule_is_refused() -> None:
    with pytest.raises(QuantizationError, match="step rule"):
        quantize(torch.eye(3, dtype=torch.float64), 4, step_rule="wide")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("rule", ["paper", "narrow"])
def test_fake_quant_is_the_quantizers_dequantized_tensor_bit_for_bit(dtype, gran, rule):
    """The fake quantizer (float64 codes times the step) forms exactly ``quantize(w).dequantized()``
    (the operator that certificates certify), ties to even included; its STE mask is all ones."""
    g = torch.Generator().manual_seed(7)
    for bits in (2, 4, 8, 12, 20, 32):
        w = (torch.randn(9, 13, generator=g, dtype=torch.float64) * 3).to(dtype)
        w[0, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5], dtype=dtype)  # halves of some steps
        w[1] = 0.0  # a zero row: step 0 per channel
        ref = quantize(w, bits, gran, step_rule=rule).dequantized()
        leaf = w.clone().requires_grad_(True)
        out = fake_quant(leaf, bits, gran, step_rule=rule)
        assert out.dtype == dtype and torch.equal(out, ref), (bits, gran, rule)
        out.sum().backward()
        assert torch.equal(leaf.grad, torch.ones_like(w))


@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_are_refused_through_the_range(gran, bad):
    w = _w(4, 5, 1)
    w[2, 3] = bad
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize(w, 4, gran)
    with pytest.raises(QuantizationError, match="NaN or inf"):
        fake_quant(w, 4, gran)
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize(w, 4, gran, w_max=1.0)  # a given range: the entries are checked themselves
