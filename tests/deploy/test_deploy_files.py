"""Deployment files: bit packing, export/load roundtrip, tampering, certification, the experiment."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from monquant.certify import certify
from monquant.deploy.files import (
    export_deployment,
    export_float_checkpoint,
    load_deployment,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)
from monquant.deploy.fixedpoint import quantize_weights
from monquant.deploy.intsolver import (
    IntFBSolver,
    UncertifiedOperatorError,
    bias_codes,
    injection_from_codes,
)
from monquant.errors import CheckpointError
from monquant.experiments.integer.report import write_report
from monquant.experiments.integer.study import run_intdeploy
from monquant.operators import wk_weight
from monquant.storage.tensors import save_tensors

# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------

ALL_BITS = [2, 3, 4, 5, 6, 7, 8, 12, 16, 32]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_roundtrip_bit_exact(bits: int, signed: bool) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    g = torch.Generator().manual_seed(bits)
    count = 1001  # not a multiple of 8: exercises the padded last byte
    codes = torch.randint(lo, hi + 1, (count,), generator=g, dtype=torch.int64)
    codes[:2] = torch.tensor([lo, hi])  # the extremes
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(packed, bits, count, signed), codes)


def test_pack_layout_is_little_endian_two_complement() -> None:
    packed = pack_codes(torch.tensor([1, -1, 0, 1]), 2)  # 01, 11, 00, 01 from the low bit up
    assert packed.tolist() == [0b01_00_11_01]
    assert pack_codes(torch.tensor([-8, 7]), 4).tolist() == [0x78]
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0b11_010_001, 0b0]  # 9 bits


def test_pack_rejects_out_of_range_and_bad_streams() -> None:
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.tensor([-1]), 4, signed=False)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


# ----------------------------------------------------------------------------------------------
# Export and load
# ----------------------------------------------------------------------------------------------


def small_model(n: int = 16, d: int = 12, classes: int = 4, m: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    U = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    hw = torch.randn(classes, n, generator=g, dtype=torch.float64)
    hb = 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    return wk_weight(A, B, m), U, b, hw, hb, x


@pytest.mark.parametrize(
    ("bits", "granularity"), [(4, "per-tensor"), (6, "per-channel"), (8, "per-tensor")]
)
def test_export_load_reproduces_codes_and_solver(
    tmp_path: Path, bits: int, granularity: str
) -> None:
    W, U, b, hw, hb, x = small_model()
    res = export_deployment(
        tmp_path / "d.safetensors", W, U, b, hw, hb, bits, 12, x_calib=x, granularity=granularity
    )
    assert res.certified and res.nbytes == res.path.stat().st_size
    dep = load_deployment(res.path)
    Wi, Ui = quantize_weights(W, bits, granularity), quantize_weights(U, bits, granularity)
    assert torch.equal(dep.W.codes, Wi.codes) and dep.W.codes.dtype == Wi.codes.dtype
    assert torch.equal(dep.U.codes, Ui.codes)
    assert torch.equal(dep.W.scale.multiplier, Wi.scale.multiplier)
    assert dep.W.scale.shift == Wi.scale.shift
    assert torch.equal(dep.bias_codes, bias_codes(b, Ui.scale.shift + dep.input_format.frac_bits))
    # the loaded deployment runs exactly the integer solver built from the original weights
    solver = IntFBSolver.build(Wi, dep.solver.act, max_iter=dep.solver.max_iter)
    assert solver.step == dep.solver.step
    inj, _ = injection_from_codes(Ui, dep.input_format.encode(x), dep.input_format, dep.bias_codes)
    logits, report = dep.run(x)
    assert torch.equal(report.result.codes, solver.solve(inj).codes)
    assert logits.shape == (x.shape[0], hw.shape[0]) and logits.dtype == torch.float32
    assert torch.equal(dep.predict(x), logits.argmax(dim=1))


def test_metadata_records_settings_and_certificate(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model()
    res = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 8, 16, x_calib=x)
    meta = load_deployment(res.path).metadata
    assert meta["W"]["bits"] == 8 and meta["W"]["shape"] == [16, 16]
    assert meta["activation_format"]["bits"] == 16 and not meta["activation_format"]["signed"]
    sv = meta["solver"]
    assert sv["step"] == 2.0 ** -sv["step_shift"] and sv["certified"] and 0 < sv["rho"] < 1
    assert meta["certificate"]["bits"] == 8 and meta["certificate"]["certified_exact"]
    json.dumps(meta)  # plain JSON


def test_run_reports_distance_inside_certified_radius(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model(seed=1)
    res = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 6, 12, x_calib=x)
    _, report = load_deployment(res.path).run(x, reference=True)
    rows = report.per_sample()
    assert len(rows) == len(report) == x.shape[0]
    for r in rows:
        assert r["settled"]
        assert r["distance_to_float"] <= r["certified_radius"] + r["reference_error"]
    assert report.summary()["settled_fraction"] == 1.0


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_tampered_file_is_rejected(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model()
    path = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 4, 12, x_calib=x).path
    raw = bytearray(path.read_bytes())
    raw[8 + _header_len(path) + 5] ^= 0x10  # one bit of the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="tampered"):
        load_deployment(path)


def test_tampered_metadata_is_rejected(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model()
    path = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 4, 12, x_calib=x).path
    raw = path.read_bytes()
    forged = raw.replace(b'\\"step_shift\\": ', b'\\"step_shift\\":')  # same JSON, other bytes
    assert forged != raw
    n = _header_len(path) - 1
    path.write_bytes(struct.pack("<Q", n) + forged[8:])
    with pytest.raises(CheckpointError, match="tampered"):
        load_deployment(path)


def test_other_files_are_refused(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"kind": "something"})
    with pytest.raises(CheckpointError, match="not a monquant integer deployment"):
        load_deployment(path)


def test_uncertified_weights_refused_or_flagged(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model()
    bad = W + 1.5 * torch.eye(W.shape[0], dtype=torch.float64)  # margin(W) = 0.5 - 1.5 < 0
    with pytest.raises(UncertifiedOperatorError, match="not certified"):
        export_deployment(
            tmp_path / "u.safetensors", bad, U, b, hw, hb, 8, 12, act_frac_bits=6, x_calib=x
        )
    res = export_deployment(
        tmp_path / "u.safetensors", bad, U, b, hw, hb, 8, 12, act_frac_bits=6, x_calib=x,
        require_certified=False,
    )  # fmt: skip
    assert not res.certified and res.metadata["solver"]["certified"] is False
    dep = load_deployment(res.path)
    assert not dep.certified
    with pytest.raises(UncertifiedOperatorError):
        dep.run(x)
    dep.solver.max_iter = 3
    _, report = dep.run(x, allow_uncertified=True)
    assert math.isinf(report.per_sample()[0]["certified_radius"])


def test_size_on_disk_shrinks_with_packing(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model(n=32, d=64)
    f32 = export_float_checkpoint(tmp_path / "f.safetensors", W, U, b, hw, hb).nbytes
    sizes = {}
    for bits in (2, 4, 8):
        res = export_deployment(
            tmp_path / f"d{bits}.safetensors", W, U, b, hw, hb, bits, 12, x_calib=x,
            require_certified=False,
        )  # fmt: skip
        sizes[bits] = res.nbytes
        codes = packed_nbytes(W.numel(), bits) + packed_nbytes(U.numel(), bits)
        assert load_deployment(res.path).metadata["W"]["bits"] == bits
        assert codes == (W.numel() + U.numel()) * bits // 8
    assert sizes[2] < sizes[4] < sizes[8] < f32
    # the code bytes alone shrink by exactly 2x per halving of the bit-width
    assert sizes[8] - sizes[4] >= 0.9 * (W.numel() + U.numel()) / 2


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def test_run_intdeploy_writes_report(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model(n=12, d=10, m=0.05, seed=4)
    y = torch.randint(0, hw.shape[0], (x.shape[0],), generator=torch.Generator().manual_seed(0))
    res = run_intdeploy(
        tmp_path, W, U, b, hw, hb, x, y, weight_bits=(2, 8), act_bits=(8, 12), max_iter=3000,
    )  # fmt: skip
    assert not (tmp_path / "report.md").exists()  # the study returns data; the report renders
    res = write_report(tmp_path, res)
    for name in ("report.md", "results.json", "intdeploy.png", "intdeploy.pdf"):
        assert (tmp_path / name).is_file()
    rows = res["table"]
    assert len(rows) == 4
    flagged = [r for r in rows if not r["certified"]]
    ran = [r for r in rows if r["certified"]]
    assert flagged and all(
        r["status"] == "not certified" and r["worst_ratio"] is None for r in flagged
    )
    assert ran and all(r["status"] == "ok" for r in ran)
    assert all(r["fraction_inside"] == 1.0 and r["worst_ratio"] <= 1.0 for r in ran)
    assert all(r["fraction_cor2"] == 1.0 for r in ran)
    assert [s["bits"] for s in res["sizes"]] == [2, 4, 8]
    assert all(s["codes_roundtrip_exact"] for s in res["sizes"])  # tiny model: header dominates
    assert "not certified" in (tmp_path / "report.md").read_text()


def test_deployment_certificate_is_for_the_deployed_dyadic_operator(tmp_path: Path) -> None:
    W, U, b, hw, hb, x = small_model()
    res = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 6, 12, x_calib=x)
    cert = res.metadata["certificate"]
    Wi = quantize_weights(W, 6)
    ref = certify(W, W_tilde=Wi.dequantized())  # codes * M 2^-S, exact in float64
    assert cert["operator"].startswith("codes * M 2^-S")
    assert cert["margin_quantized"] == ref.margin_quantized
    assert cert["margin_quantized_lower"] == ref.margin_quantized_lower
    assert cert["verdict"] == "certified" and cert["bits"] == 6
    assert res.metadata["solver"]["margin_quantized_lower"] > 0


def test_a_validly_signed_file_with_a_wrong_head_is_refused_by_name(tmp_path: Path) -> None:
    from monquant.storage.tensors import load_tensors

    W, U, b, hw, hb, x = small_model()
    path = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 4, 12, x_calib=x).path
    tensors, meta = load_tensors(path)
    tensors = dict(tensors)
    tensors["head.weight"] = torch.zeros(3, 7)  # wrong width (n = 16)
    bad = save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=r"head\.weight \(3, 7\)"):
        load_deployment(bad)


def test_the_step_rule_is_recorded_in_the_deployment_file(tmp_path) -> None:
    from monquant.deploy.files import export_deployment, load_deployment
    from monquant.deploy.fixedpoint import quantize_weights

    g = torch.Generator().manual_seed(3)
    n, d = 12, 6
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    W = 0.5 * torch.eye(n, dtype=torch.float64) - 0.1 * A.T @ A + 0.2 * (B - B.T)
    U = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    hw, hb = torch.randn(3, n), torch.zeros(3)
    x = torch.rand(20, d, dtype=torch.float64)
    res = export_deployment(tmp_path / "d.safetensors", W, U, b, hw, hb, 8, 16, x_calib=x,
                            step_rule="narrow")  # fmt: skip
    assert res.metadata["W"]["step_rule"] == "narrow"
    dep = load_deployment(res.path)
    assert dep.W.step_rule == "narrow"
    assert torch.equal(dep.W.codes, quantize_weights(W, 8, step_rule="narrow").codes)
    assert not torch.equal(dep.W.codes, quantize_weights(W, 8).codes)
