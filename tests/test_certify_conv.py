"""Conv certificates proved from the Fourier blocks (monquant.certify_conv) against the dense
certificate of the same operator (its matrix built by applying it to basis vectors)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monquant.certify import certify
from monquant.certify_conv import certify_conv, conv_spectral_bounds, proved_blocks, twiddles
from monquant.operators.conv import CircularConvOperator, fourier_blocks
from monquant.quant.uniform import quantize


def kernel(c: int, k: int, seed: int, centre: float = 0.35, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    K = scale * torch.randn(c, c, k, k, generator=g, dtype=torch.float64)
    K[:, :, k // 2, k // 2] += centre * torch.eye(c, dtype=torch.float64)
    return K


def dense(K: torch.Tensor, image) -> torch.Tensor:
    return CircularConvOperator(K, image).dense()


def test_twiddles_are_enclosed() -> None:
    for N in (1, 5, 28):
        t, delta = twiddles(N)
        exact = torch.exp(2j * math.pi * torch.arange(N, dtype=torch.float64) / N)
        assert float((t - exact).abs().max()) <= delta + 1e-15 and delta < 1e-15


def test_proved_blocks_match_the_fft_within_their_bound() -> None:
    K = kernel(3, 5, 1)
    blocks, e = proved_blocks(K, (7, 6))
    fft = fourier_blocks(K, (7, 6))[:, : 6 // 2 + 1]
    assert float(torch.linalg.matrix_norm(blocks - fft, 2).max()) <= e + 1e-13
    assert e < 1e-13


@settings(max_examples=10, deadline=None)
@given(c=st.integers(1, 3), k=st.sampled_from([3, 5]), H=st.integers(5, 7), W=st.integers(5, 7),
       seed=st.integers(0, 500), centre=st.sampled_from([-0.8, 0.0, 0.35, 0.6]))  # fmt: skip
def test_proved_bounds_enclose_the_dense_values(c, k, H, W, seed, centre) -> None:
    K = kernel(c, k, seed, centre)
    D = dense(K, (H, W))
    n = D.shape[0]
    S = torch.eye(n, dtype=torch.float64) - D
    m = float(torch.linalg.eigvalsh(0.5 * (S + S.T))[0])
    L = float(torch.linalg.matrix_norm(S, 2))
    nw = float(torch.linalg.matrix_norm(D, 2))
    b = conv_spectral_bounds(K, (H, W))
    assert b.m_lo <= m <= b.m_hi and b.m_hi - b.m_lo < 1e-9
    assert L <= b.L_hi <= L * (1 + 1e-9) + 1e-12
    assert nw <= b.norm_hi <= nw * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 10])
def test_conv_certificate_agrees_with_the_dense_certificate(bits, granularity) -> None:
    K = kernel(2, 3, 3)
    image = (6, 5)
    c = certify_conv(K, image, bits, granularity)
    Kt = quantize(K, bits, granularity).dequantized()
    d = certify(dense(K, image), W_tilde=dense(Kt, image))
    assert c.verdict == d.verdict
    assert c.certified_weyl == d.certified_weyl and c.certified_exact == d.certified_exact
    assert c.margin_quantized_lower == pytest.approx(d.margin_quantized_lower, abs=1e-9)
    true_dW = float(torch.linalg.matrix_norm(dense(Kt, image) - dense(K, image), 2))
    assert true_dW <= c.dW_norm_upper <= true_dW * (1 + 1e-8) + 1e-12
    assert c.n == 2 * 6 * 5 and c.bits == bits and c.granularity == granularity


def test_a_refuted_and_a_certified_kernel() -> None:
    bad = kernel(2, 3, 4, centre=1.3)  # sym(I - W) has a negative eigenvalue
    assert certify_conv(bad, (6, 6), 8).verdict == "refuted"
    good = kernel(2, 3, 4, centre=0.2)
    cert = certify_conv(good, (6, 6), 12)
    assert cert.verdict == "certified" and cert.certified_a_priori


def test_cli_certifies_a_kernel_file_with_the_dense_json_keys(tmp_path, capsys) -> None:
    import json

    import numpy as np

    from monquant.cli import main

    K = kernel(2, 3, 5)
    np.savez(tmp_path / "k.npz", W=K.numpy())
    np.savez(tmp_path / "w.npz", W=dense(K, (6, 6)).numpy())
    assert main(["certify", str(tmp_path / "k.npz"), "--image-size", "6", "6", "--bits", "3", "6",
                 "--granularity", "per-channel", "--json", "--no-progress"]) == 0  # fmt: skip
    conv = json.loads(capsys.readouterr().out)
    assert main(["certify", str(tmp_path / "w.npz"), "--bits", "3", "--json", "--no-progress"]) == 0
    dense_keys = set(json.loads(capsys.readouterr().out)[0])
    assert [c["bits"] for c in conv] == [3, 6] and set(conv[0]) == dense_keys
    assert all(c["verdict"] in ("certified", "refuted", "undecided") for c in conv)
