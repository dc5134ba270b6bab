"""Tests of the command-line interface, called in-process through ``monquant.cli.main``."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monquant.certify import JSON_KEYS, certify
from monquant.cli import build_parser, main
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.operators import wk_weight
from monquant.storage.checkpoints import load_model, save_model

N = 20
CERT_KEYS = set(JSON_KEYS)
VERDICTS = ("certified_a_priori", "certified_weyl", "certified_exact")


def monotone_W(n: int = N, m: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    return wk_weight(A, B, m)


def cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusals exit 2 as the installed script does
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> Any:
    rc, out, err = cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def assert_clean_error(rc: int, err: str, command: str, *fragments: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    assert err.startswith(f"monquant {command}: error: ")
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture(scope="module")
def W() -> torch.Tensor:
    return monotone_W()


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory, W: torch.Tensor) -> Path:
    path = tmp_path_factory.mktemp("weights") / "w.npz"
    np.savez(path, W=W.numpy(), U=np.ones((N, 3)), b=np.zeros(N))
    return path


# ----------------------------------------------------------------------------------------------
# certify
# ----------------------------------------------------------------------------------------------


def test_certify_prints_table(
    capsys: pytest.CaptureFixture[str], npz: Path, W: torch.Tensor
) -> None:
    rc, out, err = cli(capsys, "certify", npz, "--bits", 4, 8)
    assert rc == 0, err
    assert f"W: {N}x{N}" in out and "m = margin(W)" in out
    assert "NOT monotone" not in out
    header = next(line for line in out.splitlines() if line.startswith("bits"))
    for col in ("||dW||", "a-priori ok", "Weyl ok", "exact ok"):
        assert col in header
    rows = [line.split() for line in out.splitlines() if line[:4].strip() in ("4", "8")]
    assert [r[0] for r in rows] == ["4", "8"]
    m = certify(W, 4).margin
    assert f"{m:.6g}" in out


def test_certify_json_matches_library(
    capsys: pytest.CaptureFixture[str], npz: Path, W: torch.Tensor
) -> None:
    data = cli_json(capsys, "certify", npz, "--bits", 3, 4, 8)
    assert isinstance(data, list) and len(data) == 3
    for obj, bits in zip(data, (3, 4, 8), strict=True):
        assert isinstance(obj, dict)
        assert CERT_KEYS <= obj.keys()
        assert obj["bits"] == bits
        ref = certify(W, bits)
        assert obj["dW_norm"] == pytest.approx(ref.dW_norm, rel=1e-12)
        assert obj["margin"] == pytest.approx(ref.margin, rel=1e-12)
        assert obj["weyl_bound"] == pytest.approx(obj["margin"] - obj["dW_norm"], abs=1e-12)
        assert obj["certified_weyl"] == (obj["dW_norm"] < obj["margin"])
        assert obj["certified_a_priori"] == (obj["a_priori_bound"] < obj["margin"])
        assert obj["certified_exact"] == (obj["margin_quantized"] > 0)
        # the tiers are nested: a-priori => Weyl => exact
        assert obj["certified_a_priori"] <= obj["certified_weyl"] <= obj["certified_exact"]
    assert data[-1]["certified_a_priori"]  # 8 bits is plenty for n=20, m=0.5
    assert data[0]["dW_norm"] > data[-1]["dW_norm"]


def test_certify_per_channel(capsys: pytest.CaptureFixture[str], npz: Path) -> None:
    tensor, channel = (
        cli_json(capsys, "certify", npz, "--bits", 4, "--granularity", g)[0]
        for g in ("per-tensor", "per-channel")
    )
    assert channel["granularity"] == "per-channel"
    assert channel["dW_norm"] != tensor["dW_norm"]
    assert channel["step"] <= tensor["step"]  # the largest row step never exceeds the global one


def test_certify_min_bits(capsys: pytest.CaptureFixture[str], npz: Path) -> None:
    data = cli_json(capsys, "certify", npz, "--bits", 4, "--min-bits")
    assert len(data["certificates"]) == 1 and data["certificates"][0]["bits"] == 4
    mb = data["min_bits"]
    assert mb.keys() == {"per-tensor", "per-channel"}
    for tiers in mb.values():
        assert all(isinstance(tiers[t], int) for t in ("a_priori", "weyl", "exact"))
        assert tiers["exact"] <= tiers["weyl"] <= tiers["a_priori"]
    only = cli_json(capsys, "certify", npz, "--min-bits")  # no --bits: only the smallest bits
    assert only == {"min_bits": mb}
    rc, out, _ = cli(capsys, "certify", npz, "--min-bits")
    assert rc == 0 and "smallest certified bit-width" in out
    assert f"a_priori {mb['per-tensor']['a_priori']}," in out  # the JSON's tier names


def test_certify_non_monotone_W(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, W=1.5 * np.eye(N))
    rc, out, err = cli(capsys, "certify", path, "--bits", 4, 8)
    assert rc == 0, err
    assert "NOT monotone" in out
    data = cli_json(capsys, "certify", path, "--bits", 4, 8, 16)
    for obj in data:
        assert obj["margin"] == pytest.approx(-0.5)
        assert obj["margin_quantized"] < 0
        assert not any(obj[v] for v in VERDICTS)


def test_certify_model_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(hidden=N))
    path = save_model(tmp_path / "model.safetensors", model)
    data = cli_json(capsys, "certify", path, "--bits", 6)
    ref = certify(model.layer.weight().detach().double(), 6)
    assert data[0]["margin"] == pytest.approx(ref.margin, rel=1e-12)
    assert data[0]["dW_norm"] == pytest.approx(ref.dW_norm, rel=1e-12)


def test_certify_monquant_tensor_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, W: torch.Tensor
) -> None:
    from monquant.storage.tensors import save_tensors

    path = save_tensors(tmp_path / "w.safetensors", {"W": W}, {"kind": "weights"})
    data = cli_json(capsys, "certify", path, "--bits", 4)
    assert data[0]["margin"] == pytest.approx(certify(W, 4).margin, rel=1e-12)


def test_certify_plain_safetensors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, W: torch.Tensor
) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"W": W.contiguous()}, str(path))
    rc, out, err = cli(capsys, "certify", path, "--bits", 4, "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["margin"] == pytest.approx(certify(W, 4).margin, rel=1e-12)


def _make_bad(kind: str, path_dir: Path, W: torch.Tensor) -> Path:
    if kind == "pt":
        path = path_dir / "w.pt"
        torch.save({"W": W}, path)
    elif kind == "object":
        path = path_dir / "w.npz"
        np.savez(path, W=np.array([[1.0, "x"], [None, 2.0]], dtype=object))
    elif kind == "truncated":
        path = path_dir / "w.npz"
        np.savez(path, W=W.numpy())
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "nan":
        path = path_dir / "w.npz"
        bad = W.numpy().copy()
        bad[2, 3] = np.nan
        np.savez(path, W=bad)
    elif kind == "non-square":
        path = path_dir / "w.npz"
        np.savez(path, W=np.zeros((3, 4)))
    elif kind == "vector":
        path = path_dir / "w.npz"
        np.savez(path, W=np.zeros(4))
    elif kind == "no-W":
        path = path_dir / "w.npz"
        np.savez(path, U=np.zeros((4, 4)), b=np.zeros(4))
    elif kind == "not-npz":
        path = path_dir / "w.npz"
        path.write_bytes(b"W = [[1, 0], [0, 1]]\n")
    elif kind == "suffix":
        path = path_dir / "w.txt"
        path.write_text("1 0\n0 1\n")
    elif kind == "missing":
        path = path_dir / "absent.npz"
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("pt", "pickle"),
        ("object", "Python objects"),
        ("truncated", "truncated or corrupt"),
        ("nan", "non-finite"),
        ("non-square", "square"),
        ("vector", "square"),
        ("no-W", "no tensor named 'W'"),
        ("not-npz", "not an .npz archive"),
        ("suffix", "unsupported"),
        ("missing", "no such file"),
    ],
)
def test_certify_refuses_bad_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, W: torch.Tensor, kind: str, fragment: str
) -> None:
    path = _make_bad(kind, tmp_path, W)
    rc, out, err = cli(capsys, "certify", path, "--bits", 4)
    assert_clean_error(rc, err, "certify", fragment)
    assert out == ""


def test_truncated_npz_really_is_a_zip_problem(tmp_path: Path, W: torch.Tensor) -> None:
    path = _make_bad("truncated", tmp_path, W)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)


@pytest.mark.filterwarnings("ignore:Casting complex values")
def test_certify_refuses_complex_W(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, W: torch.Tensor
) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, W=W.numpy() + 1j * np.eye(N))
    rc, _, err = cli(capsys, "certify", path, "--bits", 4)
    assert_clean_error(rc, err, "certify")


@pytest.mark.parametrize("bits", [1, 33, 0, -4])
def test_certify_refuses_bad_bits(capsys: pytest.CaptureFixture[str], npz: Path, bits: int) -> None:
    rc, out, err = cli(capsys, "certify", npz, "--bits", 4, bits)
    assert_clean_error(rc, err, "certify", "bit-width", "[2, 32]")
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "{npz}", "--bits", "4.5"],
        ["certify", "{npz}", "--granularity", "per-row"],
        ["certify"],
        ["nonsense"],
    ],
)
def test_argparse_errors_exit_2(
    capsys: pytest.CaptureFixture[str], npz: Path, argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([a.format(npz=npz) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: monquant" in err and "error:" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# train / ptq / eval on a tiny hand-made MNIST (raw IDX files)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_mnist) -> Path:
    return tiny_mnist(tmp_path_factory.mktemp("mnist"), 600, 300)


def run_main(*argv: Any) -> tuple[int, str, str]:
    """``main`` with stdout/stderr captured (for module-scoped fixtures, where capsys is absent)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("run")
    rc, stdout, err = run_main(
        "train", "--out", out, "--hidden", 16, "--epochs", 2, "--batch-size", 64,
        "--data-dir", data_dir, "--no-download", "--no-progress", "--json",
    )  # fmt: skip
    assert rc == 0, err
    return {"out": out, "result": json.loads(stdout)}


