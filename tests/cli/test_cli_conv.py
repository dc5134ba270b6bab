"""``monquant train --arch conv`` and the commands that take its checkpoints (certify, ptq, eval)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from monquant.certify import JSON_KEYS
from monquant.cli import main
from monquant.operators import OperatorError


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory: pytest.TempPathFactory, tiny_mnist) -> tuple[Path, Path]:
    data = tiny_mnist(tmp_path_factory.mktemp("mnist"), 256, 128)
    out = tmp_path_factory.mktemp("conv")
    rc = main(["train", "--out", str(out), "--arch", "conv", "--channels", "3", "--epochs", "1",
               "--batch-size", "64", "--margin-init", "0.5", "--data-dir", str(data),
               "--no-download", "--no-progress", "--json"])  # fmt: skip
    assert rc == 0
    return out / "model.safetensors", data


def test_train_conv_then_certify_its_checkpoint(capsys, conv_run) -> None:
    model, _ = conv_run
    rc, out, err = run(capsys, "certify", model, "--bits", "2", "4", "8", "--granularity",
                       "per-channel", "--json")  # fmt: skip
    assert rc == 0, err
    certs = json.loads(out)
    assert [c["bits"] for c in certs] == [2, 4, 8]
    assert set(JSON_KEYS) <= set(certs[0])  # the same keys as the dense certificate
    assert all(c["n"] == 3 * 28 * 28 for c in certs)
    assert certs[2]["dW_norm_upper"] < certs[0]["dW_norm_upper"]
    rc, out, err = run(capsys, "certify", model, "--min-bits", "--no-progress")
    assert rc == 0, err
    assert "circular convolution, kernel 3x3x5x5 on 28x28" in out
    assert "smallest certified bit-width per tier" in out and "per-channel" in out


def test_ptq_and_eval_take_conv_checkpoints(capsys, conv_run, tmp_path) -> None:
    model, data = conv_run
    dest = tmp_path / "q4.safetensors"
    rc, out, err = run(capsys, "ptq", model, "--bits", "4", "--granularity", "per-channel",
                       "--out", dest, "--data-dir", data, "--no-download", "--json")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["certificate"]["bits"] == 4 and r["eval"]["unconverged"] == 0
    rc, out, err = run(capsys, "eval", dest, "--data-dir", data, "--no-download", "--json")
    assert rc == 0, err
    e = json.loads(out)
    assert e["quantized"] and e["eval"]["accuracy"] == r["eval"]["accuracy"]


def test_conv_bad_arguments_are_clear_one_line_errors(capsys, tmp_path) -> None:
    for argv, fragment in (
        (["--kernel", "4"], "odd"),
        (["--robust-eps", "0.1"], "dense MonDEQ only"),
        (["--pool", "5"], "pool 5 must divide"),
        (["--channels", "4", "--rank", "5"], "rank"),
    ):
        rc, _, err = run(capsys, "train", "--out", tmp_path / "x", "--arch", "conv", *argv,
                         "--data-dir", tmp_path / "nothing-here", "--no-download")  # fmt: skip
        assert rc != 0 and "Traceback" not in err
        assert err.startswith("monquant train: error: ") and fragment in err, err
        assert len(err.strip().splitlines()) == 1


def test_conv_study_refuses_bad_settings_before_loading_data(capsys, tmp_path) -> None:
    for bad in (["--bits", "1"], ["--qat-bits", "1"], ["--qat-kinds", "proxquant-w"],
                ["--qat-rows", "ste"], ["--qat-rows", "ptq:4"], ["--qat-rows", "ste:1"],
                ["--qat-rows", "ste:4", "ste:4"], ["--address", "1.2.3.4:1"]):  # fmt: skip
        rc, _, err = run(capsys, "conv", "--out", tmp_path / "s", *bad,
                         "--data-dir", tmp_path / "nothing-here", "--no-download")  # fmt: skip
        assert rc != 0 and err.startswith("monquant conv: error: ") and "Traceback" not in err, bad


@pytest.fixture(scope="module")
def multitier_run(tmp_path_factory: pytest.TempPathFactory, tiny_mnist) -> tuple[Path, Path]:
    data = tiny_mnist(tmp_path_factory.mktemp("mnist"), 128, 64)
    out = tmp_path_factory.mktemp("multitier")
    rc = main(["train", "--out", str(out), "--arch", "multitier", "--tier-channels", "1", "2", "2",
               "--epochs", "1", "--batch-size", "64", "--margin-init", "0.5", "--data-dir", str(data),
               "--no-download", "--no-progress", "--json"])  # fmt: skip
    assert rc == 0
    return out / "model.safetensors", data


def test_train_multitier_then_certify_and_eval_its_checkpoint(capsys, multitier_run, tmp_path) -> None:
    model, data = multitier_run
    rc, out, err = run(capsys, "certify", model, "--bits", "3", "8", "--granularity", "per-channel",
                       "--json")  # fmt: skip
    assert rc == 0, err
    certs = json.loads(out)
    assert set(JSON_KEYS) <= set(certs[0])
    assert [c["bits"] for c in certs] == [3, 8] and all(c["n"] == 784 + 2 * 196 + 2 * 49 for c in certs)
    assert certs[1]["verdict"] == "certified" and certs[1]["tier"] in ("weyl", "a_priori")
    assert certs[1]["dW_norm_upper"] < certs[0]["dW_norm_upper"]
    rc, out, err = run(capsys, "certify", model, "--bits", "8")
    assert rc == 0 and "multi-tier operator, tiers 1x28x28, 2x14x14, 2x7x7" in out
    rc, out, err = run(capsys, "eval", model, "--data-dir", data, "--no-download", "--no-progress",
                       "--json")  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["eval"]["unconverged"] == 0
    rc, out, err = run(capsys, "export", model, "--bits", "8", "--out", tmp_path / "d.npz")
    assert rc == 2 and err.startswith("monquant export: error:") and "multi-tier" in err
    rc, out, err = run(capsys, "train", "--out", tmp_path / "t", "--arch", "multitier", "--qat-bits", "4",
                       "--margin-target", "0.1", "--data-dir", data, "--no-download")  # fmt: skip
    assert rc == 2 and "not implemented for --arch multitier" in err


def test_train_multitier_with_qat_then_ptq_deploys_what_it_trained_on(
    capsys, multitier_run, tmp_path
) -> None:
    """STE QAT of a multi-tier model (every composite kernel fake-quantized on its own grid): each
    epoch logs the proved margin bounds of the operator it trained on, and ptq of the checkpoint
    deploys that operator's kernels and certifies them."""
    from monquant.multitier_model import fake_quant_tiers
    from monquant.storage.checkpoints import load_model

    _, data = multitier_run
    out = tmp_path / "qat"
    rc, _, err = run(capsys, "train", "--out", out, "--arch", "multitier", "--tier-channels", "1", "2", "2",
                     "--epochs", "1", "--batch-size", "64", "--margin-init", "0.5", "--qat-bits", "6",
                     "--granularity", "per-channel", "--data-dir", data, "--no-download", "--no-progress",
                     "--json")  # fmt: skip
    assert rc == 0, err
    entry = json.loads((out / "log.json").read_text())["history"][-1]
    assert entry["margin_quantized_verdict"] in ("certified", "refuted", "undecided")
    assert entry["margin_quantized_lower"] <= entry["margin_quantized"] + 1e-9
    assert entry["train_unconverged"] == 0
    rc, text, err = run(capsys, "ptq", out / "model.safetensors", "--bits", "6", "--granularity",
                        "per-channel", "--out", tmp_path / "q.safetensors", "--data-dir", data,
                        "--no-download", "--no-progress", "--json")  # fmt: skip
    assert rc == 0, err
    layer = load_model(out / "model.safetensors").model.layer
    trained_on = fake_quant_tiers(layer.operator(), 6, "per-channel")
    deployed = load_model(tmp_path / "q.safetensors").quantized.overrides()["W"]
    for K, Kd in zip(trained_on.kernels(), deployed.kernels(), strict=True):  # one grid step apart
        step = float(Kd.abs().max()) / 2**5  # at most, where float32 and float64 round differently
        assert float((K.detach().double() - Kd.double()).abs().max()) <= step
        assert float((K.detach().double() - Kd.double()).abs().mean()) <= 1e-3 * step
    assert json.loads(text)["certificate"]["verdict"] in ("certified", "refuted", "undecided")


