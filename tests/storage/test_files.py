"""One atomic writer with ordinary permissions (storage.files) and the JSON convention (jsonio)."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from monquant.storage.files import atomic_write_bytes, atomic_write_text
from monquant.storage.jsonio import read_json, to_jsonable, write_json


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_files_are_world_readable_and_replacements_keep_their_mode(tmp_path: Path) -> None:
    for write in (lambda p: atomic_write_text(p, "x"), lambda p: write_json(p, {"a": 1})):
        p = tmp_path / f"f{_mode(tmp_path)}-{id(write)}.txt"
        write(p)
        assert _mode(p) == 0o644  # not mkstemp's 0600
        os.chmod(p, 0o640)
        write(p)
        assert _mode(p) == 0o640
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temporaries left


def test_text_and_json_round_trip(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    path = write_json(tmp_path / "r.json", {"x": math.inf, "y": [1.5, math.nan], "p": tmp_path})
    raw = json.loads(path.read_text())  # numbers stay numbers: null plus a flag
    assert raw == {
        "x": None, "y": [1.5, None], "p": str(tmp_path), "nonfinite": {"x": "inf", "y/1": "nan"}
    }  # fmt: skip
    data = read_json(path)
    assert data["x"] == math.inf and data["y"][0] == 1.5 and math.isnan(data["y"][1])
    assert set(data) == {"x", "y", "p"}
    assert to_jsonable((1, 2)) == [1, 2]


def test_folder_lock_refuses_a_second_live_writer_and_takes_over_stale_locks(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    import pytest

    from monquant.storage.files import LOCK_NAME, FolderLockedError, folder_lock

    run = tmp_path / "run"
    with folder_lock(run, "train"):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with folder_lock(run, "train"):  # re-entrant in one process
            pass
        assert (run / LOCK_NAME).exists()
        child = subprocess.run(
            [sys.executable, "-c",
             "from monquant.storage.files import folder_lock\n"
             f"with folder_lock({str(run)!r}, 'train'): pass"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert child.returncode != 0 and "FolderLockedError" in child.stderr
        assert "in use by another train run" in child.stderr
    assert not run.exists()  # it wrote nothing: nothing is left behind
    # a lock whose owner is gone (killed) is stale and taken over
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(f"{dead.pid}\n")
    with folder_lock(run):
        (run / "result.txt").write_text("ok")
    assert (run / "result.txt").exists() and not (run / LOCK_NAME).exists()
    with pytest.raises(Exception, match="cannot"), folder_lock("/proc/monquant-no-such-place/run"):
        pass
    _ = FolderLockedError


def test_nonfinite_numbers_round_trip_through_nested_objects_and_lists() -> None:
    import torch

    from monquant.storage.jsonio import dumps_json, from_jsonable

    data = {
        "a/b": -math.inf,
        "rows": [{"L": math.inf, "m": 0.5}, {"L": 2.0, "r": [math.nan, 1.0, math.inf]}],
        "t": torch.tensor([1.0, float("inf")]),
        "grid": [[1.0, -math.inf]],
    }
    text = dumps_json(data)
    assert "Infinity" not in text and "NaN" not in text and '"inf",' not in text.split("nonfinite")[0]
    raw = json.loads(text)
    assert raw["nonfinite"] == {"a~1b": "-inf", "t/1": "inf", "grid/0/1": "-inf"}
    assert raw["rows"][0] == {"L": None, "m": 0.5, "nonfinite": {"L": "inf"}}
    back = from_jsonable(raw)
    assert back["a/b"] == -math.inf and back["t"] == [1.0, math.inf] and back["grid"] == [[1.0, -math.inf]]
    assert back["rows"][0] == {"L": math.inf, "m": 0.5}
    assert math.isnan(back["rows"][1]["r"][0]) and back["rows"][1]["r"][1:] == [1.0, math.inf]
    assert from_jsonable({"nonfinite": {"x": "y"}}) == {"nonfinite": {"x": "y"}}  # not a flag