def test_train_json_result(trained_run: dict[str, Any]) -> None:
    res, out = trained_run["result"], trained_run["out"]
    assert {"model", "checkpoint", "log", "history", "seconds"} <= res.keys()
    assert Path(res["model"]) == out / "model.safetensors"
    for key in ("model", "checkpoint", "log"):
        assert Path(res[key]).is_file()
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["test_accuracy"] > 0.5  # the bands are easy to learn
    assert hist[-1]["train_unconverged"] == 0 and hist[-1]["test_unconverged"] == 0
    log = json.loads((out / "log.json").read_text())
    assert log["history"] == hist
    assert log["settings"]["model"]["hidden"] == 16
    assert log["settings"]["train"]["epochs"] == 2
    ckpt = load_model(res["checkpoint"])
    assert ckpt.train_state is not None and ckpt.train_state["epoch"] == 2


def test_train_check_every_reaches_the_solver_and_the_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    """``--check-every 2`` tests the residual every other iteration in the forward and adjoint
    solves; the setting is saved with the model, and every solve still converges."""
    rc, out, err = cli(capsys, "train", "--out", tmp_path, "--hidden", 16, "--epochs", 1,
                       "--batch-size", 200, "--check-every", 2, "--data-dir", data_dir,
                       "--no-download", "--no-progress", "--json")  # fmt: skip
    assert rc == 0, err
    hist = json.loads(out)["history"][-1]
    assert hist["train_unconverged"] == 0 and hist["test_unconverged"] == 0
    model = load_model(tmp_path / "checkpoint.safetensors").model
    assert model.solver.forward_config.check_every == 2
    rc, out, err = cli(capsys, "train", "--out", tmp_path / "auto", "--hidden", 16, "--epochs", 1,
                       "--batch-size", 200, "--data-dir", data_dir, "--no-download", "--no-progress",
                       "--json")  # fmt: skip  # the default: scheduled checks
    assert rc == 0, err
    assert json.loads(out)["history"][-1]["train_unconverged"] == 0
    auto = load_model(tmp_path / "auto" / "checkpoint.safetensors").model
    assert auto.solver.forward_config.check_every == "auto"