def test_ptq_of_a_multitier_checkpoint_is_certified_saved_and_reloaded(
    capsys, multitier_run, tmp_path
) -> None:
    from monquant.certify_multitier import certify_deployed
    from monquant.storage.checkpoints import load_model

    model, data = multitier_run
    dest = tmp_path / "q.safetensors"
    rc, out, err = run(capsys, "ptq", model, "--bits", "6", "--granularity", "per-channel", "--out", dest,
                       "--data-dir", data, "--no-download", "--json")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["architecture"] == "multitier" and r["eval"]["unconverged"] == 0
    cert = r["certificate"]
    loaded = load_model(dest)
    Wt = loaded.quantized.overrides()["W"]  # the composite kernels, assembled on the layer's tiers
    short = dataclasses.replace(loaded.quantized, parts={k: v for k, v in loaded.quantized.parts.items()
                                                         if k != "W.1"})  # fmt: skip
    with pytest.raises(OperatorError, match="coupling"):
        short.tensor("W")  # a kernel list that does not make the tiers is refused, never assembled
    float_model = load_model(model).model
    ref_cert, ref = certify_deployed(float_model.layer.reference_weight(), 6, "per-channel")
    for a, b in zip((*Wt.diag, *Wt.down), (*ref.diag, *ref.down), strict=True):
        assert torch.equal(a, b)  # the saved W~ is the one certify_deployed certifies
    assert cert["verdict"] == ref_cert.verdict and cert["dW_norm_upper"] == ref_cert.dW_norm_upper
    assert cert["bits"] == 6 and cert["granularity"] == "per-channel"
    rc, out, err = run(capsys, "eval", dest, "--data-dir", data, "--no-download", "--no-progress", "--json")
    assert rc == 0 and json.loads(out)["eval"]["accuracy"] == r["eval"]["accuracy"]
    assert json.loads(out)["exact"] is False  # the margin of a coupled W~ is an estimate
    rc, out, err = run(capsys, "ptq", model, "--bits", "6", "--quantize", "W,U", "--out", tmp_path / "wu",
                       "--data-dir", tmp_path / "none", "--no-download")  # fmt: skip
    assert rc == 2 and err.startswith("monquant ptq: error:") and "composite kernels" in err  # before data


def test_conv_study_threads_bind_its_workers_and_rows_parse(
    capsys, tmp_path, tiny_mnist, monkeypatch
) -> None:
    """An explicit --threads is each worker's thread count (as in lowbit and reproduce), and
    --qat-rows reaches the study's configuration as (kind, bits) pairs."""
    import monquant.experiments.conv.study as study

    seen = []

    def fake(cfg, data, echo=None):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(study, "run_conv_study", fake)
    data = tiny_mnist(tmp_path / "mnist", 64, 32)
    common = ["conv", "--out", tmp_path / "s", "--data-dir", data, "--no-download", "--executor", "process"]
    run(capsys, *common, "--threads", "1", "--qat-rows", "proxquant-factors:2", "ste:4")
    run(capsys, *common)
    assert seen[0].worker_threads == 1 and seen[1].worker_threads is None
    assert seen[0].qat_rows == (("proxquant-factors", 2), ("ste", 4))
