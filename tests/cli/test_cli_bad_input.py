"""Bad input through the real command line (subprocess), one test per row of the table in
docs/cli.md: a non-zero exit, one ``error:`` line first, no traceback, nothing written or changed,
no data loaded, and an answer in under 2 s for arguments refused by the parser (issue 14)."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cli.md"
CKPT = ROOT / "tests" / "data" / "checkpoint-format1-v0.1.0.safetensors"
MNIST_NAMES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)  # fmt: skip


def table_rows() -> list[tuple[str, str, str, str]]:
    """``(class, command, fragment, refused)`` for every row between the docs' markers."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split("<!-- bad-input:begin -->")[1].split("<!-- bad-input:end -->")[0]
    rows = []
    for line in body.strip().splitlines()[2:]:  # skip the header and the rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        what, command, fragment, refused = cells
        rows.append((what, command.strip("`"), fragment.strip("`"), refused))
    return rows


ROWS = table_rows()


def test_the_table_is_there_and_covers_every_command_family() -> None:
    assert len(ROWS) >= 30
    used = {cmd.split()[1] for _, cmd, _, _ in ROWS}
    assert {"certify", "ptq", "eval", "export", "run", "train", "demo", "lowbit"} <= used
    assert {r[3] for r in ROWS} == {"args", "file"}


def _fixtures(tmp: Path) -> dict[str, Path]:
    from monquant.model import softplus_inverse
    from monquant.storage.checkpoints import load_model, save_model

    f = {"ckpt": CKPT, "out": tmp / "out", "missing": tmp / "missing.npz"}
    f["npz"] = tmp / "w.npz"
    np.savez(f["npz"], W=np.eye(3) * 0.5)
    f["pt"] = tmp / "w.pt"
    torch.save({"W": torch.eye(3)}, f["pt"])
    f["zip"] = tmp / "zip.npz"
    torch.save({"W": torch.eye(3)}, f["zip"])
    for name, W in [
        ("intw", np.eye(3, dtype=np.int64)), ("nan", np.array([[0.5, np.nan], [0.0, 0.5]])),
        ("rect", np.zeros((3, 4))), ("cplx", np.eye(3) * (1 + 1j)),
    ]:  # fmt: skip
        f[name] = tmp / f"{name}.npz"
        np.savez(f[name], W=W)
    f["nonw"] = tmp / "nonw.npz"
    np.savez(f["nonw"], V=np.eye(3))
    good = np.zeros((2, 2, 3, 3))
    good[:, :, 1, 1] = 0.3 * np.eye(2)
    nank = good.copy()
    nank[0, 0, 0, 0] = np.nan
    for name, K in [("kernel", good), ("evenk", np.zeros((2, 2, 2, 2))),
                    ("chmis", np.zeros((2, 3, 3, 3))), ("nank", nank)]:  # fmt: skip
        f[name] = tmp / f"{name}.npz"
        np.savez(f[name], W=K)
    raw = CKPT.read_bytes()
    f["trunc"] = tmp / "trunc.safetensors"
    f["trunc"].write_bytes(raw[:500])
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    f["tampered"] = tmp / "tampered.safetensors"
    f["tampered"].write_bytes(bytes(flipped))
    loaded = load_model(CKPT)  # the same model with a tiny margin: 2-bit W~ is not certified
    with torch.no_grad():
        loaded.model.layer.m_raw.fill_(float(softplus_inverse(torch.tensor(1e-3))))
    f["weak"] = save_model(tmp / "weak.safetensors", loaded.model)
    f["nodata"] = tmp / "nodata"
    f["nodata"].mkdir()
    f["badmnist"] = tmp / "badmnist"
    f["badmnist"].mkdir()
    for name in MNIST_NAMES:  # well-formed gzip, wrong contents: every checksum fails
        (f["badmnist"] / name).write_bytes(gzip.compress(b"not mnist"))
    f["dir"] = tmp / "adir"
    f["dir"].mkdir()
    f["file"] = tmp / "afile"
    f["file"].write_text("keep me\n")
    f["locked"] = tmp / "locked"
    f["locked"].mkdir()
    (f["locked"] / ".monquant.lock").write_text(f"{os.getpid()}\n")  # a live owner: this test
    return f


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("bad-input")
    return tmp, _fixtures(tmp)


@pytest.mark.parametrize(("what", "command", "fragment", "refused"), ROWS,
                         ids=[f"{i:02d}-{r[0]}" for i, r in enumerate(ROWS)])  # fmt: skip
def test_bad_input_row(fixtures, what: str, command: str, fragment: str, refused: str) -> None:
    tmp, names = fixtures
    argv = command.split()
    assert argv[0] == "monquant", command
    args = [a.format(**names) for a in argv[1:]]
    before = _snapshot(tmp)
    env = {k: v for k, v in os.environ.items() if k != "MONQUANT_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp / "no-cache")  # no MNIST anywhere this row could find
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "monquant", *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert re.match(r"monquant( [a-z-]+)?: error: ", first), proc.stderr
    assert fragment in first, (fragment, proc.stderr)
    assert proc.stdout == ""
    assert _snapshot(tmp) == before  # nothing written, nothing changed
    if "MNIST" not in fragment and "not usable" not in fragment:
        assert "MNIST" not in proc.stderr  # refused before any data was looked for
    if refused == "args":
        assert wall < 2.0, f"{wall:.2f} s"


def test_argument_rows_do_not_import_torch() -> None:
    code = (
        "import sys\nfrom monquant.cli.main import build_parser\n"
        "p = build_parser()\np.parse_known_args(['demo', '--n', '5'])\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the parser and its checks never need torch


def test_a_renamed_flag_warns_after_the_output_and_still_works(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MONQUANT_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "no-cache")  # no MNIST anywhere: the error comes first
    proc = subprocess.run(
        [sys.executable, "-m", "monquant", "intdeploy", str(CKPT), "--weight-bits", "4",
         "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path), "--no-download"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("monquant intdeploy: error: MNIST not found")
    assert lines[-1] == "monquant intdeploy: warning: --weight-bits is now --bits"


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