def test_train_tol_start_loosens_training_solves_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    """``--train-tol-start`` sets the first epochs' training tolerance (logged per epoch) and
    tightens it to ``--tol`` at the last; the saved model and its settings keep ``--tol``."""
    rc, out, err = cli(capsys, "train", "--out", tmp_path, "--hidden", 16, "--epochs", 2,
                       "--batch-size", 200, "--tol", "1e-4", "--train-tol-start", "1e-2",
                       "--data-dir", data_dir, "--no-download", "--no-progress", "--json")  # fmt: skip
    assert rc == 0, err
    result = json.loads(out)
    assert [h["train_tol"] for h in result["history"]] == pytest.approx([1e-2, 1e-4])
    assert all(h["train_unconverged"] == 0 for h in result["history"])
    model = load_model(tmp_path / "checkpoint.safetensors").model
    assert model.solver.forward_config.tol == 1e-4


def test_train_text_output_and_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    args = ["train", "--out", tmp_path, "--hidden", 16, "--epochs", 1, "--batch-size", 200,
            "--data-dir", data_dir, "--no-download", "--no-progress"]  # fmt: skip
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert out.startswith("epoch  1: loss ")
    assert "trained 1 epochs: test accuracy" in out and "model: " in out
    rc, out, err = cli(capsys, *args, "--resume")
    assert rc == 0, err
    assert out.startswith("resuming ")
    rc, out, err = cli(capsys, *args, "--lr", "0.002", "--resume")
    assert_clean_error(rc, err, "train", "differ from the interrupted run")


