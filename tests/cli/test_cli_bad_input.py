"""Bad input through the real command line (subprocess): a first ``error:`` line, no traceback,
a non-zero exit, nothing written, and no data loaded first (issue 14, the rows fixed so far)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
]


@pytest.mark.parametrize(("command", "argv", "fragment"), ROWS)
def test_bad_input_gets_one_error_line_first(tmp_path: Path, command, argv, fragment) -> None:
    npz = tmp_path / "w.npz"
    np.savez(npz, W=np.eye(3) * 0.5)
    out = tmp_path / "out"
    args = [a.format(out=out, npz=npz) for a in argv]
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
