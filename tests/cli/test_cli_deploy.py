"""`monquant export` / `run` / `intdeploy` end to end on a small random MonDEQ and real MNIST."""

import json

import pytest
import torch

from monquant.cli import main
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.storage.checkpoints import save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dep") / "model.safetensors"
    save_model(path, MonDEQClassifier(MonDEQConfig(hidden=24, margin_init=0.5)))
    return path


def _run(capsys, *args):
    rc = main([*(str(a) for a in args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_export_then_run(capsys, ckpt, mnist_dir, tmp_path):
    dep = tmp_path / "m4.safetensors"
    rc, out, err = _run(capsys, "export", ckpt, "--bits", 4, "--out", dep, "--json",
                        "--data-dir", mnist_dir, "--calibration-limit", 200)  # fmt: skip
    assert rc == 0, err
    info = json.loads(out)
    assert info["certified"] and info["bytes"] < info["float32_bytes"]
    rc, out, err = _run(capsys, "run", dep, "--test-limit", 64, "--reference", "--json",
                        "--data-dir", mnist_dir)  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    assert res["samples"] == 64 and "predictions" not in res  # only with --per-sample
    assert 0.0 <= res["accuracy"] <= 1.0 and res["settled_fraction"] == 1.0
    assert res["max_distance_to_float"] >= 0
    rc, out, err = _run(capsys, "run", dep, "--test-limit", 8, "--per-sample", "--json",
                        "--data-dir", mnist_dir)  # fmt: skip
    assert rc == 0, err
    assert len(json.loads(out)["predictions"]) == 8
    # an iteration budget too small to settle: the answers are printed, the exit status says so
    rc, out, err = _run(capsys, "run", dep, "--test-limit", 8, "--json", "--data-dir", mnist_dir,
                        "--max-iter", 1)  # fmt: skip
    assert rc == 3 and err.startswith("monquant run: error: ") and "did not settle" in err
    assert json.loads(out)["settled_fraction"] < 1.0


def test_run_refuses_tampered_file(capsys, ckpt, mnist_dir, tmp_path):
    dep = tmp_path / "m8.safetensors"
    assert _run(capsys, "export", ckpt, "--bits", 8, "--out", dep, "--data-dir", mnist_dir,
                "--calibration-limit", 100)[0] == 0  # fmt: skip
    raw = bytearray(dep.read_bytes())
    raw[-5] ^= 0xFF
    dep.write_bytes(bytes(raw))
    rc, _, err = _run(capsys, "run", dep, "--test-limit", 8, "--data-dir", mnist_dir)
    assert rc != 0 and "error:" in err and "Traceback" not in err


def test_run_input_file_and_bad_input(capsys, ckpt, mnist_dir, tmp_path):
    import numpy as np

    dep = tmp_path / "m6.safetensors"
    assert _run(capsys, "export", ckpt, "--bits", 6, "--out", dep, "--data-dir", mnist_dir,
                "--calibration-limit", 100)[0] == 0  # fmt: skip
    x = np.random.default_rng(0).normal(size=(5, 784))
    np.savez(tmp_path / "batch.npz", x=x)
    rc, out, err = _run(capsys, "run", dep, "--input", tmp_path / "batch.npz", "--json")
    assert rc == 0, err
    assert json.loads(out)["samples"] == 5
    np.savez(tmp_path / "nox.npz", z=x)
    rc, _, err = _run(capsys, "run", dep, "--input", tmp_path / "nox.npz")
    assert rc != 0 and "no tensor named 'x'" in err