@pytest.mark.parametrize(
    "option",
    [["--epochs", "0"], ["--hidden", "0"], ["--lr", "0"], ["--check-every", "0"], ["--check-every", "often"]],
)
def test_train_refuses_bad_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path, option: list[str]
) -> None:
    # refused by argparse itself (before any data loads): exit 2, the error line first
    rc, _, err = cli(capsys, "train", "--out", tmp_path, *option, "--data-dir", data_dir,
                     "--no-download")  # fmt: skip
    assert rc == 2
    assert_clean_error(rc, err, "train", option[0])
    assert not tmp_path.joinpath("checkpoint.safetensors").exists()


def test_train_missing_data_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MONQUANT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc, _, err = cli(
        capsys, "train", "--out", tmp_path / "run", "--data-dir", tmp_path / "none",
        "--no-download", "--no-progress",
    )  # fmt: skip
    assert_clean_error(rc, err, "train", "MNIST not found")
    assert not (tmp_path / "run").exists()


def test_ptq_and_eval(
    capsys: pytest.CaptureFixture[str], trained_run: dict[str, Any], data_dir: Path
) -> None:
    model_path = trained_run["result"]["model"]
    common = ["--test-limit", 200, "--data-dir", data_dir, "--no-download"]
    ptq = cli_json(capsys, "ptq", model_path, "--bits", 4, *common)
    assert {"bits", "granularity", "quantized", "certificate", "eval", "float_eval", "out"} <= (
        ptq.keys()
    )
    assert ptq["bits"] == 4 and ptq["quantized"] == ["W"]
    assert Path(ptq["out"]) == trained_run["out"] / "ptq-4bit-per-tensor.safetensors"
    cert = ptq["certificate"]
    assert CERT_KEYS <= cert.keys() and cert["tier"] in ("a_priori", "weyl", "exact", "none")
    for ev in (ptq["eval"], ptq["float_eval"]):
        assert ev["samples"] == 200
        assert ev["converged"] + ev["unconverged"] == 200
        assert 0 <= ev["diverged"] <= ev["unconverged"]
        assert 0.0 <= ev["accuracy"] <= 1.0
        assert ev["converged_fraction"] == pytest.approx(ev["converged"] / 200)

    loaded = load_model(ptq["out"])
    assert loaded.quantized is not None and loaded.quantized.bits == 4
    assert loaded.metadata["certificate"]["tier"] == cert["tier"]

    # eval of the quantized file reproduces ptq's quantized evaluation; of the float file, float's
    q_eval = cli_json(capsys, "eval", ptq["out"], *common)
    f_eval = cli_json(capsys, "eval", model_path, *common)
    assert q_eval["quantized"] is True and f_eval["quantized"] is False
    for res, ref in ((q_eval, ptq["eval"]), (f_eval, ptq["float_eval"])):
        assert {"checkpoint", "quantized", "m", "L", "norm_W", "kappa", "eval"} <= res.keys()
        ev = res["eval"]
        assert ev["samples"] == 200 and ev["converged"] + ev["unconverged"] == 200
        for key in ("accuracy", "converged", "unconverged", "max_iterations"):
            assert ev[key] == ref[key], key
    assert q_eval["m"] == pytest.approx(cert["margin_quantized"], rel=1e-9)
    assert f_eval["m"] == pytest.approx(cert["margin"], rel=1e-9)


