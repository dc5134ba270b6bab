"""Bad input through the real command line (subprocess): a first ``error:`` line, no traceback,
a non-zero exit, nothing written, and no data loaded first (issue 14, the rows fixed so far)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROWS = [
    ("demo", ["--n", "-3"], "--n"),
    ("ste-recovery", ["--quick", "--trials", "0", "--out", "{out}"], "--trials"),
    ("train", ["--out", "{out}", "--lr", "-1"], "--lr"),
    ("train", ["--out", "{out}", "--epochs", "0"], "--epochs"),
    ("train", ["--out", "{out}", "--hidden", "0"], "--hidden"),
    ("eval", ["{npz}"], "takes a monquant model checkpoint"),
    ("ptq", ["{npz}", "--bits", "4", "--out", "{out}"], "takes a monquant model checkpoint"),
    ("export", ["{npz}", "--bits", "8", "--out", "{out}"], "takes a monquant model checkpoint"),
    ("export", ["{npz}", "--bits", "8", "--calibration", "-5"], "--calibration"),
    ("certify", ["{zip}", "--bits", "4"], "not a numpy array"),
    ("certify", ["{intw}", "--bits", "4"], "floating point"),
    ("export", ["{ckpt}", "--bits", "8", "--out", "{tmp}"], "is a folder"),
    ("ptq", ["{ckpt}", "--bits", "8", "--out", "{file}/q.safetensors"], "is a file, not a folder"),
]
CKPT = Path(__file__).resolve().parents[1] / "data" / "checkpoint-format1-v0.1.0.safetensors"


@pytest.mark.parametrize(("command", "argv", "fragment"), ROWS)
def test_bad_input_gets_one_error_line_first(tmp_path: Path, command, argv, fragment) -> None:
    npz = tmp_path / "w.npz"
    np.savez(npz, W=np.eye(3) * 0.5)
    zipped = tmp_path / "zip.npz"  # a torch.save file renamed .npz
    torch.save({"W": torch.eye(3)}, zipped)
    intw = tmp_path / "int.npz"  # integer (or bool) weights are refused, not cast silently
    np.savez(intw, W=np.eye(3, dtype=np.int64))
    afile = tmp_path / "afile"
    afile.write_text("")
    out = tmp_path / "out"
    names = {"out": out, "npz": npz, "zip": zipped, "ckpt": CKPT, "tmp": tmp_path, "file": afile}
    names["intw"] = intw
    args = [a.format(**names) for a in argv]
    env_data = ["--data-dir", str(tmp_path / "no-data"), "--no-download"]
    if command in ("train", "eval", "ptq", "export"):
        args += env_data
    proc = subprocess.run(
        [sys.executable, "-m", "monquant", command, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"monquant {command}: error: "), proc.stderr
    assert fragment in first
    assert "MNIST" not in proc.stderr  # refused before any data was looked for
    assert not out.exists()  # nothing written


def test_unconverged_answers_have_their_own_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from monquant.cli.common import EXIT_UNCONVERGED, unconverged_status

    args = argparse.Namespace(command="eval", allow_unconverged=False)
    assert unconverged_status(args, 0, "test solves did not converge") == 0
    assert unconverged_status(args, 4, "test solves did not converge") == EXIT_UNCONVERGED == 3
    assert capsys.readouterr().err.startswith("monquant eval: error: 4 test solves")
    args.allow_unconverged = True
    assert unconverged_status(args, 4, "test solves did not converge") == 0


def test_ptq_output_names_do_not_collide() -> None:
    from monquant.workflows import _ptq_name

    names = {_ptq_name(6, "per-channel", p) for p in (("W",), ("W", "U", "b"), ("W", "U"))}
    assert len(names) == 3 and _ptq_name(4, "per-tensor", ("W",)) == "ptq-4bit-per-tensor.safetensors"


def test_a_second_run_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    import time

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom monquant.storage.files import folder_lock\n"
         f"with folder_lock({str(run)!r}, 'train'):\n    time.sleep(60)"],
    )  # fmt: skip
    try:
        for _ in range(200):
            if (run / ".monquant.lock").exists():
                break
            time.sleep(0.05)
        proc = subprocess.run(
            [sys.executable, "-m", "monquant", "train", "--out", str(run), "--epochs", "1",
             "--data-dir", str(tmp_path / "no-data"), "--no-download"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("monquant train: error: ") and "in use by another" in first
    assert "MNIST" not in proc.stderr  # refused before any data was looked for