def test_ptq_per_channel_all_parts_text(
    capsys: pytest.CaptureFixture[str], trained_run: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "q.safetensors"
    rc, out, err = cli(
        capsys, "ptq", trained_run["result"]["model"], "--bits", 8, "--granularity",
        "per-channel", "--quantize", "W, U,b", "--out", dest, "--test-limit", 50,
        "--data-dir", data_dir, "--no-download",
    )  # fmt: skip
    assert rc == 0, err
    assert out.startswith("8-bit PTQ (per-channel, paper step, W,U,b): tier ")
    assert "converged 50/50 solves" in out and str(dest) in out
    loaded = load_model(dest)
    assert loaded.quantized is not None
    assert sorted(loaded.quantized.parts) == ["U", "W", "b"]
    rc, out, err = cli(capsys, "eval", dest, "--test-limit", 50, "--data-dir", data_dir)
    assert rc == 0, err
    assert "on 50 test images (quantized weights)" in out


@pytest.mark.parametrize("bits", [1, 33])
def test_ptq_refuses_bad_bits(
    capsys: pytest.CaptureFixture[str], trained_run: dict[str, Any], data_dir: Path, bits: int
) -> None:
    rc, _, err = cli(
        capsys, "ptq", trained_run["result"]["model"], "--bits", bits, "--data-dir", data_dir,
        "--no-download", "--test-limit", 10,
    )  # fmt: skip
    assert_clean_error(rc, err, "ptq", "bit-width")


def test_ptq_of_uncertified_quantization(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(hidden=30, margin_init=0.01))
    assert not certify(model.layer.weight().detach(), 2).certified_weyl
    path = save_model(tmp_path / "small-margin.safetensors", model)
    res = cli_json(
        capsys, "ptq", path, "--bits", 2, "--test-limit", 20, "--data-dir", data_dir,
        "--no-download",
    )  # fmt: skip
    assert res["certificate"]["tier"] in ("exact", "none")
    assert Path(res["out"]).is_file()


def test_ptq_refuses_unknown_part(
    capsys: pytest.CaptureFixture[str], trained_run: dict[str, Any], data_dir: Path
) -> None:
    rc, _, err = cli(
        capsys, "ptq", trained_run["result"]["model"], "--bits", 4, "--quantize", "W,X",
        "--data-dir", data_dir, "--no-download",
    )  # fmt: skip
    assert_clean_error(rc, err, "ptq", "X")


def test_eval_refuses_non_checkpoint(
    capsys: pytest.CaptureFixture[str], npz: Path, data_dir: Path, tmp_path: Path
) -> None:
    rc, _, err = cli(capsys, "eval", npz, "--data-dir", data_dir, "--no-download")
    assert_clean_error(rc, err, "eval")
    other = tmp_path / "w.safetensors"
    from monquant.storage.tensors import save_tensors

    save_tensors(other, {"W": torch.eye(3)}, {"kind": "weights"})
    rc, _, err = cli(capsys, "eval", other, "--data-dir", data_dir, "--no-download")
    assert_clean_error(rc, err, "eval", "not a monquant model checkpoint", "certify")


# ----------------------------------------------------------------------------------------------
# demo, help, top level
# ----------------------------------------------------------------------------------------------


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "demo", "--n", 20, "--bits", 4, 8)
    assert rc == 0, err
    assert "synthetic MonDEQ: n=20" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["4"], ["8"])]
    assert [r[0] for r in rows] == ["4", "8"]
    assert all(r[4] == "yes" for r in rows)  # every solve converged (certified at 4 and 8 bits)
    assert rows[1][3] == "a_priori"


def test_demo_json_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "demo", "--n", 12, "--bits", 8, "--json")
    assert rc == 0
    assert isinstance(json.loads(out), list)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_expected_subcommands_exist() -> None:
    assert {"train", "certify", "ptq", "eval", "demo"} <= _subcommands().keys()


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: monquant {command}")
    assert "--json" in out
    if _subcommands()[command].epilog:
        assert "examples:" in out
        assert f"monquant {command} " in out.split("examples:", 1)[1]
    if command in ("train", "certify", "ptq"):
        assert _subcommands()[command].epilog


def test_top_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("monquant ")


# ----------------------------------------------------------------------------------------------
# certify: verdicts are proofs (issue 10)
# ----------------------------------------------------------------------------------------------


def test_certify_boundary_operator_is_undecided(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    W5 = np.zeros((5, 5))
    W5[:4, :4] = 0.25
    W5[4, 4] = -1.875
    path = tmp_path / "w5.npz"
    np.savez(path, W=W5)
    data = cli_json(capsys, "certify", path, "--bits", 4)[0]
    assert data["tier"] == "none" and data["verdict"] == "undecided"
    assert data["margin_quantized_lower"] <= 0.0 <= data["margin_quantized_upper"]
    assert data["rho_pr_exact"] is None
    rc, out, _ = cli(capsys, "certify", path, "--bits", 4)
    assert rc == 0 and "undecided" in out and "within rounding error of 0" in out
    w3 = np.array([[0.325, 0.325, 0], [0.325, 0.325, 0], [0, 0, -3.75]])
    np.savez(tmp_path / "w3.npz", W=w3)
    data = cli_json(capsys, "certify", tmp_path / "w3.npz", "--bits", 4)[0]
    assert not data["certified_weyl"] and data["verdict"] == "undecided"


def test_certify_reports_proved_bounds_beside_computed_values(
    capsys: pytest.CaptureFixture[str], npz: Path
) -> None:
    data = cli_json(capsys, "certify", npz, "--bits", 3, 8)
    for c in data:
        assert c["margin_lower"] <= c["margin"] and c["L_upper"] >= c["L"]
        assert c["dW_norm_upper"] >= c["dW_norm"]
        assert c["verdict"] in ("certified", "refuted", "undecided")
        assert (c["verdict"] == "certified") == c["certified_exact"]


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for action in sp._actions:
            assert action.help, f"{name} {action.dest} has no help"
        text = sp.format_help()
        assert "(default:" in text, name


def test_device_flag_resolves_and_refuses_what_is_not_there() -> None:
    import torch

    from monquant.cli.common import select_device
    from monquant.errors import ConfigError

    assert select_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
    assert torch.get_default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_default_device("cpu")
